//! Logs an operator can ship: `--log-format json` writes one JSON object a
//! line, every line; each connection's end is logged once, at debug, with
//! its transport, duration and reason; and no token, key or secret ever
//! reaches the logs, whichever way it was sent.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message as Ws, client::IntoClientRequest};

const KEY: &str = "key-9f8e7d6c5b4a";
const SECRET: &str = "jwt-secret-0a1b2c3d4e5f";

fn user_token(sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp, "channels": ["#"], "publish": ["#"]}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The parsed JSON lines of a log, failing on any line that is not one.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// Polls the log until `done` holds (the server writes asynchronously).
async fn log_until(s: &Server, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.log();
        if done(&log) {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "log never got there:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_and_name_each_connection_end() {
    let mut s =
        Server::start_logged(&[("HERALD_LOG", "debug"), ("HERALD_SERVER_NODE", "node-7")], &["--log-format", "json"]);
    // An SSE stream the client leaves, a WebSocket it closes, a long poll
    // that times out, an MQTT client that disconnects.
    let events = sse(&s, "/api/channels/j/events?since=now", &[]).await;
    drop(events);
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    ws.send(Ws::text(r#"{"type":"ping"}"#)).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    let res = client().get(format!("{}/api/channels/j/messages?since=0&wait=1", s.url)).send().await.unwrap();
    assert_eq!(res.status(), 304);
    let port = s.mqtt.rsplit(':').next().unwrap().to_string();
    let st = Command::new("mosquitto_pub").args(["-h", "127.0.0.1", "-p", &port, "-t", "j", "-m", "x"]).status();
    assert!(st.unwrap().success());

    let ended = |log: &str| log.matches("connection ended").count();
    let log = log_until(&s, |l| ended(l) >= 4).await;
    let lines = json_lines(&log);
    let ends: Vec<&Value> = lines.iter().filter(|l| l["message"] == "connection ended").collect();
    let find = |t: &str| {
        let found: Vec<_> = ends.iter().filter(|e| e["transport"] == t).collect();
        assert_eq!(found.len(), 1, "one end logged for {t}: {ends:?}");
        found[0]
    };
    for (t, reason) in [("sse", "client"), ("ws", "client"), ("longpoll", "not_modified"), ("mqtt", "client")] {
        let e = find(t);
        assert_eq!(e["reason"], reason, "{e}");
        assert_eq!(e["level"], "DEBUG", "{e}");
        assert!(e["duration_s"].as_f64().is_some_and(|d| d >= 0.0), "{e}");
        assert!(e["timestamp"].is_string(), "{e}");
        assert_eq!(e["node"], "node-7", "every line names its node: {e}");
    }
    let lp = find("longpoll")["duration_s"].as_f64().unwrap();
    assert!(lp >= 0.9, "the long poll waited its second: {lp}");

    // Shutdown is logged the same way, to the end.
    assert!(s.stop().success());
    let lines = json_lines(&s.log());
    assert!(lines.iter().any(|l| l["message"] == "stopped"), "{lines:?}");
}

#[tokio::test]
async fn text_logs_stay_the_default() {
    let s = Server::start_logged(&[("HERALD_LOG", "info")], &[]);
    let log = log_until(&s, |l| l.contains("serving")).await;
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");
    // The node (by default host and port) leads every line once bound.
    let serving = log.lines().find(|l| l.contains("serving")).unwrap();
    let port = s.addr.rsplit(':').next().unwrap();
    assert!(
        serving.starts_with("node=") && serving.split(' ').next().unwrap().ends_with(&format!(":{port}")),
        "{serving}"
    );
}

/// Every way a credential travels (headers, `?token=`, the MQTT password;
/// API keys and user tokens, good and bad), with everything logged down to
/// trace: none of them, nor the JWT secret, shows up.
#[tokio::test]
async fn no_token_key_or_secret_is_ever_logged() {
    let s = Server::start_logged(
        &[("HERALD_LOG", "trace"), ("HERALD_AUTH_API_KEYS", KEY), ("HERALD_AUTH_JWT_SECRET", SECRET)],
        &["--log-format", "json"],
    );
    let user = user_token("ann");
    let forged = format!("{}x", &user[..user.len() - 1]);
    // Headers and query strings, accepted and refused.
    for cred in [KEY, user.as_str(), forged.as_str(), "not-a-key-77aa"] {
        let res = client().post(format!("{}/api/channels/t", s.url)).bearer_auth(cred).body("x").send().await.unwrap();
        assert!(res.status() == 200 || res.status() == 401, "{}", res.status());
        let res = client().get(format!("{}/api/channels/t/messages?since=0&token={cred}", s.url)).send().await;
        assert!(res.is_ok());
        let mut events = client()
            .get(format!("{}/api/channels/user/ann/events?token={cred}", s.url))
            .send()
            .await
            .unwrap()
            .bytes_stream();
        // The first chunk (or the refusal) is enough.
        let _ = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
    }
    // WebSocket with the key in a header and the token in the query.
    let mut req = s.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Ws::text(r#"{"type":"subscribe","channel":"t","since":0}"#)).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?token={user}", s.ws_url())).await.unwrap();
    ws.close(None).await.unwrap();
    // MQTT passwords, good and bad.
    let port = s.mqtt.rsplit(':').next().unwrap().to_string();
    for password in [KEY, user.as_str(), "wrong-password-55cc"] {
        let _ = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-t", "t", "-m", "x", "-u", "ann", "-P", password])
            .status();
    }
    // Everything above has ended (and been logged) once its ends are in.
    // One SSE stream (the user's token; an API key in a query string is
    // refused before a stream opens), two WebSockets, three MQTT
    // connections (one refused).
    let log = log_until(&s, |l| l.matches("\"connection ended\"").count() >= 6).await;
    assert!(log.contains("\"level\":\"DEBUG\""), "debug logging was on:\n{log}");
    let signature = user.rsplit('.').next().unwrap();
    for (what, secret) in [
        ("API key", KEY),
        ("JWT secret", SECRET),
        ("user token", user.as_str()),
        ("user token's signature", signature),
        ("forged token", forged.as_str()),
        ("unknown key", "not-a-key-77aa"),
        ("wrong MQTT password", "wrong-password-55cc"),
    ] {
        assert!(!log.contains(secret), "the {what} is in the log:\n{log}");
    }
}
