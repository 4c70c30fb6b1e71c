//! Black-box tests of the guards (DESIGN.md, "Guarding the server") against
//! the real binary: rate limits per client, connection limits, what each
//! transport is told when refused, API keys only in the header, `aud` and
//! `iss`, and content moderation's rules.
//!
//! Loopback is exempt by default, so each test exempts only 127.0.0.1 (its
//! own control connection: stats, the normal subscriber) and plays other
//! clients from 127.0.0.2, 127.0.0.3, ... (Linux routes all of 127.0.0.0/8
//! to loopback). Slow consumers, which need no address, are in
//! `slow_consumers.rs`; MQTT's reason codes with paho in
//! `tests/mqtt/test_guards.py`; the moderation webhook in
//! `tests/mqtt/test_moderation_webhook.py`; the browser's `EventSource` in
//! `tests/browser/guards.test.js`.

mod clients;
mod common;

use clients::{Ws, raw_mqtt as raw};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "guards-secret-0123456789";
const KEY: &str = "guards-backend-key";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A user token signed with [`SECRET`]; `extra` claims are merged in.
fn token(sub: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "exp": now() + 3600, "channels": ["#"], "publish": ["#"] });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A request's status, JSON body and `Retry-After`.
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let res = req.send().await.expect("an answer");
    let status = res.status().as_u16();
    let retry_after = res.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().expect("whole seconds"));
    let text = res.text().await.unwrap();
    Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), retry_after }
}

/// Asserts a refusal's answer: status, code, limit, and a wait in both the
/// header and the body.
fn assert_refused(a: &Answer, status: u16, code: &str, limit: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["code"], code, "{}", a.body);
    assert_eq!(a.body["limit"], limit, "{}", a.body);
    let wait = a.body["retry_after"].as_f64().expect("retry_after in the body");
    assert!(wait > 0.0, "{}", a.body);
    assert_eq!(a.retry_after, Some(wait.ceil() as u64), "Retry-After is the body's wait, rounded up");
}

/// An SSE request from `ip`: the open stream, or the in-band refusal's
/// `retry:` and JSON error (a whole body: the stream ends with it).
enum Sse {
    Open(reqwest::Response),
    Refused { retry: u64, error: Value },
}

async fn sse_from(s: &Server, ip: &str, path: &str, bearer: Option<&str>) -> Sse {
    let mut req = client_from(ip).get(format!("{}{path}", s.url)).header("accept", "text/event-stream");
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200, "an EventSource must get 200, refused or not");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    if res.content_length().is_none() {
        return Sse::Open(res);
    }
    let text = res.text().await.unwrap();
    let mut lines = text.lines();
    let retry = lines.next().and_then(|l| l.strip_prefix("retry: ")).expect("retry: first").parse().unwrap();
    assert_eq!(lines.next(), Some(""));
    assert_eq!(lines.next(), Some("event: error"), "{text}");
    let data = lines.next().and_then(|l| l.strip_prefix("data: ")).expect("data: the error");
    assert_eq!((lines.next(), lines.next()), (Some(""), None), "one event, then the end: {text:?}");
    Sse::Refused { retry, error: serde_json::from_str(data).unwrap() }
}

fn refused(sse: Sse) -> (u64, Value) {
    match sse {
        Sse::Refused { retry, error } => (retry, error),
        Sse::Open(_) => panic!("the stream opened; a refusal was expected"),
    }
}

fn opened(sse: Sse) -> reqwest::Response {
    match sse {
        Sse::Open(res) => res,
        Sse::Refused { error, .. } => panic!("refused: {error}"),
    }
}

