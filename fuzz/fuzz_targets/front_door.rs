//! Bytes read from a new HTTP connection, as the front door decides on them.
//!
//! The front door answers itself only plain `GET`s over HTTP/1.1 with no
//! body (one request, nothing pipelined behind it) and WebSocket handshakes
//! on `/api/ws` and `/mqtt`; everything else goes to hyper with the bytes
//! read. Checked against httparse (hyper's own head parser) and the `http`
//! types the router reads: never answered here when it should be handed
//! over, never handed over when it is a plain request; a request answered
//! here reaches the router with every header it came with, and a poll
//! answered without the router has the channel, query and credential the
//! router would have read; a client asking to close is never kept alive; a
//! head that is whole is seen to be whole (or the connection would wait);
//! the WebSocket handshake is accepted exactly when RFC 6455 says.
#![no_main]

use base64::Engine;
use herald_core::Channel;
use herald_server::fuzz::front::{self, Decision, MAX_HEAD, MAX_HEADERS};
use http::{HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut slots);
    let parsed = req.parse(data);
    if let Ok(httparse::Status::Complete(n)) = parsed {
        assert!(front::head_complete(&data[..n]), "a whole head the front door would keep waiting on");
    }
    let decision = front::decide(data);
    let Ok(httparse::Status::Complete(len)) = parsed else {
        assert!(matches!(decision, Decision::Hyper), "what does not parse goes to hyper: {decision:?}");
        return;
    };
    let head = Head::new(&req, len, data.len());
    let expected = head.expected();
    // What a failure prints: the start of the input, not all 16 KiB of it.
    let head = Shown(&head, String::from_utf8_lossy(&data[..data.len().min(300)]).into_owned());
    match decision {
        Decision::Hyper => assert_eq!(expected, Kind::Hyper, "handed over: {head:?}"),
        Decision::WebSocket { mqtt, head_len, query, authorization, accept, mqtt_protocol } => {
            assert_eq!(expected, Kind::WebSocket, "{head:?}");
            assert_eq!(head_len, len);
            let uri = Uri::try_from(head.path.as_str()).expect("a handshake answered here has a valid target");
            assert_eq!(mqtt, uri.path() == "/mqtt");
            assert_eq!(query.as_deref(), uri.query(), "{head:?}");
            assert_eq!(authorization, head.router_header("authorization"), "the credential");
            check_handshake(&head, &accept);
            if let Some(p) = mqtt_protocol {
                assert!(head.values("sec-websocket-protocol").any(|v| v.split(',').any(|o| o.trim() == p)));
                assert!(p.eq_ignore_ascii_case("mqtt") || p.eq_ignore_ascii_case("mqttv3.1"));
            }
        }
        Decision::Poll { head_len, channel, query, authorization, keep_alive } => {
            assert_eq!(expected, Kind::Poll, "{head:?}");
            assert_eq!(head_len, len);
            // As the router sees the target: through `http::Uri` (which,
            // for one, drops a fragment).
            let uri = Uri::try_from(head.path.as_str()).expect("a poll answered here has a valid target");
            assert_eq!(format!("/api/channels/{channel}/messages"), uri.path(), "{head:?}");
            assert_eq!(query.as_deref(), uri.query(), "{head:?}");
            assert_eq!(authorization, head.router_header("authorization"), "the router's credential");
            assert!(!(keep_alive && head.asks_close()), "kept alive though the client asked to close");
        }
        Decision::Router { head_len, method, uri, http11, headers, keep_alive } => {
            assert_eq!(expected, Kind::Router, "{head:?}");
            assert_eq!(head_len, len);
            let target = Uri::try_from(head.path.as_str()).map(|u| u.to_string()).ok();
            assert_eq!((method.as_str(), Some(uri), http11), ("GET", target, true));
            let mut want: Vec<(String, Vec<u8>)> =
                head.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
            let mut got = headers;
            want.sort_by(|a, b| a.0.cmp(&b.0));
            got.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(got, want, "every header reaches the router");
            assert!(!(keep_alive && head.asks_close()), "kept alive though the client asked to close");
        }
    }
});

/// A head with the start of its input, for failure messages.
struct Shown<'a>(&'a Head, String);

