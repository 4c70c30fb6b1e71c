//! Authentication and the leak matrix: with user B's token, no way to read,
//! count, subscribe to, or mark user A's inbox works, on any transport or
//! through any wildcard; bad tokens are refused everywhere.

mod clients;
mod common;

use std::time::Duration;

use clients::{
    PATIENCE,
    raw_mqtt::{closed_by_server, connect_code, connect_with_password, publish_topic, read_packet, subscribe_code},
};
use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;

const SECRET: &str = "test-secret-0123456789";
const KEY: &str = "backend-key";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign(alg: Algorithm, secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn token(sub: &str, channels: &[&str], publish: &[&str]) -> String {
    sign(Algorithm::HS256, SECRET, json!({"sub": sub, "exp": now() + 3600, "channels": channels, "publish": publish}))
}

fn b64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn server() -> Server {
    Server::start_with(&[("HERALD_AUTH_JWT_SECRET", SECRET), ("HERALD_AUTH_API_KEYS", KEY)])
}

async fn status(s: &Server, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method.parse().unwrap(), format!("{}{path}", s.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let st = res.status().as_u16();
    (st, serde_json::from_str(&res.text().await.unwrap()).unwrap_or(Value::Null))
}

async fn notify(s: &Server, body: Value) -> Value {
    let (st, v) = status(s, "POST", "/api/notifications", Some(KEY), Some(body)).await;
    assert_eq!(st, 200, "{v}");
    v
}

#[tokio::test]
async fn user_b_cannot_reach_user_a_by_any_route() {
    let s = server();
    notify(&s, json!({"users":["a"],"title":"for a only"})).await;
    let b = token("b", &["#", "user/+", "user/a"], &["#"]);
    let forbidden_routes = [
        ("GET", "/api/users/a/notifications"),
        ("GET", "/api/users/a/unread"),
        ("POST", "/api/users/a/read"),
        ("GET", "/api/channels/user/a/messages"),
        ("GET", "/api/channels/user/a/messages?wait=5"),
        ("GET", "/api/channels/user/a/events"),
        ("GET", "/api/channels/user/a/iframe?callback=cb"),
        ("GET", "/api/events?channel=user/a"),
        ("POST", "/api/channels/user/a"),
        ("POST", "/api/channels/user/b"),
        ("POST", "/api/notifications"),
        ("PUT", "/api/groups/g/members"),
        ("GET", "/api/groups/g/members"),
    ];
    for (method, path) in forbidden_routes {
        let body = (method != "GET").then(|| json!({"all": true, "users": ["b"], "ids": ["user/a:1"]}));
        let (st, v) = status(&s, method, path, Some(&b), body).await;
        assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{method} {path}: {v}");
    }
    // Through ?token= as well.
    let (st, _) = status(&s, "GET", &format!("/api/users/a/unread?token={b}"), None, None).await;
    assert_eq!(st, 403);
    // A's inbox is untouched: still one unread.
    let (_, v) = status(&s, "GET", "/api/users/a/unread", Some(KEY), None).await;
    assert_eq!(v["count"], 1);
}

#[tokio::test]
async fn wildcards_never_deliver_another_users_inbox() {
    let s = server();
    let b = token("b", &["#"], &[]);
    // SSE with every wildcard form that covers user/a. After A's notification,
    // something B may see is published; it must be the first thing B gets.
    for (filter, visible) in [("user/%2B", "user/b"), ("%23", "user/b"), ("%2B/a", "x/a"), ("%2B/%2B", "user/b")] {
        let mut ev =
            sse(&s, &format!("/api/events?channel={filter}&since=now"), &[("authorization", &format!("Bearer {b}"))])
                .await;
        notify(&s, json!({"users":["a"],"title":"secret"})).await;
        if visible == "x/a" {
            let (st, _) = status(&s, "POST", "/api/channels/x/a", Some(KEY), Some(json!("visible"))).await;
            assert_eq!(st, 200);
        } else {
            notify(&s, json!({"users":["b"],"title":"mine"})).await;
        }
        let e = next_event(&mut ev).await.unwrap();
        let msg: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(msg["channel"], visible, "{filter}: {msg}");
    }
    // WebSocket: the same, and a direct subscribe to user/a is refused.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?token={b}", s.ws_url())).await.unwrap();
    ws.send(Ws::text(r#"{"type":"subscribe","channel":"user/a","ref":1}"#)).await.unwrap();
    let v: Value = serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["ref"].as_i64()),
        (Some("error"), Some("forbidden"), Some(1))
    );
    // Every wildcard form, each on a socket of its own.
    for (filter, visible) in [("user/+", "user/b"), ("#", "user/b"), ("+/a", "x/a"), ("+/+", "user/b")] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?token={b}", s.ws_url())).await.unwrap();
        let subscribe = json!({"type":"subscribe","channel":filter,"since":"now"}).to_string();
        ws.send(Ws::text(subscribe)).await.unwrap();
        let v: Value = serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        assert_eq!(v["type"], "subscribed", "{filter}: {v}");
        notify(&s, json!({"users":["a"],"title":"secret"})).await;
        if visible == "x/a" {
            assert_eq!(status(&s, "POST", "/api/channels/x/a", Some(KEY), Some(json!("visible"))).await.0, 200);
        } else {
            notify(&s, json!({"users":["b"],"title":"mine"})).await;
        }
        // Unread counts (B's own) may come between; the first message must be B's.
        let first = loop {
            let v: Value = serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
            assert_ne!(v["user"], "a", "{filter}: another user's count leaked: {v}");
            if v["type"] == "message" {
                break v;
            }
        };
        assert_eq!(first["channel"], visible, "{filter}: {first}");
    }
}

/// Over MQTT (TCP), with B's token: A's inbox and A's unread-count topic are
/// refused by name, and no wildcard delivers either.
#[tokio::test]
async fn mqtt_never_delivers_another_users_inbox_or_count() {
    let s = server();
    let b = token("b", &["#"], &[]);
    for level in [4, 5] {
        let refused = if level == 5 { 0x87 } else { 0x80 };
        let (mut tcp, code) = connect_code(&s, level, &format!("b-{level}"), &b).await;
        assert_eq!(code, 0, "B's token connects");
        for (pid, filter) in [(1, "user/a"), (2, "$herald/unread/a")] {
            assert_eq!(subscribe_code(&mut tcp, level, pid, filter).await, refused, "v{level} {filter}");
        }
        // Whatever these are granted, they must not open A's inbox or count.
        for (pid, filter) in
            [(3, "#"), (4, "user/+"), (5, "+/a"), (6, "+/+"), (7, "$herald/unread/+"), (8, "$herald/#")]
        {
            subscribe_code(&mut tcp, level, pid, filter).await;
        }
        assert_eq!(subscribe_code(&mut tcp, level, 9, "$herald/unread/b").await, 1, "v{level}: B's own count");
        notify(&s, json!({"users":["a"],"title":"secret"})).await;
        notify(&s, json!({"users":["b"],"title":"mine"})).await;
        // B's notification and count are the markers: A's came first.
        let mut topics = Vec::new();
        while !(topics.iter().any(|t: &String| t == "user/b") && topics.iter().any(|t| t == "$herald/unread/b")) {
            if let Some(topic) = publish_topic(&read_packet(&mut tcp).await) {
                topics.push(topic);
            }
        }
        assert!(!topics.iter().any(|t| t.ends_with("/a")), "v{level}: A's inbox or count leaked: {topics:?}");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_everywhere() {
    let s = server();
    let claims = |extra: Value| {
        let mut c = json!({"sub": "a", "exp": now() + 3600, "channels": ["#"], "publish": ["#"]});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    };
    let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let cases = [
        ("forged", sign(Algorithm::HS256, "another-secret", claims(json!({}))), "invalid_token"),
        ("expired", sign(Algorithm::HS256, SECRET, claims(json!({"exp": now() - 10}))), "token_expired"),
        ("not yet valid", sign(Algorithm::HS256, SECRET, claims(json!({"nbf": now() + 600}))), "token_not_yet_valid"),
        ("wrong algorithm", sign(Algorithm::HS512, SECRET, claims(json!({}))), "invalid_token"),
        ("alg none", format!("{header_none}.{}.", b64(claims(json!({})).to_string().as_bytes())), "invalid_token"),
        ("no exp", sign(Algorithm::HS256, SECRET, json!({"sub": "a"})), "invalid_token"),
        ("bad sub", sign(Algorithm::HS256, SECRET, claims(json!({"sub": "../a"}))), "invalid_token"),
        ("numeric sub", sign(Algorithm::HS256, SECRET, claims(json!({"sub": 7}))), "invalid_token"),
        ("garbage", "not-a-token".to_string(), "invalid_token"),
    ];
    let routes = [
        ("GET", "/api/channels/news/messages"),
        ("GET", "/api/channels/news/events"),
        ("GET", "/api/channels/news/iframe?callback=cb"),
        ("GET", "/api/events?channel=news"),
        ("GET", "/api/users/a/unread"),
        ("POST", "/api/channels/news"),
        ("POST", "/api/publish"),
        ("GET", "/api/ws"),
    ];
    for (name, tok, code) in &cases {
        for (method, path) in routes {
            let (st, v) =
                status(&s, method, path, Some(tok), (method == "POST").then(|| json!({"channel":"news","data":1})))
                    .await;
            assert_eq!((st, v["code"].as_str()), (401, Some(*code)), "{name}: {method} {path}: {v}");
        }
    }
    for (method, path) in routes {
        let (st, v) = status(&s, method, path, None, None).await;
        assert_eq!((st, v["code"].as_str()), (401, Some("missing_token")), "{method} {path}");
    }
    // The WebSocket handshake itself is refused.
    let err = tokio_tungstenite::connect_async(format!("{}?token=not-a-token", s.ws_url())).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    // MQTT, over TCP and over WebSocket (/mqtt): CONNACK "bad user name or
    // password" (3.1.1: 4; 5: 0x86) for every bad token.
    for (name, tok, _) in &cases {
        for (level, bad) in [(4, 4), (5, 0x86)] {
            let (_, code) = connect_code(&s, level, "bad", tok).await;
            assert_eq!(code, bad, "{name} over MQTT level {level}");
            assert_eq!(mqtt_over_websocket_code(&s, level, tok).await, bad, "{name} over /mqtt level {level}");
        }
    }
}

/// CONNECTs over `/mqtt` with `password` and returns the CONNACK's code.
async fn mqtt_over_websocket_code(s: &Server, level: u8, password: &str) -> u8 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{}/mqtt", s.url.replacen("http://", "ws://", 1)).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Ws::binary(connect_with_password(level, "bad-ws", 0, Some(password)))).await.unwrap();
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await.expect("a CONNACK within 10 s") {
            Some(Ok(Ws::Binary(b))) => {
                assert_eq!(b[0], 0x20, "CONNACK expected, got {b:x?}");
                return b[3];
            }
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a CONNACK: {other:?}"),
        }
    }
}

#[tokio::test]
async fn publish_patterns_hold() {
    let s = server();
    let u = token("u", &["chat/#"], &["chat/room/+"]);
    assert_eq!(status(&s, "POST", "/api/channels/chat/room/x", Some(&u), None).await.0, 200);
    let (st, v) = status(&s, "POST", "/api/channels/news", Some(&u), None).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")));
    let (st, _) =
        status(&s, "POST", "/api/publish", Some(&u), Some(json!({"channels":["chat/room/a","news"],"data":1}))).await;
    assert_eq!(st, 403, "one forbidden channel refuses the whole publish");
    let (_, page) = status(&s, "GET", "/api/channels/chat/room/a/messages", Some(&u), None).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 0, "nothing was published");
    // Subscribing outside the grant is refused; inside it works.
    assert_eq!(status(&s, "GET", "/api/channels/news/messages", Some(&u), None).await.0, 403);
    assert_eq!(status(&s, "GET", "/api/channels/chat/x/messages", Some(&u), None).await.0, 200);
    // WebSocket publish outside the grant gets an error frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?token={u}", s.ws_url())).await.unwrap();
    ws.send(Ws::text(r#"{"type":"publish","channel":"news","data":1,"ref":"p"}"#)).await.unwrap();
    let v: Value = serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!((v["code"].as_str(), v["ref"].as_str()), (Some("forbidden"), Some("p")));
}

#[tokio::test]
async fn streams_close_when_the_token_expires() {
    // Streams close when the server stops admitting the token: at exp plus
    // the leeway (1 s here), so that a reconnect with it is refused.
    let s = Server::start_with(&[
        ("HERALD_AUTH_JWT_SECRET", SECRET),
        ("HERALD_AUTH_API_KEYS", KEY),
        ("HERALD_AUTH_LEEWAY", "1s"),
    ]);
    let short = sign(Algorithm::HS256, SECRET, json!({"sub":"a","exp": now() + 1,"channels":["#"]}));
    let mut ev = sse(&s, "/api/channels/news/events", &[("authorization", &format!("Bearer {short}"))]).await;
    let e = next_event(&mut ev).await.unwrap();
    assert_eq!(e.event, "close");
    assert_eq!(serde_json::from_str::<Value>(&e.data).unwrap()["code"], "token_expired");
    assert!(next_event(&mut ev).await.is_none(), "the stream ends after the close event");

    let short = sign(Algorithm::HS256, SECRET, json!({"sub":"a","exp": now() + 1,"channels":["#"]}));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?token={short}", s.ws_url())).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    match frame {
        Ws::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4001);
            assert!(f.reason.contains("token_expired"));
        }
        other => panic!("expected a close frame, got {other:?}"),
    }

    // MQTT: a 5 client is told why (DISCONNECT 0x87, reason string
    // token_expired); a 3.1.1 client's connection is closed. Both are
    // refused when they come back with the same token.
    let short = sign(Algorithm::HS256, SECRET, json!({"sub":"a","exp": now() + 1,"channels":["#"]}));
    let (mut v3, code3) = connect_code(&s, 4, "expiring-3", &short).await;
    let (mut v5, code5) = connect_code(&s, 5, "expiring-5", &short).await;
    assert_eq!((code3, code5), (0, 0), "the token is valid for a second more, and the leeway");
    let told = closed_by_server(&mut v5).await;
    assert!(told.len() > 3 && told[0] == 0xe0 && told[2] == 0x87, "DISCONNECT 0x87 expected, got {told:x?}");
    assert!(String::from_utf8_lossy(&told).contains("token_expired"), "reason string: {told:x?}");
    closed_by_server(&mut v3).await;
    assert_eq!(connect_code(&s, 4, "expiring-3", &short).await.1, 4);
    assert_eq!(connect_code(&s, 5, "expiring-5", &short).await.1, 0x86);
}

