//! Hidden-iframe ("forever frame") streaming:
//! `GET /api/channels/{channel}/iframe?callback=F&since=N`.
//!
//! An HTML document that never finishes loading: a small head and padding (so
//! browsers start rendering at once), then `<script>parent.F(OBJ)</script>` per
//! message, where OBJ is the message object, or `{"type":"gap",...}` for a gap.
//! OBJ is JSON with `<`, `>`, `&`, U+2028 and U+2029 written as `\uXXXX`
//! escapes: those characters can only occur inside JSON strings, where the
//! escape means the same, and without them no payload can close the script
//! element, open a comment, or break the JavaScript parse.

use std::{sync::Arc, time::Duration};

use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use herald_core::{Channel, CursorToken, Message, Principal, Since, Target, Wire};

use crate::{
    api::stats::Transport,
    edge::error::ApiError,
    edge::query::Query,
    edge::stream::{self, Encoder, Settings},
    guard::{Client, Who},
    state::SharedState,
    subscription::{Delivery, Subscription},
};

/// Browsers buffer the first bytes of a document before rendering anything.
const PADDING: usize = 2048;

/// The document grows in the browser's memory; the client reloads the frame
/// (resuming from its last id) when it ends.
const LIFETIME: Duration = Duration::from_secs(300);

pub(crate) async fn stream(
    state: SharedState,
    principal: Arc<Principal>,
    channel: Channel,
    query: &Query,
    client: Client,
    who: Who,
) -> Result<Response, ApiError> {
    let callback = query.get("callback").unwrap_or_default();
    if !is_identifier(callback) {
        return Err(ApiError::bad_request(
            "invalid_callback",
            "'callback' must be a plain JavaScript identifier (letters, digits, _ and $; at most 64)",
        ));
    }
    let since = query.get("since").map(Since::parse).transpose()?.unwrap_or(Since::After(0));
    let permit = state.admit(client, who, true)?;
    let expires_at = principal.expires_at();
    let targets = vec![Target::Channel(channel)];
    let sub = state.subscribe(principal, targets, since, &CursorToken::default(), true).await?;
    let settings = Settings {
        transport: Transport::Iframe,
        content_type: "text/html; charset=utf-8",
        heartbeat: state.config.sse.heartbeat,
        // `[sse] max_lifetime`, when set and shorter, ends these too.
        lifetime: Some(match state.config.sse.max_lifetime {
            d if !d.is_zero() => d.min(LIFETIME),
            _ => LIFETIME,
        }),
        expires_at,
        permit,
    };
    Ok(stream::respond(state, sub, IframeEncoder { callback: callback.to_owned() }, settings))
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && s.len() <= 64
}

struct IframeEncoder {
    callback: String,
}

impl IframeEncoder {
    fn call(&self, json: &[u8], buf: &mut BytesMut) {
        buf.put_slice(b"<script>parent.");
        buf.put_slice(self.callback.as_bytes());
        buf.put_u8(b'(');
        buf.put_slice(json);
        buf.put_slice(b");</script>\n");
    }
}

impl Encoder for IframeEncoder {
    fn preamble(&self) -> Bytes {
        let mut doc = String::from(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>herald</title></head><body>\n<!--",
        );
        doc.push_str(&" ".repeat(PADDING));
        doc.push_str("-->\n");
        Bytes::from(doc)
    }

    fn heartbeat(&self) -> Bytes {
        Bytes::from_static(b"<!-- keep-alive -->\n")
    }

    fn encode(&self, d: Delivery, _sub: &Subscription, buf: &mut BytesMut) {
        match d {
            Delivery::Message(m) => self.call(&m.encoded(Wire::HtmlScript, script_safe_json), buf),
            Delivery::Gap(g) => {
                let mut v = serde_json::to_value(&g).expect("a gap serialises");
                v["type"] = "gap".into();
                self.call(&escape_for_script(v.to_string().as_bytes()), buf);
            }
            Delivery::Unread(n) => self.call(format!("{{\"type\":\"unread\",\"count\":{n}}}").as_bytes(), buf),
        }
    }

    fn close(&self, code: &str, message: &str) -> Bytes {
        let mut buf = BytesMut::new();
        let v = serde_json::json!({ "type": "close", "code": code, "message": message });
        self.call(&escape_for_script(v.to_string().as_bytes()), &mut buf);
        buf.freeze()
    }
}

fn script_safe_json(m: &Message) -> Bytes {
    Bytes::from(escape_for_script(&m.json()))
}

/// Rewrites JSON so it can sit inside `<script>`: see the module comment.
fn escape_for_script(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'<' => out.extend_from_slice(b"\\u003c"),
            b'>' => out.extend_from_slice(b"\\u003e"),
            b'&' => out.extend_from_slice(b"\\u0026"),
            // U+2028 and U+2029 are E2 80 A8 / E2 80 A9 in UTF-8.
            0xE2 if json.get(i + 1) == Some(&0x80) && matches!(json.get(i + 2), Some(0xA8 | 0xA9)) => {
                out.extend_from_slice(if json[i + 2] == 0xA8 { b"\\u2028" } else { b"\\u2029" });
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["cb", "_x", "$y", "onMessage2"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "1a", "a.b", "a(b)", "alert(1)//", "a-b", "é", &"a".repeat(65)] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn nothing_can_end_the_script() {
        let hostile = "</script><script>alert(1)</script> <!-- ]]> & \u{2028}\u{2029}";
        let json = serde_json::to_vec(&serde_json::json!({ "data": hostile })).unwrap();
        let safe = escape_for_script(&json);
        let text = std::str::from_utf8(&safe).unwrap();
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!text.contains(bad), "{bad:?} left in {text}");
        }
        let back: serde_json::Value = serde_json::from_slice(&safe).unwrap();
        assert_eq!(back["data"], hostile, "the escapes decode to the same string");
    }
}