#[tokio::test]
async fn a_flood_from_one_address_gets_exactly_its_burst_then_429_while_another_address_is_unaffected() {
    let s = Server::start_with(&[
        ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
        ("HERALD_LIMITS_REQUESTS_RATE", "1/h"),
        ("HERALD_LIMITS_REQUESTS_BURST", "5"),
    ]);
    let flood = client_from("127.0.0.2");
    // Every kind of request counts: one the router answers, a poll the front
    // door answers itself, a publish hyper reads.
    let health = || flood.get(format!("{}/healthz", s.url));
    let poll = || flood.get(format!("{}/api/channels/c/messages", s.url));
    let publish = || flood.post(format!("{}/api/channels/c", s.url)).body("hi");
    for req in [health(), poll(), publish(), health(), poll()] {
        assert_eq!(send(req).await.status, 200);
    }
    for req in [health(), poll(), publish()] {
        assert_refused(&send(req).await, 429, "rate_limited", "requests");
    }
    let other = client_from("127.0.0.3");
    for _ in 0..5 {
        assert_eq!(send(other.get(format!("{}/healthz", s.url))).await.status, 200, "another address is unaffected");
    }
    let (_, v) = get_json(&s, "/api/channels/c/messages").await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 1, "the refused publish was not stored");
    let g = &stats(&s).await["guards"];
    assert_eq!(g["requests_limited"], 3, "{g}");
    assert!(g["tracked"]["requests"].as_u64().unwrap() >= 2, "{g}");
    for key in ["connections_refused", "publishes_limited", "floods_closed", "slow_consumers_closed", "moderation"] {
        assert!(!g[key].is_null(), "stats name {key}: {g}");
    }
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies_and_a_stranger_sending_it_is_warned_about_once() {
    let s = Server::start_opts(
        &[
            ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
            ("HERALD_LIMITS_TRUSTED_PROXIES", "127.0.0.4"),
            ("HERALD_LIMITS_REQUESTS_RATE", "1/h"),
            ("HERALD_LIMITS_REQUESTS_BURST", "2"),
        ],
        Opts { capture_log: true, ..Opts::default() },
    );
    let proxy = client_from("127.0.0.4");
    let via = |xff: &str, path: &str| proxy.get(format!("{}{path}", s.url)).header("x-forwarded-for", xff);
    // The client behind the proxy is limited, on both kinds of GET.
    assert_eq!(send(via("203.0.113.1", "/healthz")).await.status, 200);
    assert_eq!(send(via("6.6.6.6, 203.0.113.1", "/api/channels/c/messages")).await.status, 200);
    assert_refused(&send(via("203.0.113.1", "/healthz")).await, 429, "rate_limited", "requests");
    assert_refused(&send(via("203.0.113.1", "/api/channels/c/messages")).await, 429, "rate_limited", "requests");
    // Another client behind the same proxy is not, nor is an exempt one.
    assert_eq!(send(via("203.0.113.2", "/healthz")).await.status, 200);
    for _ in 0..4 {
        assert_eq!(send(via("127.0.0.1", "/healthz")).await.status, 200);
    }
    // From a stranger, the header changes nothing: a new one each time is
    // still one client.
    let stranger = client_from("127.0.0.5");
    for (i, expect) in [200, 200, 429, 429].into_iter().enumerate() {
        let req = stranger.get(format!("{}/healthz", s.url)).header("x-forwarded-for", format!("198.51.100.{i}"));
        assert_eq!(send(req).await.status, expect);
    }
    let log = s.log();
    assert_eq!(log.matches("X-Forwarded-For arrived from").count(), 1, "warned once:\n{log}");
    assert!(log.contains("127.0.0.5") && log.contains("trusted_proxies"), "{log}");
}