#[tokio::test]
async fn api_key_reads_any_inbox_and_minted_tokens_work() {
    let s = server();
    notify(&s, json!({"users":["a"],"title":"t"})).await;
    let (st, v) = status(&s, "GET", "/api/users/a/unread", Some(KEY), None).await;
    assert_eq!((st, v["count"].as_u64()), (200, Some(1)));
    // `herald token` mints with the configured secret.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "--sub", "a", "--ttl", "10m"])
        .env("HERALD_AUTH_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let minted = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (st, v) = status(&s, "GET", "/api/users/a/unread", Some(&minted), None).await;
    assert_eq!((st, v["count"].as_u64()), (200, Some(1)));
    // Dev tokens exist only in open mode.
    assert_eq!(status(&s, "GET", "/api/dev/token?sub=a", None, None).await.0, 404);
}

#[test]
fn open_mode_refuses_a_network_address_unless_forced() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--http", "0.0.0.0:0", "--memory"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-open") && err.contains("[auth]"), "{err}");
    // Forced, it starts, and says at start that it is open.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--http", "0.0.0.0:0", "--mqtt", "off", "--memory", "--allow-open"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (mut listening, mut warning) = (String::new(), String::new());
    std::io::BufRead::read_line(&mut stdout, &mut listening).unwrap();
    while !warning.contains("OPEN MODE") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            break;
        }
        warning = line;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening.starts_with("herald listening on http://0.0.0.0:"), "{listening}");
    assert!(warning.contains("OPEN MODE") && warning.contains("anyone"), "the start says it is open: {warning}");
}

