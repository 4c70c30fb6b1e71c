//! One shard's feed: the pub/sub connection that brings every partition's
//! committed messages and signals to this node, in order, and everything
//! that makes up for what pub/sub loses.
//!
//! Each payload carries its partition's sequence number `q`. A payload that
//! follows the last one handed on goes to the sink; one after a jump first
//! has the missing sequence numbers read back from the partition's log; one
//! at or below it is a duplicate (recovery got there first) and is dropped.
//! On every (re)subscription and every `check_every`, each partition's
//! current `q` is read: behind it, the log is read (this finds a lost last
//! message on a quiet channel, and a connection that stopped delivering);
//! ahead of it, Redis went back (a restart that lost writes, a wipe) and
//! the node starts following from there. Where the log no longer reaches,
//! the heads of the channels this node serves are read and each head
//! message handed on: a subscriber behind it sees ids jump and catches up
//! from the store by its own cursor.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use herald_core::Channel;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::oneshot;

use super::{Inner, shard::Conn, wire};
use crate::{Signal, StoreError, now_ms};

/// "Unknown": nothing received from this partition since start.
pub(super) const UNKNOWN: u64 = u64::MAX;

/// Starts shard `s`'s feed task; the receiver fires once it first subscribed.
pub(super) fn start(inner: Arc<Inner>, s: usize) -> oneshot::Receiver<()> {
    let (ready, subscribed) = oneshot::channel();
    if inner.shards[s].is_cluster() {
        tokio::spawn(run_cluster(inner, s, ready));
    } else {
        tokio::spawn(run(inner, s, ready));
    }
    subscribed
}