#[tokio::test]
async fn users_are_limited_by_sub_api_keys_not_at_all_and_a_key_in_the_query_is_refused() {
    let s = Server::start_with(&[
        ("HERALD_AUTH_JWT_SECRET", SECRET),
        ("HERALD_AUTH_API_KEYS", KEY),
        ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
        ("HERALD_LIMITS_REQUESTS_RATE", "1/h"),
        ("HERALD_LIMITS_REQUESTS_BURST", "3"),
    ]);
    let unread =
        |ip: &str, bearer: &str| client_from(ip).get(format!("{}/api/users/alice/unread", s.url)).bearer_auth(bearer);
    for _ in 0..10 {
        assert_eq!(send(unread("127.0.0.2", KEY)).await.status, 200, "a backend's key is not limited");
    }
    // Alice is one client from wherever she comes.
    let alice = token("alice", json!({}));
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.6"] {
        assert_eq!(send(unread(ip, &alice)).await.status, 200);
    }
    assert_refused(&send(unread("127.0.0.7", &alice)).await, 429, "rate_limited", "requests");
    assert_eq!(send(unread("127.0.0.7", &token("bob", json!({})))).await.status, 403, "bob has his own budget");

    // A key in a query string is refused on every kind of request, saying
    // where keys go.
    let in_query = [
        format!("/api/channels/c/events?token={KEY}"),
        format!("/api/channels/c/messages?token={KEY}"),
        format!("/api/users/alice/unread?token={KEY}"),
    ];
    for path in in_query {
        let a = send(client().get(format!("{}{path}", s.url))).await;
        assert_eq!((a.status, a.body["code"].as_str()), (401, Some("api_key_in_query")), "{path}: {}", a.body);
        assert!(a.body["message"].as_str().unwrap().contains("Authorization header"), "{}", a.body);
    }
    let res = Ws::connect_from(&s, "127.0.0.1", &format!("token={KEY}")).await.err().expect("refused");
    assert_eq!(res.status(), 401);
    let body: Value = serde_json::from_slice(res.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["code"], "api_key_in_query");
    // A user token there is still fine (EventSource cannot send headers).
    assert!(Ws::connect_from(&s, "127.0.0.1", &format!("token={}", token("carol", json!({})))).await.is_ok());
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_set() {
    let s = Server::start_with(&[
        ("HERALD_AUTH_JWT_SECRET", SECRET),
        ("HERALD_AUTH_AUDIENCE", "herald-test"),
        ("HERALD_AUTH_ISSUER", "https://issuer.example"),
    ]);
    let url = format!("{}/api/users/alice/unread", s.url);
    let get = |t: String| send(client().get(&url).bearer_auth(t));
    let good = json!({ "aud": "herald-test", "iss": "https://issuer.example" });
    assert_eq!(get(token("alice", good)).await.status, 200);
    assert_eq!(
        get(token("alice", json!({ "aud": ["other", "herald-test"], "iss": "https://issuer.example" }))).await.status,
        200
    );
    for (claims, says) in [
        (json!({ "aud": "other", "iss": "https://issuer.example" }), "audience"),
        (json!({ "iss": "https://issuer.example" }), "aud"),
        (json!({ "aud": "herald-test", "iss": "https://evil.example" }), "issuer"),
        (json!({ "aud": "herald-test" }), "iss"),
    ] {
        let a = get(token("alice", claims.clone())).await;
        assert_eq!((a.status, a.body["code"].as_str()), (401, Some("invalid_token")), "{claims}: {}", a.body);
        assert!(a.body["message"].as_str().unwrap().contains(says), "{claims}: {}", a.body);
    }
    // `herald token` stamps what the server checks.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "--sub", "alice"])
        .env("HERALD_AUTH_JWT_SECRET", SECRET)
        .env("HERALD_AUTH_AUDIENCE", "herald-test")
        .env("HERALD_AUTH_ISSUER", "https://issuer.example")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(get(String::from_utf8(out.stdout).unwrap().trim().to_owned()).await.status, 200);
}

#[tokio::test]
async fn over_the_address_limit_sse_is_refused_in_band_others_with_429_and_waiting_long_polls_count() {
    let s = Server::start_with(&[
        ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
        ("HERALD_LIMITS_CONNECTIONS_PER_IP", "2"),
        ("HERALD_LIMITS_CONNECTIONS_RETRY_AFTER", "1500ms"),
    ]);
    let first = opened(sse_from(&s, "127.0.0.2", "/api/channels/c/events", None).await);
    // A waiting long poll is the address's second connection.
    let poller = client_from("127.0.0.2");
    let url = format!("{}/api/channels/c/messages?since=now&wait=30", s.url);
    let poll = tokio::spawn(async move { send(poller.get(url)).await });
    until_stats(&s, "the long poll waiting", |v| v["connections"]["longpoll"] == 1).await;

    for path in ["/api/channels/c/events", "/api/events?channel=c"] {
        let (retry, error) = refused(sse_from(&s, "127.0.0.2", path, None).await);
        assert!((1500..2250).contains(&retry), "retry: is the wait in ms, with jitter: {retry}");
        assert_eq!(
            (error["code"].as_str(), error["limit"].as_str()),
            (Some("too_many_connections"), Some("connections_per_ip"))
        );
        assert_eq!(error["retry_after"].as_f64(), Some(retry as f64 / 1000.0), "the same wait, in s");
    }
    let iframe = send(client_from("127.0.0.2").get(format!("{}/api/channels/c/iframe?callback=cb", s.url))).await;
    assert_refused(&iframe, 429, "too_many_connections", "connections_per_ip");
    let res = Ws::connect_from(&s, "127.0.0.2", "").await.err().expect("the handshake is refused");
    assert_eq!(res.status(), 429);
    let after = res.headers()["retry-after"].to_str().unwrap();
    assert!(["2", "3"].contains(&after), "1.5-2.25 s, rounded up: {after}");
    // Another address is not affected.
    let _other = opened(sse_from(&s, "127.0.0.3", "/api/channels/c/events", None).await);

    // The poll is answered: the address has one connection again, and the
    // next stream opens (and replays what came).
    let id = publish(&s, "c", "one").await;
    assert_eq!(poll.await.unwrap().status, 200);
    let again = opened(sse_from(&s, "127.0.0.2", "/api/channels/c/events", None).await);
    drop((first, again));
    let g = stats(&s).await["guards"].clone();
    assert_eq!(g["connections_refused"]["per_ip"], 4, "{g}");
    assert_eq!(id, 1);
}