/// RS256 and ES256 tokens checked with a configured public key (PEM files
/// in tests/fixtures, made for these tests): the right key's tokens are
/// admitted, and tokens signed with another key or another algorithm are not.
#[tokio::test]
async fn public_key_tokens_rs256_and_es256() {
    let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let pem = |name: &str| std::fs::read(fixture(name)).unwrap();
    let claims = json!({"sub": "a", "exp": now() + 3600, "channels": ["news"]});
    let signed = |alg: Algorithm, key: EncodingKey| jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
    let rsa = signed(Algorithm::RS256, EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap());
    let other_rsa = signed(Algorithm::RS256, EncodingKey::from_rsa_pem(&pem("rsa-other-private.pem")).unwrap());
    let ec = signed(Algorithm::ES256, EncodingKey::from_ec_pem(&pem("ec-private.pem")).unwrap());
    let hs = sign(Algorithm::HS256, SECRET, claims.clone());
    for (public, good, bad) in
        [("rsa-public.pem", &rsa, [&other_rsa, &ec, &hs]), ("ec-public.pem", &ec, [&rsa, &other_rsa, &hs])]
    {
        let s = Server::start_with(&[("HERALD_AUTH_JWT_PUBLIC_KEY", &fixture(public))]);
        let (st, v) = status(&s, "GET", "/api/channels/news/messages", Some(good), None).await;
        assert_eq!(st, 200, "{public}: {v}");
        let (st, v) = status(&s, "GET", "/api/channels/other/messages", Some(good), None).await;
        assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{public}: the grant still holds");
        for token in bad {
            let (st, v) = status(&s, "GET", "/api/channels/news/messages", Some(token), None).await;
            assert_eq!((st, v["code"].as_str()), (401, Some("invalid_token")), "{public}: {v}");
        }
    }
}
