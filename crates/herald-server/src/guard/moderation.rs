//! Content moderation of client-originated publishes: the built-in rules
//! first (`rules.rs`), then the moderation webhook (`hook.rs`) when one is
//! set and covers the channel. Every publish path (HTTP, WebSocket, MQTT)
//! passes its data through [`Moderation::check`] before the store sees it, so
//! a refused message is never stored nor delivered.
//!
//! Whose publishes: JWT users', and anonymous ones (open development mode);
//! API-key publishes (a backend) only with `[moderation] api_keys`.

use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use herald_core::{Channel, Data, EventName};

use super::{
    GuardStats,
    hook::{Answer, Hook, Request},
    rules::{Masked, Rejection, Rules},
};
use crate::{
    config::{ModerationConfig, OnError},
    edge::error::ApiError,
};

pub struct Moderation {
    rules: Rules,
    hook: Option<Hook>,
    api_keys: bool,
}

/// Why moderation refused a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A rule or the webhook rejected it.
    Rejected(Rejection),
    /// The webhook failed and fails closed.
    Unavailable(String),
}

impl Refused {
    /// `422 content_rejected` with `rule` and `reason`, or `503
    /// moderation_unavailable`.
    pub fn api_error(&self) -> ApiError {
        match self {
            Refused::Rejected(r) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "content_rejected",
                format!("the message was rejected ({}): {}", r.rule, r.reason),
            )
            .with_field("rule", r.rule)
            .with_field("reason", r.reason.clone()),
            Refused::Unavailable(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "moderation_unavailable",
                format!("the message could not be moderated ({why}); try again"),
            ),
        }
    }
}

/// One publish to moderate.
pub struct Publish<'a> {
    pub channel: &'a Channel,
    pub event: Option<&'a EventName>,
    pub user: Option<&'a str>,
    /// Published with an API key (a backend).
    pub api_key: bool,
    /// `http`, `ws` or `mqtt`.
    pub transport: &'static str,
}

impl Moderation {
    pub fn new(cfg: &ModerationConfig) -> Result<Moderation, String> {
        Ok(Moderation { rules: Rules::new(&cfg.rules)?, hook: Hook::new(&cfg.webhook)?, api_keys: cfg.api_keys })
    }

    /// Whether a publish is moderated at all.
    fn covers(&self, api_key: bool) -> bool {
        (!self.rules.is_empty() || self.hook.is_some()) && (self.api_keys || !api_key)
    }

    /// The data to store for this publish (as sent, masked, or as the
    /// webhook modified it), or why it must not be.
    pub async fn check(&self, stats: &GuardStats, p: &Publish<'_>, data: Data) -> Result<Data, Refused> {
        if !self.covers(p.api_key) {
            return Ok(data);
        }
        let mut masked = Masked::default();
        let data = match self.rules.apply(p.channel, data, &mut masked) {
            Ok(d) => d,
            Err(r) => {
                stats.rejected(r.rule);
                return Err(Refused::Rejected(r));
            }
        };
        for rule in masked.by {
            stats.masked(rule);
        }
        let Some(hook) = self.hook.as_ref().filter(|h| h.covers(p.channel)) else { return Ok(data) };
        let request = Request { channel: p.channel, event: p.event, data: &data, user: p.user, transport: p.transport };
        let w = &stats.webhook;
        match hook.ask(&request).await {
            Ok(Answer::Accept) => {
                w.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(data)
            }
            Ok(Answer::Modify(new)) => {
                w.modified.fetch_add(1, Ordering::Relaxed);
                Ok(new)
            }
            Ok(Answer::Reject(reason)) => {
                w.rejected.fetch_add(1, Ordering::Relaxed);
                stats.rejected("webhook");
                let reason = if reason.is_empty() { "the moderation service rejected it".into() } else { reason };
                Err(Refused::Rejected(Rejection { rule: "webhook", reason }))
            }
            Err(e) => {
                w.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, channel = %p.channel, "the moderation webhook failed");
                match hook.on_error {
                    OnError::Accept => {
                        w.failed_open.fetch_add(1, Ordering::Relaxed);
                        Ok(data)
                    }
                    OnError::Reject => {
                        w.failed_closed.fetch_add(1, Ordering::Relaxed);
                        Err(Refused::Unavailable(format!("the moderation service {e}")))
                    }
                }
            }
        }
    }
}
