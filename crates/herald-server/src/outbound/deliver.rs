//! Sending: a `deliver` job sends one digest through one channel (a
//! `notification.unread` webhook or an e-mail); a `publish` job sends one
//! `message.published` event to one endpoint.
//!
//! Each job carries its delivery id, made when the job was, so every attempt
//! of it — retries, and the one repeat a crash can cause — has the same
//! `webhook-id` or `Message-ID`. A failure is retried on `[fallback] retry`
//! (with jitter) or as a `Retry-After` asked; when the schedule is spent, or
//! the failure is permanent, the job is dead, and the next channel of a
//! `first` fallback takes over in the same store write. A channel that cannot
//! be used at all (no endpoint, no address, an endpoint disabled by 410) is
//! skipped the same way.

use std::time::{Duration, Instant};

use herald_store::{After, Changes, Claimed, Expect, JobError, NewJob, RecordWrite, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Attempt, Outbound, Outcome, fallback::Note, keys, rate::Limiter};
use crate::config::Via;

/// Notifications listed in one event or mail (the newest); the count says
/// how many the digest holds.
const LISTED: usize = 20;
/// Entries kept in a user's `sent/{user}` record.
const SENT_KEPT: usize = 20;

/// One user's digest: what a `notification.unread` event or a fallback mail says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Digest {
    pub(crate) user: String,
    /// The user's unread count when it was decided.
    pub(crate) unread: u64,
    /// Notifications in the digest.
    pub(crate) count: usize,
    /// The newest of them (at most `LISTED`), newest first, as the inbox
    /// API shows them.
    pub(crate) notifications: Vec<Value>,
    /// When it was decided (ms): the event's timestamp.
    pub(crate) at: i64,
}

impl Digest {
    pub(crate) fn of(user: &str, unread: u64, notes: &[&Note], at: i64) -> Digest {
        let mut sorted: Vec<&&Note> = notes.iter().collect();
        sorted.sort_by(|a, b| b.msg.time.cmp(&a.msg.time).then(b.msg.id.cmp(&a.msg.id)));
        Digest {
            user: user.to_owned(),
            unread,
            count: notes.len(),
            notifications: sorted.iter().take(LISTED).map(|n| crate::api::inbox::notification(&n.msg)).collect(),
            at,
        }
    }

    /// The `notification.unread` event.
    fn event(&self) -> Value {
        json!({
            "type": "notification.unread",
            "timestamp": herald_core::time::rfc3339_ms(self.at),
            "data": { "user": self.user, "unread": self.unread, "notifications": self.notifications },
        })
    }

    /// What the mail templates see.
    fn template_context(&self) -> Value {
        let first = self.notifications.first();
        json!({
            "user": self.user,
            "unread": self.unread,
            "count": self.count,
            "more": self.count.saturating_sub(1),
            "title": first.map_or(Value::Null, |n| n["title"].clone()),
            "body": first.map_or(Value::Null, |n| n["body"].clone()),
            "notifications": self.notifications,
        })
    }
}

/// A `deliver` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    /// The `webhook-id`, or the local part of the `Message-ID`.
    pub(crate) id: String,
    pub(crate) via: Via,
    /// The channels to try next if this one fails for good (`first`).
    pub(crate) then: Vec<Via>,
    pub(crate) digest: Digest,
}

impl Delivery {
    pub(crate) fn new(via: Via, then: Vec<Via>, digest: Digest) -> Self {
        Delivery { id: keys::delivery_id(), via, then, digest }
    }

    pub(crate) fn job(&self, due: i64) -> NewJob {
        NewJob { kind: keys::DELIVER.into(), key: None, due, payload: serde_json::to_vec(self).expect("serialisable") }
    }

    /// The delivery through the next channel, if any is left.
    fn next(&self) -> Option<Delivery> {
        let (via, rest) = self.then.split_first()?;
        Some(Delivery::new(*via, rest.to_vec(), self.digest.clone()))
    }
}

/// A `publish` job: one `message.published` event for one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Publish {
    pub(crate) id: String,
    /// The rule's id (its secret is looked up by it).
    pub(crate) rule: String,
    pub(crate) url: String,
    /// The event, as sent.
    pub(crate) body: String,
}

impl Publish {
    pub(crate) fn job(&self, due: i64) -> NewJob {
        NewJob { kind: keys::PUBLISH.into(), key: None, due, payload: serde_json::to_vec(self).expect("serialisable") }
    }
}

/// Why a channel cannot be used for a delivery.
type Unusable = String;