#[tokio::test]
async fn a_full_node_answers_server_busy_and_a_user_is_counted_wherever_they_connect_from() {
    let s = Server::start_with(&[
        ("HERALD_AUTH_JWT_SECRET", SECRET),
        ("HERALD_AUTH_API_KEYS", KEY),
        ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
        ("HERALD_LIMITS_CONNECTIONS_MAX", "2"),
        ("HERALD_LIMITS_CONNECTIONS_PER_USER", "1"),
    ]);
    let alice = token("alice", json!({}));
    let path = "/api/channels/c/events";
    let _a = opened(sse_from(&s, "127.0.0.2", path, Some(&alice)).await);
    let (_, error) = refused(sse_from(&s, "127.0.0.3", path, Some(&alice)).await);
    assert_eq!(
        (error["code"].as_str(), error["limit"].as_str()),
        (Some("too_many_connections"), Some("connections_per_user"))
    );
    let _b = opened(sse_from(&s, "127.0.0.3", path, Some(&token("bob", json!({})))).await);
    // Two open: the node is full.
    let (retry, error) = refused(sse_from(&s, "127.0.0.4", path, Some(&token("carol", json!({})))).await);
    assert_eq!(error["code"], "server_busy");
    assert!((5000..7500).contains(&retry), "the default 5 s, with jitter: {retry}");
    let res =
        Ws::connect_from(&s, "127.0.0.4", &format!("token={}", token("dave", json!({})))).await.err().expect("busy");
    assert_eq!(res.status(), 503);
    let (mut tcp, code) = raw_connect_from(&s, "127.0.0.4", 5, "dave", Some(&token("dave", json!({})))).await;
    assert_eq!(code, 0x89, "MQTT 5: server busy");
    tcp.shutdown().await.ok();
    // Exempt addresses are counted, never refused.
    let _local = opened(sse_from(&s, "127.0.0.1", path, Some(KEY)).await);
    let g = stats(&s).await["guards"].clone();
    assert_eq!(g["connections_refused"], json!({ "busy": 3, "rate": 0, "per_ip": 0, "per_user": 1 }), "{g}");
}

/// A raw MQTT CONNECT from `ip` over TCP: the socket and the CONNACK's code.
async fn raw_connect_from(
    s: &Server,
    ip: &str,
    level: u8,
    client_id: &str,
    password: Option<&str>,
) -> (tokio::net::TcpStream, u8) {
    let mut tcp = tcp_from(ip, &s.mqtt, None).await;
    tcp.write_all(&raw::connect_with_password(level, client_id, 0, password)).await.unwrap();
    let connack = raw::read_packet(&mut tcp).await;
    assert_eq!(connack[0], 0x20, "CONNACK expected, got {connack:x?}");
    (tcp, connack[3])
}

#[tokio::test]
async fn new_connections_per_address_are_rate_limited_but_a_pollers_next_request_is_not_a_new_connection() {
    let s =
        Server::start_with(&[("HERALD_LIMITS_EXEMPT", "127.0.0.1"), ("HERALD_LIMITS_CONNECTIONS_RATE_PER_IP", "2/h")]);
    publish(&s, "c", "one").await;
    for _ in 0..2 {
        Ws::connect_from(&s, "127.0.0.2", "").await.expect("within the rate").close().await;
    }
    let res = Ws::connect_from(&s, "127.0.0.2", "").await.err().expect("the third in an hour");
    assert_eq!(res.status(), 429);
    let body: Value = serde_json::from_slice(res.body().as_deref().unwrap()).unwrap();
    assert_eq!((body["code"].as_str(), body["limit"].as_str()), (Some("rate_limited"), Some("connection_rate")));
    let (retry, error) = refused(sse_from(&s, "127.0.0.2", "/api/channels/c/events", None).await);
    assert!(retry > 60_000, "most of an hour: {retry}");
    assert_eq!(error["limit"], "connection_rate");
    let (_, code) = raw_connect_from(&s, "127.0.0.2", 5, "m", None).await;
    assert_eq!(code, 0x9F, "MQTT 5: connection rate exceeded");
    // Long polls (answered at once here) do not spend it.
    for _ in 0..5 {
        let a = send(client_from("127.0.0.2").get(format!("{}/api/channels/c/messages?since=0&wait=5", s.url))).await;
        assert_eq!(a.status, 200);
    }
    Ws::connect_from(&s, "127.0.0.3", "").await.expect("another address");
}

