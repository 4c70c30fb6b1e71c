//! The moderation webhook (`[moderation.webhook]`): after the built-in rules,
//! a client's publish is sent to the operator's service, which accepts it,
//! rejects it with a reason, or returns the data to store instead.
//!
//! The request is `POST` with `{"channel","event","data","user","transport"}`
//! (and `"encoding":"base64"` beside binary data), signed as every outbound
//! request is (`webhook.rs`: Standard Webhooks). The answer must be `200`
//! with `{"action":"accept"}`, `{"action":"reject","reason":".."}` or
//! `{"action":"modify","data":..}`; anything else, or nothing within the
//! timeout, is an error, and `on_error` decides what an error means.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use herald_core::{Channel, Data, DataKind, EventName, Filter};
use serde::Deserialize;

use crate::{
    config::{ModerationWebhook, OnError},
    webhook::{Secret, http_client},
};

pub struct Hook {
    url: String,
    secret: Secret,
    channels: Vec<Filter>,
    pub on_error: OnError,
    timeout: Duration,
    client: reqwest::Client,
    /// `webhook-id`s are this process's random prefix and a counter.
    id_prefix: String,
    next_id: AtomicU64,
}

/// What the operator's service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Accept,
    Reject(String),
    Modify(Data),
}

/// Why the webhook gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("could not reach it: {0}")]
    Unreachable(String),
    #[error("answered {0}, not 200")]
    Status(u16),
    #[error("answered something other than an accept, reject or modify action: {0}")]
    Answer(String),
}

/// The answer, flat: the `action` decides which fields count. (Not a
/// tagged enum: serde cannot buffer the raw `data` through one.)
#[derive(Deserialize)]
struct Wire {
    action: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

/// One publish as the webhook sees it.
pub struct Request<'a> {
    pub channel: &'a Channel,
    pub event: Option<&'a EventName>,
    pub data: &'a Data,
    pub user: Option<&'a str>,
    pub transport: &'static str,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook").field("url", &self.url).field("on_error", &self.on_error).finish_non_exhaustive()
    }
}

impl Hook {
    /// `None` when no URL is set.
    pub fn new(cfg: &ModerationWebhook) -> Result<Option<Hook>, String> {
        let Some((url, secret, channels)) = Self::check(cfg)? else { return Ok(None) };
        Ok(Some(Hook {
            url,
            secret,
            channels,
            on_error: cfg.on_error,
            timeout: cfg.timeout,
            client: http_client(cfg.timeout),
            id_prefix: random_prefix(),
            next_id: AtomicU64::new(1),
        }))
    }

