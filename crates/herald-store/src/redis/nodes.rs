//! Node liveness: each node stamps its name and the time in one Redis hash
//! every `check_every`, and reads the others' stamps back, so `/api/stats`
//! (and `/metrics`) on any node show which nodes share the deployment and
//! which have gone quiet. A node that stops cleanly removes its stamp; one
//! that dies is shown as not alive until its stamp is an hour old, then
//! forgotten.
//!
//! Liveness is for operators: nothing in delivery waits on it (an MQTT
//! takeover still waits its bounded time for the old node's answer).

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};

use super::Inner;
use crate::now_ms;

/// Stamps older than this are removed from the hash.
const FORGET_AFTER_MS: i64 = 3_600_000;

/// A node seen within this many `check_every` periods is alive.
const ALIVE_PERIODS: u32 = 3;

/// The nodes as last read: (name, last stamp in ms since the epoch).
pub(super) type Seen = Vec<(String, i64)>;

/// Stamps this node and reads the others', every `check_every`, until the
/// store closes (which removes the stamp: [`leave`]).
pub(super) async fn run(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let mut tick = tokio::time::interval(inner.options.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = stamp(&inner).await {
                    tracing::debug!(error = %e, "could not stamp this node's liveness in Redis");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Removes this node's stamp: it stopped, it did not die.
pub(super) async fn leave(inner: &Inner) {
    let leave = redis::cmd("HDEL").arg(inner.keys.nodes()).arg(&inner.options.node).clone();
    if let Err(e) = inner.shards[0].query::<i64>(&leave).await {
        tracing::debug!(error = %e, "could not remove this node's liveness stamp");
    }
}

async fn stamp(inner: &Inner) -> Result<(), crate::StoreError> {
    let key = inner.keys.nodes();
    let now = now_ms();
    let mut pipe = redis::pipe();
    pipe.cmd("HSET").arg(&key).arg(&inner.options.node).arg(now).ignore();
    pipe.cmd("HGETALL").arg(&key);
    let (all,): (Vec<(String, i64)>,) = inner.shards[0].pipe(&pipe).await?;
    let (stale, mut seen): (Seen, Seen) = all.into_iter().partition(|(_, t)| now - t > FORGET_AFTER_MS);
    if !stale.is_empty() {
        let mut forget = redis::cmd("HDEL");
        forget.arg(&key);
        for (node, _) in &stale {
            forget.arg(node);
        }
        inner.shards[0].query::<i64>(&forget).await?;
    }
    seen.sort();
    *inner.nodes.lock().unwrap_or_else(|e| e.into_inner()) = seen;
    Ok(())
}

/// The nodes for `/api/stats`: each with how long ago it was seen and
/// whether that is recent enough to call it alive.
pub(super) fn json(seen: &Seen, check_every: Duration) -> Value {
    let now = now_ms();
    let alive_ms = (check_every * ALIVE_PERIODS).as_millis().max(3_000) as i64;
    seen.iter()
        .map(|(node, t)| {
            let ago = (now - t).max(0);
            json!({ "node": node, "seen_ms_ago": ago, "alive": ago <= alive_ms })
        })
        .collect::<Vec<_>>()
        .into()
}
