//! Publishing and errors over plain HTTP, against the real binary.

mod common;

use common::*;
use serde_json::{Value, json};

async fn post(s: &Server, path: &str, content_type: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let mut req = client().post(format!("{}{path}", s.url)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, serde_json::from_str(&res.text().await.unwrap()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn publish_keeps_json_as_json_and_text_as_text() {
    let s = Server::start();
    let (st, v) = post(
        &s,
        "/api/channels/chat/room/Default?event=chat",
        Some("application/json"),
        r#"{"from":"bob","msg":"Hi"}"#,
    )
    .await;
    assert_eq!((st, v), (200, json!({"channel":"chat/room/Default","id":1})));
    let (st, v) = post(&s, "/api/channels/chat/room/Default", Some("text/plain"), "just text").await;
    assert_eq!((st, v["id"].clone()), (200, json!(2)));
    let (_, page) = get_json(&s, "/api/channels/chat/room/Default/messages").await;
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["data"], json!({"from":"bob","msg":"Hi"}));
    assert_eq!(msgs[0]["event"], "chat");
    assert_eq!(msgs[1]["data"], "just text");
    assert!(msgs[1].get("event").is_none(), "no event name unless one was given");
    let time = msgs[0]["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == "2026-01-01T00:00:00.000Z".len(), "RFC 3339 UTC with ms: {time}");
}

#[tokio::test]
async fn publish_envelope_one_and_many_channels() {
    let s = Server::start();
    let (st, v) = post(&s, "/api/publish", None, r#"{"channel":"news","event":"headline","data":{"t":1}}"#).await;
    assert_eq!((st, v), (200, json!({"channel":"news","id":1})));
    let (st, v) = post(&s, "/api/publish", None, r#"{"channels":["news","sport"],"data":"both"}"#).await;
    assert_eq!((st, v), (200, json!({"results":[{"channel":"news","id":2},{"channel":"sport","id":1}]})));
    let (_, page) = get_json(&s, "/api/channels/sport/messages").await;
    assert_eq!(page["messages"][0]["data"], "both", "a JSON string is stored as text");
}

/// method, path, content type, body, expected status, expected error code
type BadCase = (&'static str, &'static str, Option<&'static str>, String, u16, &'static str);

#[tokio::test]
async fn bad_input_gets_a_precise_error() {
    let s = Server::start_with(&[("HERALD_LIMITS_MAX_PAYLOAD", "1KiB")]);
    let cases: Vec<BadCase> = vec![
        ("POST", "/api/channels/a%20b", None, "x".into(), 400, "invalid_channel"),
        ("POST", "/api/channels/a//b", None, "x".into(), 400, "invalid_channel"),
        ("POST", "/api/channels/%24SYS/x", None, "x".into(), 400, "reserved_channel"),
        ("POST", "/api/channels/a?event=gap", None, "x".into(), 400, "reserved_event"),
        ("POST", "/api/channels/a?event=unread", None, "x".into(), 400, "reserved_event"),
        ("POST", "/api/channels/a?event=bad%20name", None, "x".into(), 400, "invalid_event"),
        ("POST", "/api/channels/a", Some("application/json"), "{nope".into(), 400, "invalid_json"),
        ("POST", "/api/channels/a", None, "y".repeat(1025), 413, "payload_too_large"),
        ("POST", "/api/publish", None, "{".into(), 400, "invalid_json"),
        ("POST", "/api/publish", None, r#"{"channel":"a"}"#.into(), 400, "invalid_request"),
        ("POST", "/api/publish", None, r#"{"data":1}"#.into(), 400, "invalid_request"),
        ("POST", "/api/publish", None, r#"{"channel":"a","channels":["b"],"data":1}"#.into(), 400, "invalid_request"),
        ("POST", "/api/publish", None, r#"{"channel":"a","data":1,"extra":true}"#.into(), 400, "invalid_request"),
        (
            "POST",
            "/api/publish",
            None,
            format!(r#"{{"channel":"a","data":"{}"}}"#, "z".repeat(1100)),
            413,
            "payload_too_large",
        ),
        ("GET", "/api/channels/a/messages?since=abc", None, String::new(), 400, "invalid_cursor"),
        ("GET", "/api/channels/a/messages?since=-1", None, String::new(), 400, "invalid_cursor"),
        ("GET", "/api/channels/a/messages?limit=0", None, String::new(), 400, "invalid_parameter"),
        ("GET", "/api/channels/a/messages?wait=soon", None, String::new(), 400, "invalid_parameter"),
        ("GET", "/api/channels/a/bogus", None, String::new(), 404, "not_found"),
        ("GET", "/no/such/route", None, String::new(), 404, "not_found"),
        ("PUT", "/api/publish", None, String::new(), 405, "method_not_allowed"),
        ("DELETE", "/api/channels/a", None, String::new(), 405, "method_not_allowed"),
        ("GET", "/api/events", None, String::new(), 400, "invalid_request"),
        ("GET", "/api/events?channel=a/%23/b", None, String::new(), 400, "invalid_filter"),
    ];
    for (method, path, ct, body, status, code) in cases {
        let mut req = client().request(method.parse().unwrap(), format!("{}{path}", s.url)).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{method} {path}");
        assert_eq!(res.headers()["content-type"], "application/json", "{method} {path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["code"], code, "{method} {path}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path} explains itself");
    }
    // Nothing above was stored, and the server is still fine.
    let (st, page) = get_json(&s, "/api/channels/a/messages").await;
    assert_eq!((st, page["messages"].as_array().unwrap().len()), (200, 0));
    assert_eq!(get_json(&s, "/healthz").await.0, 200);
}

#[tokio::test]
async fn oversize_body_without_length_is_refused() {
    let s = Server::start_with(&[("HERALD_LIMITS_MAX_PAYLOAD", "1KiB")]);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        (0..4).map(|_| Ok(bytes::Bytes::from(vec![b'x'; 512]))).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (st, v) = post(&s, "/api/channels/a", None, body).await;
    assert_eq!((st, v["code"].as_str()), (413, Some("payload_too_large")));
}

#[tokio::test]
async fn health_and_readiness() {
    let mut s = Server::start();
    assert_eq!(get_json(&s, "/healthz").await, (200, json!({"status":"ok"})));
    assert_eq!(get_json(&s, "/readyz").await, (200, json!({"status":"ready"})));
    assert!(s.stop().success(), "a clean shutdown exits 0");
}

#[tokio::test]
async fn config_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("herald.toml");
    std::fs::write(&cfg, "[history]\nsize = 2\n").unwrap();
    let s = Server::start_with(&[("HERALD_CONFIG", cfg.to_str().unwrap())]);
    for i in 0..4 {
        publish(&s, "c", &i.to_string()).await;
    }
    let (_, page) = get_json(&s, "/api/channels/c/messages").await;
    let ids: Vec<u64> = page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [3, 4], "[history] size from the file applies");
    // A broken config stops the server with the offending key named.
    std::fs::write(&cfg, "[history]\nsise = 2\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--http", "127.0.0.1:0", "--memory", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sise"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `..` and `.` segments must never be normalised into another channel. HTTP
/// clients resolve them before sending, so this speaks raw HTTP/1.1.
#[tokio::test]
async fn dot_segments_are_refused_not_normalised() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start();
    for path in ["/api/channels/a/../b", "/api/channels/a/%2E%2E/b", "/api/channels/./b"] {
        let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_channel"), "{path}: {answer}");
    }
    let (_, page) = get_json(&s, "/api/channels/b/messages").await;
    assert!(page["messages"].as_array().unwrap().is_empty(), "nothing reached channel b");
}

/// The front door answers plain GETs itself and hands everything else to
/// hyper: garbage, an oversized head and a keep-alive connection carrying two
/// requests in a row must each get a proper HTTP answer, and the server stays up.
#[tokio::test]
async fn raw_http_edge_cases_get_proper_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start();
    let raw = |req: Vec<u8>| {
        let addr = s.addr.clone();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            tcp.write_all(&req).await.unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let garbage = raw(b"NOT HTTP AT ALL\r\n\r\n".to_vec()).await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    // Past what the front door reads (16 KiB) it goes to hyper, which refuses
    // heads over its own limit (about 400 KiB).
    let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge.extend(b"\r\n\r\n");
    let huge = raw(huge).await;
    assert!(huge.starts_with("HTTP/1.1 431"), "{}", &huge[..huge.len().min(200)]);

    // Two GETs on one connection (the second closes it): both answered, in order.
    let two =
        raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .to_vec())
        .await;
    assert_eq!(two.matches("HTTP/1.1 200").count(), 2, "{two}");
    assert!(two.find("\"ok\"").unwrap() < two.find("\"ready\"").unwrap(), "{two}");

    assert_eq!(get_json(&s, "/healthz").await.0, 200, "still serving");
}

/// Publishes on one kept-alive connection, framed every way a client may:
/// a body that arrives in two pieces, a chunked body (hyper's), two
/// publishes pipelined in one write, and a second Content-Length (refused).
/// Each is answered once, in order, and stored as sent.
#[tokio::test]
async fn publishes_with_bodies_framed_every_way_on_one_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start();
    let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    // Reads until `n` responses have arrived, whole (each says its length).
    async fn answers(tcp: &mut tokio::net::TcpStream, n: usize) -> Vec<(u16, String)> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while out.len() < n {
            let mut chunk = [0u8; 4096];
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut chunk)).await;
            let got = got.expect("an answer within 10 s").unwrap();
            assert!(got > 0, "the connection closed after {} answers", out.len());
            buf.extend_from_slice(&chunk[..got]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() < end + 4 + len {
                    break;
                }
                let status = head[9..12].parse().unwrap();
                out.push((status, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned()));
                buf.drain(..end + 4 + len);
            }
        }
        out
    }
    let post = |body: &str| {
        format!(
            "POST /api/channels/framed HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let first = post("in two pieces");
    let (a, b) = first.split_at(first.len() - 6);
    tcp.write_all(a.as_bytes()).await.unwrap();
    tcp.flush().await.unwrap();
    tokio::task::yield_now().await;
    tcp.write_all(b.as_bytes()).await.unwrap();
    assert_eq!(answers(&mut tcp, 1).await, [(200, r#"{"channel":"framed","id":1}"#.to_string())]);
    let pipelined = format!("{}{}", post("pipelined 1"), post("pipelined 2"));
    tcp.write_all(pipelined.as_bytes()).await.unwrap();
    let got = answers(&mut tcp, 2).await;
    assert_eq!(got.iter().map(|(st, _)| *st).collect::<Vec<_>>(), [200, 200], "{got:?}");
    tcp.write_all(
        b"POST /api/channels/framed HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nchunked\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(answers(&mut tcp, 1).await, [(200, r#"{"channel":"framed","id":4}"#.to_string())]);
    let (_, page) = get_json(&s, "/api/channels/framed/messages").await;
    let data: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["data"].as_str().unwrap()).collect();
    assert_eq!(data, ["in two pieces", "pipelined 1", "pipelined 2", "chunked"]);

    // Two Content-Length headers: refused (400), never guessed.
    let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    tcp.write_all(b"POST /api/channels/framed HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        .await
        .unwrap();
    assert_eq!(answers(&mut tcp, 1).await[0].0, 400);
}

/// Found by schemathesis: a `ttl` past what a duration holds panicked the
/// handler (the connection dropped), and one just inside it minted a token
/// whose `exp` had wrapped into the past. Both are now a 400.
#[tokio::test]
async fn dev_token_refuses_a_lifetime_too_long_to_hold() {
    let s = Server::start();
    for ttl in ["99999999999999999999999d", "9223372036854775807s", "3651d"] {
        let (status, body) = get_json(&s, &format!("/api/dev/token?sub=ann&ttl={ttl}")).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_parameter")), "{ttl}: {body}");
    }
    let (status, body) = get_json(&s, "/api/dev/token?sub=ann&ttl=3650d").await;
    assert_eq!(status, 200, "{body}");
}

/// Found by schemathesis: a page answered another method with 405 but no
/// `Allow` header (RFC 9110 requires one).
#[tokio::test]
async fn a_405_says_which_methods_are_allowed() {
    let s = Server::start();
    for (method, path) in [("TRACE", "/"), ("POST", "/admin"), ("DELETE", "/herald.js"), ("POST", "/healthz")] {
        let res = client().request(method.parse().unwrap(), format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert_eq!(res.headers().get("allow").map(|v| v.to_str().unwrap()), Some("GET,HEAD"), "{method} {path}");
    }
}

/// Found by schemathesis: a long poll's `wait` past what a duration holds
/// (`8e307` seconds) panicked the handler; any finite wait is capped by
/// `[longpoll] max_wait` instead.
#[tokio::test]
async fn a_huge_wait_is_capped_not_a_crash() {
    let s = Server::start_with(&[("HERALD_LONGPOLL_MAX_WAIT", "1s")]);
    let res = client().get(format!("{}/api/channels/w/messages?since=0&wait=8.1e307", s.url)).send().await.unwrap();
    assert_eq!(res.status(), 304, "waited the capped second, then nothing");
    let (status, body) = get_json(&s, "/api/channels/w/messages?since=0&wait=inf").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_parameter")));
}

/// Found by schemathesis: a `Last-Event-ID` that is not visible ASCII was
/// ignored, and the stream replayed from `since` as if none had come.
#[tokio::test]
async fn a_garbled_last_event_id_is_refused() {
    let s = Server::start();
    let bad = reqwest::header::HeaderValue::from_bytes(b"\xc2\x84").unwrap();
    for path in ["/api/channels/g/events?since=0", "/api/events?channel=g"] {
        let res = client().get(format!("{}{path}", s.url)).header("last-event-id", bad.clone()).send().await.unwrap();
        assert_eq!(res.status(), 400, "{path}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "invalid_cursor", "{path}");
    }
}