#[tokio::test]
async fn websocket_publishes_over_the_rate_get_an_error_frame_with_their_ref_and_a_flood_is_closed_4029() {
    let s = Server::start_with(&[
        ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
        ("HERALD_LIMITS_PUBLISH_PER_CONNECTION", "1/h"),
        ("HERALD_LIMITS_PUBLISH_PER_USER", "0"),
        ("HERALD_LIMITS_PUBLISH_BURST", "3"),
    ]);
    let mut ws = Ws::connect_from(&s, "127.0.0.2", "").await.unwrap();
    let publish = |r: u64| json!({ "type": "publish", "channel": "room", "data": r, "ref": r });
    for r in 1..=3 {
        ws.send_json(publish(r)).await;
        assert_eq!(ws.recv_type("published").await["ref"], r);
    }
    ws.send_json(publish(4)).await;
    let e = ws.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64(), e["limit"].as_str()),
        (Some("rate_limited"), Some(4), Some("publish_per_connection"))
    );
    assert!(e["retry_after"].as_f64().unwrap() > 1000.0, "{e}");
    // The socket stays open and usable.
    ws.assert_usable().await;
    assert_eq!(ws.subscribe("room", Some(json!(0))).await["type"], "subscribed");
    assert_eq!(ws.messages(3).await.len(), 3, "only the three accepted were stored");
    ws.send_json(publish(5)).await;
    assert_eq!(ws.recv_type("error").await["ref"], 5);
    // The third refusal in a row is a flood.
    ws.send_json(publish(6)).await;
    let frame = ws.closed().await.expect("a close frame").expect("with a code");
    assert_eq!(frame.code, CloseCode::from(4029), "{frame:?}");
    // A new connection has its own rate.
    let mut again = Ws::connect_from(&s, "127.0.0.2", "").await.unwrap();
    again.send_json(publish(7)).await;
    assert_eq!(again.recv_type("published").await["ref"], 7);
    let g = stats(&s).await["guards"].clone();
    assert_eq!(
        (g["publishes_limited"]["per_connection"].as_u64(), g["floods_closed"].as_u64()),
        (Some(3), Some(1)),
        "{g}"
    );
}

#[tokio::test]
async fn a_users_publishes_share_one_quota_over_every_connection_and_http() {
    let s = Server::start_with(&[
        ("HERALD_AUTH_JWT_SECRET", SECRET),
        ("HERALD_LIMITS_EXEMPT", "127.0.0.1"),
        ("HERALD_LIMITS_PUBLISH_PER_CONNECTION", "0"),
        ("HERALD_LIMITS_PUBLISH_PER_USER", "1/h"),
        ("HERALD_LIMITS_PUBLISH_BURST", "2"),
    ]);
    let alice = token("alice", json!({}));
    let mut a = Ws::connect_from(&s, "127.0.0.2", &format!("token={alice}")).await.unwrap();
    let mut b = Ws::connect_from(&s, "127.0.0.3", &format!("token={alice}")).await.unwrap();
    let publish = |r: u64| json!({ "type": "publish", "channel": "room", "data": r, "ref": r });
    a.send_json(publish(1)).await;
    assert_eq!(a.recv_type("published").await["ref"], 1);
    b.send_json(publish(2)).await;
    assert_eq!(b.recv_type("published").await["ref"], 2);
    a.send_json(publish(3)).await;
    let e = a.recv_type("error").await;
    assert_eq!((e["code"].as_str(), e["limit"].as_str()), (Some("quota_exceeded"), Some("publish_per_user")));
    let http = client_from("127.0.0.4").post(format!("{}/api/channels/room", s.url)).bearer_auth(&alice).body("x");
    assert_refused(&send(http).await, 429, "quota_exceeded", "publish_per_user");
    let bob = client_from("127.0.0.4")
        .post(format!("{}/api/channels/room", s.url))
        .bearer_auth(token("bob", json!({})))
        .body("x");
    assert_eq!(send(bob).await.status, 200, "bob has his own quota");
}