impl std::ops::Deref for Shown<'_> {
    type Target = Head;
    fn deref(&self) -> &Head {
        self.0
    }
}

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} ({} bytes, head {})", self.1, self.0.len + self.0.trailing, self.0.len)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Hyper,
    WebSocket,
    Poll,
    Router,
}

/// A parsed head, owned.
struct Head {
    method: String,
    path: String,
    http11: bool,
    headers: Vec<(String, Vec<u8>)>,
    len: usize,
    /// Bytes read after the head.
    trailing: usize,
}

impl Head {
    fn new(req: &httparse::Request<'_, '_>, len: usize, read: usize) -> Self {
        Head {
            method: req.method.unwrap_or_default().to_owned(),
            path: req.path.unwrap_or_default().to_owned(),
            http11: req.version == Some(1),
            headers: req.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect(),
            len,
            trailing: read - len,
        }
    }

    /// Values of a header, read as the handshake reads them (lossy UTF-8).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        self.values_raw(name).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// A header as the router's extractors read it: the first of its name,
    /// when it is visible ASCII.
    fn router_header(&self, name: &str) -> Option<String> {
        let (_, v) = self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))?;
        HeaderValue::from_bytes(v).ok()?.to_str().ok().map(str::to_owned)
    }

    /// `Connection: close` (RFC 9112 section 9.6): the token `close`.
    fn asks_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .any(|(_, v)| String::from_utf8_lossy(v).split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    fn announces_body(&self) -> bool {
        self.has("transfer-encoding") || self.values_raw("content-length").any(|v| v != b"0")
    }

    fn values_raw<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    /// Where the front door's contract sends this head.
    fn expected(&self) -> Kind {
        if self.method != "GET" || !self.http11 || self.headers.len() > MAX_HEADERS || self.len > MAX_HEAD {
            return Kind::Hyper;
        }
        // The target as hyper and the router read it; one they refuse is
        // hyper's to answer (400).
        let Ok(uri) = Uri::try_from(self.path.as_str()) else { return Kind::Hyper };
        let path = uri.path();
        if path == "/api/ws" || path == "/mqtt" {
            // Bytes after a handshake are the client's first frames.
            return if self.announces_body() { Kind::Hyper } else { Kind::WebSocket };
        }
        let plain = self.trailing == 0
            && !self.announces_body()
            && !self.has("upgrade")
            && !self.has("expect")
            && self
                .headers
                .iter()
                .all(|(n, v)| HeaderName::from_bytes(n.as_bytes()).is_ok() && HeaderValue::from_bytes(v).is_ok());
        if !plain {
            return Kind::Hyper;
        }
        let direct = path
            .strip_prefix("/api/channels/")
            .and_then(|p| p.strip_suffix("/messages"))
            .is_some_and(|c| !c.contains('%') && Channel::parse(c).is_ok());
        // A cross-origin poll goes through the router for its CORS headers.
        if direct && !self.has("origin") { Kind::Poll } else { Kind::Router }
    }
}

/// RFC 6455 section 4.2.1: `Upgrade: websocket`, `Connection: Upgrade`,
/// version 13 and a key of 16 bytes in base64; the answer is 28 characters
/// of base64 (a SHA-1).
fn check_handshake(head: &Shown<'_>, accept: &Result<String, &'static str>) {
    let token =
        |name: &str, token: &str| head.values(name).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)));
    let joined = |name: &str| {
        let v: Vec<String> = head.values(name).collect();
        (!v.is_empty()).then(|| v.join(", "))
    };
    let key_ok = joined("sec-websocket-key")
        .is_some_and(|k| base64::engine::general_purpose::STANDARD.decode(k.trim()).is_ok_and(|b| b.len() == 16));
    let valid = token("upgrade", "websocket")
        && token("connection", "upgrade")
        && joined("sec-websocket-version").as_deref().map(str::trim) == Some("13")
        && key_ok;
    match accept {
        Ok(a) => {
            assert!(valid, "accepted: {head:?}");
            assert_eq!(a.len(), 28);
        }
        Err(_) => assert!(!valid, "refused: {head:?}"),
    }
}
