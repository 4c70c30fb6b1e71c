//! Outbound delivery: what Herald sends to the world outside its own
//! connections, durably and at least once.
//!
//! - `fallback.rs` decides what a user is owed: notifications still unread
//!   after their delay, at most one digest per `min_interval`;
//!   `fanout.rs` finds, for a group or everyone notification, the members who
//!   have not read it;
//! - `forward.rs` turns messages on channels matching a `[[webhooks.channels]]`
//!   rule into `message.published` events;
//! - `deliver.rs` sends one digest through one channel, or one event to one
//!   endpoint, with `webhooks.rs` (signed HTTP) and `email.rs` (SMTP) doing
//!   one attempt each, `templates.rs` writing the mail and `rate.rs` pacing
//!   the sends;
//! - `jobs.rs` is the worker loop: it claims due jobs from the store's
//!   `JobStore` and runs them; `listen.rs` creates jobs as notifications and
//!   messages commit; `sweep.rs` rebuilds jobs the store lacks from the
//!   inbox's unread state and the channels' heads, so a lost job makes a send
//!   late, never lost.
//!
//! Every step that hands work to the next (a decision to its deliveries, a
//! failed channel to the next one, a forwarded message to its event) does
//! so in the same atomic store write that ends the step.

mod deliver;
pub(crate) mod email;
mod fallback;
mod fanout;
mod forward;
mod jobs;
pub(crate) mod keys;
mod listen;
mod rate;
mod sweep;
pub(crate) mod templates;
mod webhooks;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use herald_core::{Filter, Hub};
use herald_store::{Expect, InboxStore, JobError, JobStore, RecordWrite, Store, now_ms};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub(crate) use fallback::Spec;

use crate::{
    config::{Config, Via},
    inbox::Inbox,
    webhook::Secret,
};

/// How one attempt to send went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    Sent,
    /// Failed this time; worth another attempt (after `after`, when the
    /// receiver said so).
    Again {
        error: String,
        after: Option<Duration>,
    },
    /// Will never work (SMTP 5xx, an invalid address): a dead letter at once.
    Never(String),
    /// The endpoint answered 410 Gone: it is disabled.
    Gone,
}

/// Sends by channel and outcome, for `/api/stats`.
#[derive(Default)]
pub(crate) struct SendStats {
    /// [via][outcome]: via 0 webhook, 1 e-mail; outcome as in `OUTCOMES`.
    counts: [[AtomicU64; 4]; 2],
}

/// The outcomes counted per channel.
pub(crate) const OUTCOMES: [&str; 4] = ["sent", "retried", "dead", "skipped"];

#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Sent = 0,
    Retried = 1,
    Dead = 2,
    /// Not sent: the channel cannot be used (no address, no endpoint, an
    /// endpoint disabled).
    Skipped = 3,
}