/// Rules for the moderation tests: the first rule whose channels match applies.
const RULES: &str = r#"
[[moderation.rules]]
channels = ["chat/quiet/#"]
max_chars = 10

[[moderation.rules]]
channels = ["chat/#"]
words = ["darn", "笨蛋"]
max_links = 1

[[moderation.rules]]
channels = ["masked/#"]
patterns = ['\d{4}-\d{4}']
words = ["darn"]
action = "mask"
"#;

#[tokio::test]
async fn moderation_rules_reject_or_mask_and_a_rejected_message_is_never_stored_nor_delivered() {
    let s = Server::start_opts(
        &[("HERALD_AUTH_JWT_SECRET", SECRET), ("HERALD_AUTH_API_KEYS", KEY)],
        Opts { config: Some(RULES), ..Opts::default() },
    );
    let alice = token("alice", json!({}));
    let mut live = sse(&s, &format!("/api/channels/chat/room/events?token={alice}"), &[]).await;
    let post = |channel: &str, body: &str, bearer: &str| {
        client().post(format!("{}/api/channels/{channel}", s.url)).bearer_auth(bearer.to_owned()).body(body.to_owned())
    };
    let rejected = |a: Answer, rule: &str| {
        assert_eq!(
            (a.status, a.body["code"].as_str(), a.body["rule"].as_str()),
            (422, Some("content_rejected"), Some(rule)),
            "{}",
            a.body
        );
        a.body["reason"].as_str().expect("a reason").to_owned()
    };
    assert!(rejected(send(post("chat/room", "oh DARN it", &alice)).await, "words").contains("DARN"));
    rejected(send(post("chat/room", "你是笨蛋吗", &alice)).await, "words");
    rejected(send(post("chat/room", "see https://a.example and www.b.example", &alice)).await, "links");
    rejected(send(post("chat/quiet/x", "far too long for this room", &alice)).await, "length");
    // The first rule that matches decides: the quiet room has no word list.
    assert_eq!(send(post("chat/quiet/x", "darn", &alice)).await.status, 200);
    // JSON: string values are what is checked.
    let json_post =
        client().post(format!("{}/api/channels/chat/room", s.url)).bearer_auth(&alice).json(&json!({"msg": "darn"}));
    rejected(send(json_post).await, "words");
    // Over WebSocket: an error frame with the publish's ref; the socket goes on.
    let mut ws = Ws::connect_from(&s, "127.0.0.1", &format!("token={alice}")).await.unwrap();
    ws.send_json(json!({ "type": "publish", "channel": "chat/room", "data": {"msg": "darn"}, "ref": "r1" })).await;
    let e = ws.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["rule"].as_str(), e["ref"].as_str()),
        (Some("content_rejected"), Some("words"), Some("r1"))
    );
    ws.assert_usable().await;
    // A backend's key is not moderated (unless [moderation] api_keys).
    assert_eq!(send(post("chat/room", "darn, says the backend", KEY)).await.status, 200);
    assert_eq!(send(post("chat/room", "fine", &alice)).await.status, 200);

    // Nothing rejected got an id, was stored, or reached a subscriber.
    let first = next_event(&mut live).await.unwrap();
    assert_eq!((first.id.as_str(), first.data.as_str()), ("1", "darn, says the backend"));
    let second = next_event(&mut live).await.unwrap();
    assert_eq!((second.id.as_str(), second.data.as_str()), ("2", "fine"));
    let (_, v) = get_json(&s, &format!("/api/channels/chat/room/messages?token={alice}")).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 2, "{v}");

    // Masking stores the rest.
    let a = send(post("masked/a", "darn: call 5555-1234", &alice)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let (_, v) = get_json(&s, &format!("/api/channels/masked/a/messages?token={alice}")).await;
    assert_eq!(v["messages"][0]["data"], "****: call *********");

    let m = &stats(&s).await["guards"]["moderation"];
    assert_eq!(m["rejected"], json!({ "words": 4, "pattern": 0, "links": 1, "length": 1, "webhook": 0 }), "{m}");
    assert_eq!(m["masked"], json!({ "words": 1, "pattern": 1, "links": 0, "length": 0 }), "{m}");
}
