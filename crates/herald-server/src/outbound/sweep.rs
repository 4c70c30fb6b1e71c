//! Reconciliation: rebuilds the jobs the store should hold and does not,
//! from the state they are derived from. Runs at start (jobs that fell due
//! while Herald was down, and jobs a crash kept from being written) and then
//! every `[jobs] sweep`, or at once when the commit listener fell behind.
//!
//! - each user whose inbox channel has notifications past their fallback
//!   state gets a `fallback` job when one would do something (the dedupe key
//!   makes an existing one no more than earlier);
//! - each group or everyone notification without a finished fan-out gets
//!   its `fanout` job;
//! - each channel a forwarding rule matches is forwarded up to its head.
//!
//! A lost job therefore makes a send late by at most one sweep, never lost.

use std::sync::Arc;

use herald_core::Filter;
use herald_store::{Changes, JobError, now_ms};
use tokio_util::sync::CancellationToken;

use super::{Outbound, fallback, fanout, forward, keys};

/// Fallback jobs submitted per store write.
const BATCH: usize = 500;

pub(crate) async fn run(ob: Arc<Outbound>, shutdown: CancellationToken) {
    loop {
        match sweep(&ob).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(jobs = n, "sweep: jobs submitted (new, or merged into pending ones)"),
            Err(e) => tracing::warn!(error = %e, "sweep failed; next time"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ob.config.jobs.sweep) => {}
            _ = ob.sweep_now.notified() => {}
        }
    }
}

/// One pass; returns how many jobs it submitted (some may have merged into
/// pending ones).
pub(crate) async fn sweep(ob: &Outbound) -> Result<usize, JobError> {
    let mut n = 0;
    if ob.config.fallback.enabled {
        n += users(ob).await?;
        if ob.config.fallback.groups {
            n += fanout::reconcile(ob).await?;
        }
    }
    n += forward::reconcile(ob).await?;
    Ok(n)
}

async fn users(ob: &Outbound) -> Result<usize, JobError> {
    let now = now_ms();
    let mut jobs = Vec::new();
    let mut n = 0;
    for (channel, head) in ob.store.channels(Filter::parse("user/+").expect("valid")).await? {
        let Some(user) = channel.inbox_owner() else { continue };
        let upto = match ob.jobs.record(keys::fallback(user)).await? {
            Some(r) => serde_json::from_slice::<fallback::UserState>(&r.value).map_or(0, |s| s.handled.upto),
            None => 0,
        };
        if head <= upto {
            continue;
        }
        let a = fallback::assess(ob, user, now).await?;
        if let Some(at) = a.plan.wake_at(&a.before, now) {
            jobs.push(fallback::job(user, at));
        }
        if jobs.len() == BATCH {
            n += jobs.len();
            ob.jobs.submit(Changes { jobs: std::mem::take(&mut jobs), records: vec![] }, now).await?;
        }
    }
    if !jobs.is_empty() {
        n += jobs.len();
        ob.jobs.submit(Changes { jobs, records: vec![] }, now).await?;
    }
    if n > 0 {
        ob.wake.notify_one();
    }
    Ok(n)
}