impl SendStats {
    pub(crate) fn count(&self, via: Via, outcome: Outcome) {
        self.counts[via as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self) -> Value {
        let one = |v: Via| -> Value {
            OUTCOMES
                .iter()
                .enumerate()
                .map(|(i, name)| ((*name).to_owned(), json!(self.counts[v as usize][i].load(Ordering::Relaxed))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        json!({ "webhook": one(Via::Webhook), "email": one(Via::Email) })
    }
}

/// A `[[webhooks.channels]]` rule, ready to use.
pub(crate) struct Rule {
    /// Stable across restarts while the pattern and URL stay: names the
    /// rule's progress records.
    pub(crate) id: String,
    pub(crate) filter: Filter,
    pub(crate) url: String,
}

/// The outbound side of one server: configuration, the stores it works on,
/// the senders, and what its background tasks share.
pub struct Outbound {
    pub(crate) config: Config,
    pub(crate) jobs: Arc<dyn JobStore>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) inbox_store: Arc<dyn InboxStore>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) http: reqwest::Client,
    pub(crate) mailer: Option<email::Mailer>,
    pub(crate) rules: Vec<Rule>,
    /// Signing secrets by endpoint: `[webhooks]` under `keys::NOTIFY`, each
    /// rule under its id. A job names its endpoint and signs with the secret
    /// configured now (secrets are never stored in jobs).
    pub(crate) secrets: HashMap<String, Secret>,
    pub(crate) webhook_rate: rate::Limiter,
    pub(crate) smtp_rate: rate::Limiter,
    pub(crate) sends: SendStats,
    /// When fallback was first enabled on this store: older notifications
    /// are not owed (turning it on does not mail every user their past).
    pub(crate) fallback_since: i64,
    /// When each rule was first seen (by rule id): older messages are not
    /// forwarded.
    pub(crate) forward_since: HashMap<String, i64>,
    /// Forwarding progress last written or read, by record key: (last id
    /// forwarded, record version). Saves a read per commit; a conflict
    /// drops the entry.
    pub(crate) forwarded: Mutex<HashMap<String, (u64, u64)>>,
    /// Wakes the worker when a job may have become due.
    pub(crate) wake: Notify,
    /// Asks for a sweep now (the listener fell behind).
    pub(crate) sweep_now: Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("outbound configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Jobs(#[from] JobError),
}

impl Outbound {
    /// Sets up outbound delivery and starts its tasks (on `tracker`, so the
    /// server waits for sends in flight before closing the store).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &Config,
        jobs: Arc<dyn JobStore>,
        store: Arc<dyn Store>,
        inbox_store: Arc<dyn InboxStore>,
        inbox: Arc<Inbox>,
        hub: &Arc<Hub>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, OutboundError> {
        let mailer = email::Mailer::new(&config.smtp).map_err(OutboundError::Config)?;
        let mut secrets = HashMap::new();
        let secret = |s: &str| Secret::parse(s).map_err(|e| OutboundError::Config(e.to_string()));
        if !config.webhooks.url.is_empty() {
            secrets.insert(keys::NOTIFY.to_owned(), secret(&config.webhooks.secret)?);
        }
        let mut rules = Vec::new();
        for r in &config.webhooks.channels {
            let filter = Filter::parse(&r.pattern).map_err(|e| OutboundError::Config(e.to_string()))?;
            let id = keys::rule_id(&r.pattern, &r.url);
            secrets.insert(id.clone(), secret(&r.secret)?);
            rules.push(Rule { id, filter, url: r.url.clone() });
        }
        let fallback_since = if config.fallback.enabled {
            first_seen(&*jobs, keys::since("fallback")).await?
        } else {
            // Off: turned on again later, it starts afresh from then, and
            // does not send what was notified while it was off.
            let forget = RecordWrite { key: keys::since("fallback"), expect: Expect::Any, value: None };
            jobs.submit(herald_store::Changes { jobs: vec![], records: vec![forget] }, now_ms()).await?;
            0
        };
        let mut forward_since = HashMap::new();
        for r in &rules {
            forward_since.insert(r.id.clone(), first_seen(&*jobs, keys::since(&format!("forward/{}", r.id))).await?);
        }
        let outbound = Arc::new(Outbound {
            config: config.clone(),
            jobs,
            store,
            inbox_store,
            inbox,
            http: crate::webhook::http_client(config.webhooks.timeout),
            mailer,
            rules,
            secrets,
            webhook_rate: rate::Limiter::new(config.webhooks.rate),
            smtp_rate: rate::Limiter::new(config.smtp.rate),
            sends: SendStats::default(),
            fallback_since,
            forward_since,
            forwarded: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            sweep_now: Notify::new(),
        });
        listen::spawn(&outbound, hub, shutdown.clone());
        tracker.spawn(jobs::work(outbound.clone(), shutdown.clone(), tracker.clone()));
        tokio::spawn(sweep::run(outbound.clone(), shutdown));
        Ok(outbound)
    }

    /// The secret of an endpoint (`keys::NOTIFY` or a rule's id), while the
    /// configuration names it.
    pub(crate) fn secret(&self, endpoint: &str) -> Option<&Secret> {
        self.secrets.get(endpoint)
    }

    /// The `outbound` object of `/api/stats`.
    pub async fn stats(&self) -> Value {
        let summary = self.jobs.summary().await.unwrap_or_default();
        let now = now_ms();
        let late = summary.next_due.map_or(0, |d| (now - d).max(0));
        json!({
            "fallback": self.config.fallback.enabled,
            "channels": {
                "webhook": !self.config.webhooks.url.is_empty(),
                "email": self.mailer.is_some(),
                "rules": self.rules.len(),
            },
            "jobs": { "pending": summary.pending, "running": summary.running, "dead": summary.dead },
            "oldest_due_late_ms": late,
            "sends": self.sends.json(),
        })
    }
}

/// The time recorded under `key`, recording now if nothing is there yet.
async fn first_seen(jobs: &dyn JobStore, key: String) -> Result<i64, JobError> {
    loop {
        if let Some(r) = jobs.record(key.clone()).await? {
            return Ok(std::str::from_utf8(&r.value).ok().and_then(|s| s.parse().ok()).unwrap_or(0));
        }
        let now = now_ms();
        let write = RecordWrite { key: key.clone(), expect: Expect::Version(0), value: Some(now.to_string().into()) };
        match jobs.submit(herald_store::Changes { jobs: vec![], records: vec![write] }, now).await {
            Ok(_) => return Ok(now),
            // Another node recorded it first: read theirs.
            Err(JobError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A user's e-mail address, from their `contact/{user}` record.
pub(crate) async fn contact_email(ob: &Outbound, user: &str) -> Result<Option<String>, JobError> {
    let Some(r) = ob.jobs.record(keys::contact(user)).await? else { return Ok(None) };
    Ok(serde_json::from_slice::<Value>(&r.value).ok().and_then(|v| v["email"].as_str().map(String::from)))
}

impl Outbound {
    /// A job as the API lists it: its state, and what it is for (never the
    /// contents of what it sends).
    pub(crate) fn describe(&self, job: &herald_store::Job) -> Value {
        let time = herald_core::time::rfc3339_ms;
        let payload: Value = serde_json::from_slice(&job.payload).unwrap_or(Value::Null);
        let target = match job.kind.as_str() {
            keys::DELIVER => json!({
                "delivery": payload["id"],
                "via": payload["via"],
                "then": payload["then"],
                "user": payload["digest"]["user"],
                "notifications": payload["digest"]["count"],
            }),
            keys::PUBLISH => json!({
                "delivery": payload["id"],
                "url": payload["url"],
                "rule": payload["rule"],
                "message": serde_json::from_str::<Value>(payload["body"].as_str().unwrap_or("null"))
                    .map_or(Value::Null, |b| json!({"channel": b["data"]["channel"], "id": b["data"]["id"]})),
            }),
            _ => payload,
        };
        json!({
            "id": job.id,
            "kind": job.kind,
            "state": job.state.as_str(),
            "attempts": job.attempts,
            "last_error": job.last_error,
            "due": time(job.due),
            "lease_until": job.lease_until.map(time),
            "created": time(job.created),
            "target": target,
        })
    }

    /// Revives a dead job; a send to an endpoint disabled by 410 re-enables
    /// the endpoint (retrying is the operator saying it is back).
    pub(crate) async fn retry(&self, id: herald_store::JobId) -> Result<herald_store::Job, JobError> {
        let now = now_ms();
        let dead = self.jobs.jobs(herald_store::JobState::Dead, id.saturating_sub(1), 1).await?;
        if let Some(job) = dead.iter().find(|j| j.id == id) {
            let payload: Value = serde_json::from_slice(&job.payload).unwrap_or(Value::Null);
            let url = match job.kind.as_str() {
                keys::PUBLISH => payload["url"].as_str().map(String::from),
                keys::DELIVER if payload["via"] == "webhook" => Some(self.config.webhooks.url.clone()),
                _ => None,
            };
            if let Some(url) = url.filter(|u| !u.is_empty()) {
                let write = RecordWrite { key: keys::disabled(&url), expect: Expect::Any, value: None };
                self.jobs.submit(herald_store::Changes { jobs: vec![], records: vec![write] }, now).await?;
            }
        }
        let job = self.jobs.revive(id, now).await?;
        self.wake.notify_one();
        Ok(job)
    }
}