/// A Redis Cluster's feeds: sharded pub/sub (`SSUBSCRIBE`, one channel at a
/// time: each partition's feed lives on the master of its slot) on the
/// cluster connection, whose client resubscribes by itself after a
/// reconnection or a slot move; messages arrive as RESP3 pushes. A lost
/// connection shows as a `Disconnection` push; the sequence check, here as
/// on one Redis, reads back what was missed.
async fn run_cluster(inner: Arc<Inner>, s: usize, ready: oneshot::Sender<()>) {
    let shard = &inner.shards[s];
    let Conn::Cluster { conn, pushes } = &shard.conn else { return };
    let Some(mut pushes) = pushes.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let partitions: Vec<u32> = (0..inner.keys.partitions()).collect();
    let by_feed: HashMap<String, u32> = partitions.iter().map(|p| (inner.keys.feed(*p), *p)).collect();
    let mut stop = inner.stop.subscribe();
    let mut conn = conn.clone();
    let mut backoff = Duration::from_millis(50);
    for name in by_feed.keys() {
        loop {
            match tokio::time::timeout(inner.options.timeout, conn.ssubscribe(name)).await {
                Ok(Ok(())) => break,
                failed => {
                    tracing::warn!(redis = %shard.name, ?failed, "sharded feed not subscribed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    if let Err(e) = check(&inner, &partitions).await {
        tracing::warn!(redis = %shard.name, error = %e, "could not read the feed sequence");
    }
    shard.feed_up.store(true, Ordering::Relaxed);
    let _ = ready.send(());
    let mut tick = tokio::time::interval(inner.options.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            push = pushes.recv() => match push {
                Some(PushInfo { kind: PushKind::SMessage, data }) => {
                    let mut data = data.into_iter();
                    let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next())
                    else { continue };
                    let Some(p) = std::str::from_utf8(&channel).ok().and_then(|c| by_feed.get(c)).copied() else { continue };
                    shard.received.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = receive(&inner, p, Bytes::from(payload)).await {
                        tracing::warn!(redis = %shard.name, error = %e, "could not read back missed feed messages");
                    }
                }
                Some(PushInfo { kind: PushKind::Disconnection, .. }) => {
                    shard.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(redis = %shard.name, "a cluster connection was lost; the client resubscribes");
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {
                if let Err(e) = check(&inner, &partitions).await {
                    tracing::debug!(redis = %shard.name, error = %e, "feed sequence check failed");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn run(inner: Arc<Inner>, s: usize, ready: oneshot::Sender<()>) {
    let partitions: Vec<u32> = (0..inner.keys.partitions()).filter(|p| inner.shard_of[*p as usize] == s).collect();
    let by_feed: HashMap<String, u32> = partitions.iter().map(|p| (inner.keys.feed(*p), *p)).collect();
    let shard = &inner.shards[s];
    let mut stop = inner.stop.subscribe();
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        if *stop.borrow() {
            return;
        }
        let Conn::Single { client, .. } = &shard.conn else { return };
        let connected = async {
            let mut pubsub = tokio::time::timeout(inner.options.connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| "no answer".to_string())?
                .map_err(|e| e.to_string())?;
            let names: Vec<&String> = by_feed.keys().collect();
            tokio::time::timeout(inner.options.timeout, pubsub.subscribe(names))
                .await
                .map_err(|_| "no answer to SUBSCRIBE".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        }
        .await;
        let pubsub = match connected {
            Ok(p) => p,
            Err(e) => {
                if shard.feed_up.swap(false, Ordering::Relaxed) || first {
                    tracing::warn!(redis = %shard.name, error = %e, "feed not connected; retrying");
                }
                *shard.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("feed: {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        if !first {
            shard.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(redis = %shard.name, "feed connected again; reading back what was missed");
        }
        first = false;
        let mut messages = pubsub.into_on_message();
        // What was committed while this node was not subscribed.
        if let Err(e) = check(&inner, &partitions).await {
            tracing::warn!(redis = %shard.name, error = %e, "could not read the feed sequence");
        }
        shard.feed_up.store(true, Ordering::Relaxed);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let mut tick = tokio::time::interval(inner.options.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = std::future::poll_fn(|cx| futures_core_poll(&mut messages, cx)) => match msg {
                    Some(msg) => {
                        let Some(p) = by_feed.get(msg.get_channel_name()).copied() else { continue };
                        shard.received.fetch_add(1, Ordering::Relaxed);
                        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                        if let Err(e) = receive(&inner, p, payload).await {
                            tracing::warn!(redis = %shard.name, error = %e, "could not read back missed feed messages");
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if let Err(e) = check(&inner, &partitions).await {
                        tracing::debug!(redis = %shard.name, error = %e, "feed sequence check failed");
                    }
                }
                _ = stop.changed() => return,
            }
        }
        shard.feed_up.store(false, Ordering::Relaxed);
        tracing::warn!(redis = %shard.name, "feed connection lost; reconnecting");
    }
}

/// `Stream::poll_next` without a dependency on a stream crate.
fn futures_core_poll<S: futures_core::Stream + Unpin>(
    s: &mut S,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Option<S::Item>> {
    std::pin::Pin::new(s).poll_next(cx)
}

/// A payload from pub/sub for partition `p`.
async fn receive(inner: &Inner, p: u32, payload: Bytes) -> Result<(), StoreError> {
    let Some(item) = wire::decode(payload) else {
        tracing::warn!(partition = p, "a feed payload this version cannot read; re-reading the partition");
        return resync(inner, p).await;
    };
    let q = item.q();
    let seen = inner.seen[p as usize].load(Ordering::Acquire);
    if seen != UNKNOWN && q <= seen {
        return Ok(()); // read back from the log already
    }
    if seen != UNKNOWN && q > seen + 1 {
        recover(inner, p, seen + 1, q - 1).await?;
    }
    if let wire::Item::Messages { messages, .. } = &item
        && let Some(m) = messages.last()
    {
        inner.feed_lag_ms.store((now_ms() - m.time).max(0), Ordering::Relaxed);
    }
    hand_on(inner, p, item);
    Ok(())
}

/// Hands one payload to the sink and records its sequence number.
fn hand_on(inner: &Inner, p: u32, item: wire::Item) {
    inner.seen[p as usize].store(item.q(), Ordering::Release);
    match item {
        wire::Item::Messages { messages, .. } => {
            inner.known[p as usize].store(true, Ordering::Relaxed);
            inner.heads.committed(&messages);
            inner.config.sink.committed(&messages);
        }
        wire::Item::Signal { signal, .. } => inner.config.sink.signaled(&signal),
    }
}

/// Reads sequence numbers `from..=to` of partition `p` back from its log and
/// hands them on; where the log no longer holds them, re-reads the heads.
async fn recover(inner: &Inner, p: u32, from: u64, to: u64) -> Result<(), StoreError> {
    let shard = inner.shard(p);
    let mut next = from;
    while next <= to {
        let entries: Vec<Value> = shard
            .query(
                redis::cmd("XRANGE")
                    .arg(inner.keys.log(p))
                    .arg(format!("{next}-0"))
                    .arg(format!("{to}-0"))
                    .arg("COUNT")
                    .arg(512),
            )
            .await?;
        if entries.is_empty() {
            break;
        }
        for e in entries {
            let Some(item) = log_entry(e) else { continue };
            if item.q() != next {
                // The log was trimmed past what this node missed.
                tracing::warn!(
                    partition = p,
                    missed_from = next,
                    log_from = item.q(),
                    "feed log no longer reaches back"
                );
                resync(inner, p).await?;
            }
            next = item.q() + 1;
            shard.recovered.fetch_add(1, Ordering::Relaxed);
            hand_on(inner, p, item);
        }
    }
    if next <= to {
        resync(inner, p).await?;
        inner.seen[p as usize].store(to, Ordering::Release);
    }
    Ok(())
}

/// A log entry `[id, ["p", payload]]` decoded.
fn log_entry(v: Value) -> Option<wire::Item> {
    let Value::Array(mut parts) = v else { return None };
    let Value::Array(mut fields) = parts.pop()? else { return None };
    match fields.pop()? {
        Value::BulkString(b) => wire::decode(Bytes::from(b)),
        _ => None,
    }
}

/// Compares each partition's sequence in Redis with what was handed on.
async fn check(inner: &Inner, partitions: &[u32]) -> Result<(), StoreError> {
    let Some(&first) = partitions.first() else { return Ok(()) };
    let shard = inner.shard(first);
    let records: Vec<(Option<u64>, Option<String>)> = if shard.is_cluster() {
        // Each partition's record is on the master of its slot.
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            out.push(shard.query(redis::cmd("HMGET").arg(inner.keys.part(*p)).arg("q").arg("run")).await?);
        }
        out
    } else {
        let mut pipe = redis::pipe();
        for p in partitions {
            pipe.cmd("HMGET").arg(inner.keys.part(*p)).arg("q").arg("run");
        }
        shard.pipe(&pipe).await?
    };
    for (&p, (q, run)) in partitions.iter().zip(records) {
        // Ids were given out here (a publish records the Redis run): if the
        // record goes missing, Redis lost it, and ids must not start over.
        if run.is_some() {
            inner.known[p as usize].store(true, Ordering::Relaxed);
        }
        let q = q.unwrap_or(0);
        let seen = inner.seen[p as usize].load(Ordering::Acquire);
        if seen == UNKNOWN {
            // Start: what came before is history, read by whoever wants it.
            inner.seen[p as usize].store(q, Ordering::Release);
        } else if q > seen {
            recover(inner, p, seen + 1, q).await?;
        } else if q < seen {
            tracing::warn!(
                partition = p,
                redis_q = q,
                seen,
                "Redis went back (restarted without its last writes, or wiped); following it from here"
            );
            inner.seen[p as usize].store(q, Ordering::Release);
            resync(inner, p).await?;
        }
    }
    Ok(())
}

/// Where the log cannot tell what was missed: hands on the head message of
/// every channel of partition `p` that someone here listens to and whose
/// head moved past what this node knows. Subscribers behind it see the ids
/// jump and read the rest from the store by their own cursors. Signals that
/// may have been lost are announced with [`Signal::RESYNC`].
async fn resync(inner: &Inner, p: u32) -> Result<(), StoreError> {
    inner.resyncs.fetch_add(1, Ordering::Relaxed);
    let shard = inner.shard(p);
    let (channels, filters) = inner.config.sink.interest();
    let mut wanted: Vec<Channel> = channels.into_iter().filter(|c| inner.keys.channel_partition(c) == p).collect();
    for f in filters {
        let names: Vec<String> = shard
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(inner.keys.names(p))
                    .arg(format!("[{}", f.literal_prefix()))
                    .arg(format!("({}\u{7f}", f.literal_prefix())),
            )
            .await?;
        wanted.extend(names.iter().filter_map(|n| Channel::parse(n).ok()).filter(|c| f.matches(c)));
    }
    wanted.sort();
    wanted.dedup();
    for ch in wanted {
        let head: Option<u64> = shard.query(redis::cmd("HGET").arg(inner.keys.heads(p)).arg(ch.as_str())).await?;
        let head = head.unwrap_or(0);
        if head == 0 || inner.heads.get(&ch).is_some_and(|h| h >= head) {
            continue;
        }
        let last: Vec<Value> = shard
            .query(redis::cmd("XREVRANGE").arg(inner.keys.stream(p, &ch)).arg("+").arg("-").arg("COUNT").arg(1))
            .await?;
        if let Some(m) = last.into_iter().next().and_then(|e| wire::entry(&ch, e)) {
            let msgs = [m];
            inner.heads.committed(&msgs);
            inner.config.sink.committed(&msgs);
        }
    }
    inner.config.sink.signaled(&Signal::new(Signal::RESYNC, "", Bytes::new()));
    Ok(())
}
