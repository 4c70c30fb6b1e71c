//! `message.published`: every message on a channel matching a
//! `[[webhooks.channels]]` rule becomes a `publish` job for the rule's
//! endpoint (a chat backend storing its messages, say).
//!
//! Per rule and channel, a `forward/{rule}/{channel}` record holds the last
//! message id forwarded. Forwarding reads the channel after it and writes the
//! jobs and the new id together, compare-and-set: whoever gets there first
//! (the commit listener, the sweep, another node) forwards a message, and
//! only once. A channel first seen by a rule starts with the messages
//! published since the rule was (`since/forward/{rule}`); messages the
//! history dropped before they were forwarded are logged and skipped.

use herald_core::Channel;
use herald_store::{Changes, Expect, JobError, RecordWrite, now_ms};
use serde_json::json;

use super::{Outbound, Rule, deliver::Publish, keys};

/// Messages forwarded per store write.
const PAGE: usize = 256;

/// Forwards what `channel` has after the rule's record. Returns how many
/// messages became jobs.
pub(crate) async fn catch_up(ob: &Outbound, rule: &Rule, channel: &Channel) -> Result<usize, JobError> {
    let key = keys::forward(&rule.id, channel.as_str());
    let since = ob.forward_since.get(&rule.id).copied().unwrap_or(0);
    let mut forwarded = 0;
    // Bounded: a conflict means someone else forwarded meanwhile, and a full
    // page means more follow; either way the next commit or sweep goes on.
    for _ in 0..16 {
        let cached = ob.forwarded.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let (through, version) = match cached {
            Some((through, version)) => (Some(through), version),
            None => match ob.jobs.record(key.clone()).await? {
                Some(r) => (std::str::from_utf8(&r.value).ok().and_then(|s| s.parse().ok()), r.version),
                None => (None, 0),
            },
        };
        let page = ob.store.read(channel.clone(), through.unwrap_or(0), PAGE).await?;
        let Some(last) = page.messages.last().map(|m| m.id) else { return Ok(forwarded) };
        if let Some(t) = through
            && page.window.first > t + 1
        {
            tracing::warn!(channel = %channel, from = t + 1, to = page.window.first - 1,
                "messages left the history before they were forwarded");
        }
        let disabled = ob.jobs.record(keys::disabled(&rule.url)).await?.is_some();
        let now = now_ms();
        let jobs: Vec<_> = page
            .messages
            .iter()
            // A channel new to the rule: only what came after the rule did.
            .filter(|m| through.is_some() || m.time >= since)
            .filter(|_| !disabled)
            .map(|m| {
                let body = json!({
                    "type": "message.published",
                    "timestamp": herald_core::time::rfc3339_ms(m.time),
                    "data": serde_json::from_slice::<serde_json::Value>(&m.json()).expect("message JSON"),
                });
                let id = keys::delivery_id();
                Publish { id, rule: rule.id.clone(), url: rule.url.clone(), body: body.to_string() }.job(now)
            })
            .collect();
        let n = jobs.len();
        let write = RecordWrite {
            key: key.clone(),
            expect: Expect::Version(version),
            value: Some(last.to_string().into_bytes()),
        };
        match ob.jobs.submit(Changes { jobs, records: vec![write] }, now).await {
            Ok(_) => {
                forwarded += n;
                ob.forwarded.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), (last, version + 1));
                if n > 0 {
                    ob.wake.notify_one();
                }
                if page.messages.len() < PAGE {
                    return Ok(forwarded);
                }
            }
            Err(JobError::Conflict(_)) => {
                ob.forwarded.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(forwarded)
}

/// For the sweep: every channel of every rule whose head is past what was
/// forwarded.
pub(crate) async fn reconcile(ob: &Outbound) -> Result<usize, JobError> {
    let mut n = 0;
    for rule in &ob.rules {
        for (channel, head) in ob.store.channels(rule.filter.clone()).await? {
            let key = keys::forward(&rule.id, channel.as_str());
            let through = match ob.jobs.record(key).await? {
                Some(r) => std::str::from_utf8(&r.value).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
                None => 0,
            };
            if head > through {
                n += catch_up(ob, rule, &channel).await?;
            }
        }
    }
    Ok(n)
}