/// Runs a `deliver` job.
pub(crate) async fn deliver(ob: &Outbound, c: &Claimed, d: Delivery) -> Result<(), JobError> {
    let attempt = match usable(ob, &d).await? {
        Err(reason) => {
            ob.sends.count(d.via, Outcome::Skipped);
            let changes = follow_up(&d, now_ms());
            return finish_logged(ob, c, After::Done, changes, &d, "skipped", Some(reason)).await;
        }
        Ok(Target::Webhook(url)) => {
            if let Some(due) = paced(ob, &ob.webhook_rate, &url).await {
                return ob.jobs.finish(c.lease, After::Release { due }, Changes::default(), now_ms()).await;
            }
            let secret = ob.secret(keys::NOTIFY).expect("usable() checked it is configured");
            let body = serde_json::to_vec(&d.digest.event()).expect("serialisable");
            let attempt = super::webhooks::post(&ob.http, &url, secret, &d.id, body).await;
            if attempt == Attempt::Gone {
                disable(ob, &url).await?;
            }
            attempt
        }
        Ok(Target::Email(to)) => {
            let mailer = ob.mailer.as_ref().expect("usable() checked there is one");
            if let Some(due) = paced(ob, &ob.smtp_rate, "smtp").await {
                return ob.jobs.finish(c.lease, After::Release { due }, Changes::default(), now_ms()).await;
            }
            let (subject, body) = mailer.render(&d.digest.template_context());
            let message_id = format!("<{}@{}>", d.id, mailer.domain());
            mailer.send(&to, subject, body, message_id).await
        }
    };
    let now = now_ms();
    match ob.after_attempt(&c.job, d.via, attempt, now) {
        After::Done => finish_logged(ob, c, After::Done, Changes::default(), &d, "sent", None).await,
        After::Dead { error } => {
            let changes = follow_up(&d, now);
            finish_logged(ob, c, After::Dead { error: error.clone() }, changes, &d, "failed", Some(error)).await
        }
        retry => ob.jobs.finish(c.lease, retry, Changes::default(), now).await,
    }
}

/// Runs a `publish` job.
pub(crate) async fn publish(ob: &Outbound, c: &Claimed, p: Publish) -> Result<(), JobError> {
    let rule = ob.rules.iter().find(|r| r.id == p.rule && r.url == p.url);
    let Some(secret) = rule.and_then(|r| ob.secret(&r.id)) else {
        ob.sends.count(Via::Webhook, Outcome::Skipped);
        let error = "the rule is no longer configured".to_owned();
        return ob.jobs.finish(c.lease, After::Dead { error }, Changes::default(), now_ms()).await;
    };
    if ob.jobs.record(keys::disabled(&p.url)).await?.is_some() {
        ob.sends.count(Via::Webhook, Outcome::Skipped);
        let error = "the endpoint is disabled (it answered 410 Gone)".to_owned();
        return ob.jobs.finish(c.lease, After::Dead { error }, Changes::default(), now_ms()).await;
    }
    if let Some(due) = paced(ob, &ob.webhook_rate, &p.url).await {
        return ob.jobs.finish(c.lease, After::Release { due }, Changes::default(), now_ms()).await;
    }
    let attempt = super::webhooks::post(&ob.http, &p.url, secret, &p.id, p.body.into_bytes()).await;
    if attempt == Attempt::Gone {
        disable(ob, &p.url).await?;
    }
    let now = now_ms();
    let after = ob.after_attempt(&c.job, Via::Webhook, attempt, now);
    ob.jobs.finish(c.lease, after, Changes::default(), now).await
}

enum Target {
    Webhook(String),
    Email(String),
}

/// Where a delivery goes, or why it cannot go through its channel.
async fn usable(ob: &Outbound, d: &Delivery) -> Result<Result<Target, Unusable>, JobError> {
    Ok(match d.via {
        Via::Webhook => {
            let url = &ob.config.webhooks.url;
            if url.is_empty() {
                Err("no [webhooks] url is configured".into())
            } else if ob.jobs.record(keys::disabled(url)).await?.is_some() {
                Err("the endpoint is disabled (it answered 410 Gone)".into())
            } else {
                Ok(Target::Webhook(url.clone()))
            }
        }
        Via::Email => match &ob.mailer {
            None => Err("no [smtp] url is configured".into()),
            Some(_) => match super::contact_email(ob, &d.digest.user).await? {
                Some(to) => Ok(Target::Email(to)),
                None => Err("the user has no e-mail address".into()),
            },
        },
    })
}

