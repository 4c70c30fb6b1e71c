//! The worker loop: claims due jobs from the `JobStore` (as many as it has
//! free workers, with `[jobs] lease`) and runs each on its own task; when
//! nothing is due it sleeps until the next due time, a local submit, or a
//! second (other nodes' jobs), whichever is first.
//!
//! A job ends through its runner's `finish`, together with whatever it hands
//! on. When the runner fails (a store error), the job is retried on the
//! schedule; decisions and fan-outs are never given up (they stay at the
//! schedule's last wait), sends end as dead letters.

use std::{sync::Arc, time::Duration};

use herald_store::{After, Changes, Claimed, JobError, now_ms};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Outbound, deliver, fallback, fanout, keys};

/// Longest idle sleep: how soon jobs submitted by other nodes are seen.
const IDLE: Duration = Duration::from_secs(1);

pub(crate) async fn work(ob: Arc<Outbound>, shutdown: CancellationToken, tracker: TaskTracker) {
    let slots = Arc::new(Semaphore::new(ob.config.jobs.workers));
    let lease_ms = ob.config.jobs.lease.as_millis() as u64;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let free = 1 + slots.available_permits();
        let claimed = match ob.jobs.claim(now_ms(), lease_ms, free).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim jobs");
                drop(first);
                idle(&ob, &shutdown, IDLE).await;
                continue;
            }
        };
        let n = claimed.len();
        let mut first = Some(first);
        for c in claimed {
            let permit = match first.take() {
                Some(p) => p,
                None => slots.clone().try_acquire_owned().expect("only this loop takes permits, and counted them free"),
            };
            let ob = ob.clone();
            tracker.spawn(async move {
                run(&ob, c).await;
                drop(permit);
                // What it handed on may be due now.
                ob.wake.notify_one();
            });
        }
        drop(first);
        if n == free {
            continue; // maybe more are due
        }
        let wait = match ob.jobs.summary().await {
            Ok(s) => s.next_due.map_or(IDLE, |d| Duration::from_millis((d - now_ms()).max(0) as u64).min(IDLE)),
            Err(_) => IDLE,
        };
        // Never spin: a claim that found nothing waits a little at least.
        idle(&ob, &shutdown, if n == 0 { wait.max(Duration::from_millis(10)) } else { wait }).await;
    }
}

async fn idle(ob: &Outbound, shutdown: &CancellationToken, wait: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = ob.wake.notified() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

fn payload<T: DeserializeOwned>(c: &Claimed) -> Result<T, String> {
    serde_json::from_slice(&c.job.payload).map_err(|e| format!("the job's payload is unreadable: {e}"))
}

/// Runs one claimed job to its end.
async fn run(ob: &Outbound, c: Claimed) {
    let result = match c.job.kind.as_str() {
        keys::FALLBACK => match payload::<serde_json::Value>(&c) {
            Ok(p) => match p["user"].as_str() {
                Some(user) => decide(ob, &c, user).await,
                None => dead(ob, &c, "the job names no user".into()).await,
            },
            Err(e) => dead(ob, &c, e).await,
        },
        keys::FANOUT => match payload(&c) {
            Ok(task) => fanout::run(ob, &c, task).await,
            Err(e) => dead(ob, &c, e).await,
        },
        keys::DELIVER => match payload(&c) {
            Ok(d) => deliver::deliver(ob, &c, d).await,
            Err(e) => dead(ob, &c, e).await,
        },
        keys::PUBLISH => match payload(&c) {
            Ok(p) => deliver::publish(ob, &c, p).await,
            Err(e) => dead(ob, &c, e).await,
        },
        other => dead(ob, &c, format!("unknown job kind '{other}'")).await,
    };
    let now = now_ms();
    let after = match result {
        Ok(()) => return,
        Err(JobError::Stale(id)) => {
            tracing::warn!(job = id, "a job outlived its lease and was claimed again; its result was dropped");
            return;
        }
        // A record changed under it: run again at once, as a new claim.
        Err(JobError::Conflict(_)) => After::Release { due: now + 50 },
        Err(e) => {
            tracing::warn!(job = c.job.id, kind = %c.job.kind, error = %e, "job failed");
            match ob.after_failure(&c.job, e.to_string(), None, now) {
                After::Dead { error } if matches!(c.job.kind.as_str(), keys::FALLBACK | keys::FANOUT) => {
                    let last = ob.config.fallback.retry.last().copied().unwrap_or(Duration::from_secs(60));
                    After::Retry { due: now + last.as_millis() as i64, error }
                }
                after => after,
            }
        }
    };
    if let Err(e) = ob.jobs.finish(c.lease, after, Changes::default(), now).await {
        tracing::warn!(job = c.job.id, error = %e, "could not end a failed job; it runs again when its lease ends");
    }
}

/// A `fallback` job: decide, and end with what the decision hands on.
async fn decide(ob: &Outbound, c: &Claimed, user: &str) -> Result<(), JobError> {
    let now = now_ms();
    let changes = fallback::decide(ob, user, now).await?;
    ob.jobs.finish(c.lease, After::Done, changes, now).await
}

async fn dead(ob: &Outbound, c: &Claimed, error: String) -> Result<(), JobError> {
    tracing::warn!(job = c.job.id, kind = %c.job.kind, %error, "job is dead");
    ob.jobs.finish(c.lease, After::Dead { error }, Changes::default(), now_ms()).await
}