    /// Checks the settings (the HTTP client is built only by `new`):
    /// `None` when no URL is set.
    #[allow(clippy::type_complexity)]
    pub fn check(cfg: &ModerationWebhook) -> Result<Option<(String, Secret, Vec<Filter>)>, String> {
        if cfg.url.trim().is_empty() {
            return Ok(None);
        }
        let url = cfg.url.trim();
        reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| format!("[moderation.webhook] url: '{url}' is not an http(s) URL"))?;
        let secret = Secret::parse(&cfg.secret).map_err(|e| {
            format!("[moderation.webhook] secret: {e} (every moderation request is signed, so it is required)")
        })?;
        if cfg.timeout.is_zero() {
            return Err("[moderation.webhook] timeout must be longer than 0".into());
        }
        let channels = cfg
            .channels
            .iter()
            .map(|c| Filter::parse(c).map_err(|e| format!("[moderation.webhook] channels: '{c}': {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Some((url.to_owned(), secret, channels)))
    }

    pub fn covers(&self, channel: &Channel) -> bool {
        self.channels.iter().any(|f| f.matches(channel))
    }

    /// Asks the operator's service about one publish.
    pub async fn ask(&self, req: &Request<'_>) -> Result<Answer, HookError> {
        let body = body(req);
        let id = format!("msg_{}{:x}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed));
        let timestamp = herald_store::now_ms().max(0) as u64 / 1000;
        let mut request = self.client.post(&self.url).header("content-type", "application/json");
        for (name, value) in self.secret.headers(&id, timestamp, &body) {
            request = request.header(name, value);
        }
        let res = request.body(body).send().await.map_err(|e| self.classify(e))?;
        if res.status() != reqwest::StatusCode::OK {
            return Err(HookError::Status(res.status().as_u16()));
        }
        let bytes = res.bytes().await.map_err(|e| self.classify(e))?;
        let wire: Wire = serde_json::from_slice(&bytes).map_err(|e| HookError::Answer(e.to_string()))?;
        match (wire.action.as_str(), wire.data) {
            ("accept", _) => Ok(Answer::Accept),
            ("reject", _) => Ok(Answer::Reject(wire.reason.unwrap_or_default())),
            ("modify", Some(data)) => Ok(Answer::Modify(crate::api::publish::data_from_json(data.get()))),
            ("modify", None) => Err(HookError::Answer("'modify' without 'data'".into())),
            (other, _) => Err(HookError::Answer(format!("unknown action '{other}'"))),
        }
    }

    fn classify(&self, e: reqwest::Error) -> HookError {
        if e.is_timeout() {
            // The client's timeout is the whole request's.
            return HookError::Timeout(self.timeout);
        }
        // The cause chain says what failed (connection refused, reset).
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        HookError::Unreachable(text)
    }
}

/// `{"channel","event","data","user","transport"}`.
fn body(req: &Request<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(req.data.len() + 128);
    out.extend_from_slice(b"{\"channel\":");
    serde_json::to_writer(&mut out, req.channel.as_str()).expect("vec write");
    out.extend_from_slice(b",\"event\":");
    serde_json::to_writer(&mut out, &req.event.map(EventName::as_str)).expect("vec write");
    out.extend_from_slice(b",\"data\":");
    req.data.write_json(&mut out);
    if req.data.kind() == DataKind::Binary {
        out.extend_from_slice(b",\"encoding\":\"base64\"");
    }
    out.extend_from_slice(b",\"user\":");
    serde_json::to_writer(&mut out, &req.user).expect("vec write");
    out.extend_from_slice(b",\"transport\":");
    serde_json::to_writer(&mut out, req.transport).expect("vec write");
    out.push(b'}');
    out
}

/// Eight random bytes in hex: ids stay unique across restarts.
fn random_prefix() -> String {
    use std::io::Read;
    let mut buf = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if buf == [0; 8] {
        // No /dev/urandom: the clock still tells restarts apart.
        buf = (herald_store::now_ms() as u64).to_be_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect::<String>() + "_"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_body_names_everything_the_operator_needs() {
        let channel = Channel::parse("chat/room").unwrap();
        let event = EventName::parse("chat").unwrap();
        let json = Data::json(r#"{"msg":"hi"}"#.into()).unwrap();
        let req = Request { channel: &channel, event: Some(&event), data: &json, user: Some("alice"), transport: "ws" };
        let v: serde_json::Value = serde_json::from_slice(&body(&req)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"chat/room","event":"chat","data":{"msg":"hi"},"user":"alice","transport":"ws"})
        );
        let bin = Data::sniff(vec![0xff, 0x00].into());
        let req = Request { channel: &channel, event: None, data: &bin, user: None, transport: "mqtt" };
        let v: serde_json::Value = serde_json::from_slice(&body(&req)).unwrap();
        assert_eq!(
            (v["data"].as_str(), v["encoding"].as_str(), &v["user"]),
            (Some("/wA="), Some("base64"), &serde_json::Value::Null)
        );
    }

    #[test]
    fn configuration_is_checked() {
        let cfg = |url: &str, secret: &str| ModerationWebhook {
            url: url.into(),
            secret: secret.into(),
            ..ModerationWebhook::default()
        };
        assert!(Hook::new(&cfg("", "")).unwrap().is_none());
        let good = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        assert!(Hook::new(&cfg("http://127.0.0.1:9/x", good)).unwrap().is_some());
        assert!(Hook::new(&cfg("ftp://x", good)).unwrap_err().contains("url"));
        assert!(Hook::new(&cfg("http://127.0.0.1:9/x", "")).unwrap_err().contains("secret"));
    }
}