/// Waits for the channel's send rate, if only briefly; a longer wait puts
/// the job back (its due time returned) instead of holding its lease.
async fn paced(ob: &Outbound, limiter: &Limiter, key: &str) -> Option<i64> {
    let longest = ob.config.jobs.lease / 4;
    loop {
        match limiter.check(key, Instant::now()) {
            Ok(()) => return None,
            Err(wait) if wait <= longest => tokio::time::sleep(wait).await,
            Err(wait) => return Some(now_ms() + wait.as_millis() as i64),
        }
    }
}

/// Records that `url` answered 410: its jobs die and no new ones are made
/// until a dead one is retried through the API.
async fn disable(ob: &Outbound, url: &str) -> Result<(), JobError> {
    tracing::warn!(url, "webhook endpoint answered 410 Gone; disabled");
    let write = RecordWrite { key: keys::disabled(url), expect: Expect::Any, value: Some(now_ms().to_string().into()) };
    ob.jobs.submit(Changes { jobs: vec![], records: vec![write] }, now_ms()).await.map(drop)
}

/// The next channel's delivery, due now, if there is one.
fn follow_up(d: &Delivery, now: i64) -> Changes {
    Changes { jobs: d.next().map(|n| n.job(now)).into_iter().collect(), records: vec![] }
}

/// Finishes a delivery that ended (sent, failed for good, skipped) and adds
/// it to the user's `sent/{user}` record in the same write; on a conflict
/// (another delivery for the user ended meanwhile) reads the record again.
/// The send itself is never repeated for it.
async fn finish_logged(
    ob: &Outbound,
    c: &Claimed,
    after: After,
    changes: Changes,
    d: &Delivery,
    outcome: &str,
    error: Option<String>,
) -> Result<(), JobError> {
    let now = now_ms();
    let key = keys::sent(&d.digest.user);
    let entry = json!({
        "id": d.id,
        "via": d.via.as_str(),
        "time": herald_core::time::rfc3339_ms(now),
        "outcome": outcome,
        "error": error,
        "count": d.digest.count,
        "notifications": d.digest.notifications.iter().map(|n| n["id"].clone()).collect::<Vec<_>>(),
    });
    for _ in 0..8 {
        let record = ob.jobs.record(key.clone()).await?;
        let (mut log, version) = match record {
            Some(r) => (serde_json::from_slice::<Vec<Value>>(&r.value).unwrap_or_default(), r.version),
            None => (Vec::new(), 0),
        };
        log.insert(0, entry.clone());
        log.truncate(SENT_KEPT);
        let mut all = changes.clone();
        all.records.push(RecordWrite {
            key: key.clone(),
            expect: Expect::Version(version),
            value: Some(serde_json::to_vec(&log).expect("serialisable")),
        });
        match ob.jobs.finish(c.lease, after.clone(), all, now).await {
            Err(JobError::Conflict(_)) => continue,
            other => return other,
        }
    }
    // Still contended: end the job without its log entry rather than risk
    // sending again.
    ob.jobs.finish(c.lease, after, changes, now).await
}

impl Outbound {
    /// How a job ends after an attempt, counted in the stats: done, retried
    /// on the schedule (or after the receiver's `Retry-After`), or dead.
    pub(crate) fn after_attempt(&self, job: &herald_store::Job, via: Via, attempt: Attempt, now: i64) -> After {
        let after = match attempt {
            Attempt::Sent => After::Done,
            Attempt::Again { error, after } => self.after_failure(job, error, after, now),
            Attempt::Never(error) => After::Dead { error },
            Attempt::Gone => After::Dead { error: "410 Gone: the endpoint is disabled".into() },
        };
        self.sends.count(
            via,
            match after {
                After::Done => Outcome::Sent,
                After::Dead { .. } => Outcome::Dead,
                _ => Outcome::Retried,
            },
        );
        after
    }

    /// A failed attempt: again after the schedule's next wait (±20%, so
    /// jobs that failed together do not retry together), or dead when the
    /// schedule is spent.
    pub(crate) fn after_failure(
        &self,
        job: &herald_store::Job,
        error: String,
        asked: Option<Duration>,
        now: i64,
    ) -> After {
        let schedule = &self.config.fallback.retry;
        let Some(wait) = schedule.get(job.attempts.saturating_sub(1) as usize) else {
            return After::Dead { error: format!("{error} (after {} attempts)", job.attempts) };
        };
        let wait = asked.unwrap_or_else(|| wait.mul_f64(0.8 + 0.4 * fastrand::f64()));
        After::Retry { due: now + wait.as_millis() as i64, error }
    }
}
