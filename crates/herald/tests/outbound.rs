//! The outbound API's edges against the real binary: contacts, deliveries
//! and jobs answer API keys only (a user's own token never sees the user's
//! address), bad input gets its error code, and `/api/stats` shows the
//! outbound counters. What is sent is tested with a real SMTP relay and
//! webhook receiver in `tests/outbound/` (Python).

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-0123456789";
const KEY: &str = "backend-key";

fn user_token(sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = json!({"sub": sub, "exp": exp, "channels": ["#"], "publish": ["#"]});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn server() -> Server {
    Server::start_with(&[("HERALD_AUTH_JWT_SECRET", SECRET), ("HERALD_AUTH_API_KEYS", KEY)])
}

async fn call(s: &Server, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method.parse().unwrap(), format!("{}{path}", s.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, serde_json::from_str(&res.text().await.unwrap()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_contact_is_set_and_read_with_an_api_key_only() {
    let s = server();
    let (st, v) = call(&s, "PUT", "/api/users/ann/contact", Some(KEY), Some(json!({"email": "ann@example.com"}))).await;
    assert_eq!((st, &v), (200, &json!({"user": "ann", "email": "ann@example.com"})));
    let (st, v) = call(&s, "GET", "/api/users/ann/contact", Some(KEY), None).await;
    assert_eq!((st, v["email"].as_str()), (200, Some("ann@example.com")));

    // Never shown to (or changed by) the user's own token, nor anyone else's.
    let ann = user_token("ann");
    for (method, body) in [("GET", None), ("PUT", Some(json!({"email": "evil@example.com"})))] {
        let (st, v) = call(&s, method, "/api/users/ann/contact", Some(&ann), body).await;
        assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{method}: {v}");
        assert!(!v.to_string().contains("ann@example.com"), "{v}");
    }
    let (st, _) = call(&s, "GET", "/api/users/ann/contact", None, None).await;
    assert_eq!(st, 401);
    for path in ["/api/users/ann/deliveries", "/api/jobs?state=dead"] {
        let (st, _) = call(&s, "GET", path, Some(&ann), None).await;
        assert_eq!(st, 403, "{path}");
    }
    let (st, _) = call(&s, "POST", "/api/jobs/1/retry", Some(&ann), None).await;
    assert_eq!(st, 403);
    let (_, v) = call(&s, "GET", "/api/users/ann/contact", Some(KEY), None).await;
    assert_eq!(v["email"], "ann@example.com", "the refused PUT changed nothing");

    // null removes it.
    let (st, _) = call(&s, "PUT", "/api/users/ann/contact", Some(KEY), Some(json!({"email": null}))).await;
    assert_eq!(st, 200);
    let (_, v) = call(&s, "GET", "/api/users/ann/contact", Some(KEY), None).await;
    assert_eq!(v["email"], Value::Null);
}

#[tokio::test]
async fn bad_input_gets_its_error_code() {
    let s = server();
    let cases = [
        ("PUT", "/api/users/ann/contact", Some(json!({"email": "not an address"})), 400, "invalid_email"),
        ("PUT", "/api/users/ann/contact", Some(json!({"mail": "a@b.c"})), 400, "invalid_request"),
        ("PUT", "/api/users/a%2Fb/contact", Some(json!({"email": "a@b.c"})), 400, "invalid_user"),
        ("GET", "/api/jobs?state=finished", None, 400, "invalid_parameter"),
        ("GET", "/api/jobs?after=x", None, 400, "invalid_parameter"),
        ("POST", "/api/jobs/abc/retry", None, 400, "invalid_id"),
        ("POST", "/api/jobs/12345/retry", None, 404, "job_not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (st, v) = call(&s, method, path, Some(KEY), body).await;
        assert_eq!((st, v["code"].as_str()), (status, Some(code)), "{method} {path}: {v}");
    }
    let bad_fallbacks = [json!("5m"), json!({"delay": "soon"}), json!({"channels": ["sms"]}), json!({"when": "5m"})];
    for f in bad_fallbacks {
        let body = json!({"users": ["ann"], "title": "t", "fallback": f});
        let (st, v) = call(&s, "POST", "/api/notifications", Some(KEY), Some(body)).await;
        assert_eq!((st, v["code"].as_str()), (400, Some("invalid_request")), "{f}: {v}");
    }
    let ok = json!({"users": ["ann"], "title": "t", "fallback": {"delay": "5m", "channels": ["email"]}});
    assert_eq!(call(&s, "POST", "/api/notifications", Some(KEY), Some(ok)).await.0, 200);
    // The fallback field is the server's business: the inbox listing leaves it out.
    let (_, list) = call(&s, "GET", "/api/users/ann/notifications", Some(KEY), None).await;
    assert!(list["notifications"][0].get("fallback").is_none(), "{list}");
}

#[tokio::test]
async fn stats_show_the_outbound_queue_and_sends() {
    let s = Server::start();
    let (st, v) = get_json(&s, "/api/stats").await;
    assert_eq!(st, 200);
    let o = &v["outbound"];
    assert_eq!(o["fallback"], false);
    assert_eq!(o["jobs"], json!({"pending": 0, "running": 0, "dead": 0}));
    assert_eq!(o["oldest_due_late_ms"], 0);
    for via in ["webhook", "email"] {
        assert_eq!(o["sends"][via], json!({"sent": 0, "retried": 0, "dead": 0, "skipped": 0}), "{via}");
    }
    let (st, v) = get_json(&s, "/api/jobs?state=pending").await;
    assert_eq!((st, v), (200, json!({"jobs": [], "next": null})));
}

/// A configuration that cannot work is refused at start, with the reason.
#[test]
fn a_bad_outbound_configuration_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--memory", "--http", "127.0.0.1:0", "--mqtt", "off"])
        .env("HERALD_WEBHOOKS_URL", "http://127.0.0.1:9/hook")
        .env("HERALD_WEBHOOKS_SECRET", "not-a-whsec-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[webhooks] secret") && err.contains("whsec_"), "{err}");
}
