//! Jobs as messages commit: a hub listener that schedules the fallback of
//! each notification (the user's `fallback` job at the notification's due
//! time, or a `fanout` job for a group or everyone notification) and
//! forwards messages on channels a `[[webhooks.channels]]` rule matches.
//!
//! It runs after the commit, so a crash in between leaves a notification or
//! message without its job; the sweep finds those. A listener that falls
//! behind (its mailbox overflowed) asks for a sweep instead of reading back.

use std::sync::Arc;

use herald_core::{Filter, Hub, Message, Target, inbox};
use herald_store::{Changes, now_ms};
use tokio_util::sync::CancellationToken;

use super::{Outbound, Spec, fallback, fanout::Fanout, forward};

pub(crate) fn spawn(ob: &Arc<Outbound>, hub: &Arc<Hub>, shutdown: CancellationToken) {
    let fallback = ob.config.fallback.enabled;
    let mut targets = Vec::new();
    if fallback {
        targets.push(Target::Filter(Filter::parse("user/+").expect("valid")));
        if ob.config.fallback.groups {
            targets.push(Target::Filter(Filter::parse("$group/+").expect("valid")));
            targets.push(Target::Channel(inbox::all_channel()));
        }
    }
    targets.extend(ob.rules.iter().map(|r| Target::from_filter(r.filter.clone())));
    if targets.is_empty() {
        return;
    }
    let mut sub = hub.subscriber();
    for t in targets {
        sub.add(t);
    }
    let ob = ob.clone();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = sub.recv() => match m { Some(m) => m, None => return },
            };
            let mut batch = vec![first];
            while let Some(m) = sub.try_recv() {
                batch.push(m);
            }
            if sub.take_lagged() {
                ob.sweep_now.notify_one();
            }
            if fallback && let Err(e) = schedule(&ob, &batch).await {
                tracing::warn!(error = %e, "could not schedule fallbacks; the sweep will");
            }
            forward_all(&ob, &batch).await;
        }
    });
}

/// The fallback jobs of the notifications in `batch`.
async fn schedule(ob: &Outbound, batch: &[Arc<Message>]) -> Result<(), herald_store::JobError> {
    let mut jobs = Vec::new();
    for m in batch {
        let Spec::On { delay_ms, .. } = Spec::of(m, &ob.config.fallback) else { continue };
        let due = m.time + delay_ms;
        if let Some(user) = m.channel.inbox_owner() {
            jobs.push(fallback::job(user, due));
        } else if m.channel.as_str() == inbox::ALL_CHANNEL || m.channel.as_str().starts_with("$group/") {
            jobs.push(Fanout::job(&m.channel, m.id, due));
        }
    }
    if !jobs.is_empty() {
        ob.jobs.submit(Changes { jobs, records: vec![] }, now_ms()).await?;
        ob.wake.notify_one();
    }
    Ok(())
}

/// Forwards each (rule, channel) the batch touched.
async fn forward_all(ob: &Outbound, batch: &[Arc<Message>]) {
    for rule in &ob.rules {
        let mut channels: Vec<_> = batch.iter().map(|m| &m.channel).filter(|c| rule.filter.matches(c)).collect();
        channels.dedup();
        for channel in channels {
            if let Err(e) = forward::catch_up(ob, rule, channel).await {
                tracing::warn!(error = %e, %channel, "could not forward; the sweep will");
            }
        }
    }
}
