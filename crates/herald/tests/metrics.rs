//! `/metrics` against the real tools of the Prometheus ecosystem: the live
//! output of a server that has seen traffic on every transport passes
//! `promtool check metrics` (Debian's `prometheus` package) and counts what
//! happened; a real Prometheus scrapes a running server (with the API key)
//! and answers queries about it; the route is protected like every operator
//! call, or served on an address of its own.

mod common;
#[path = "../../herald-store/tests/redis_server/mod.rs"]
mod redis_server;

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message as Ws, client::IntoClientRequest};

const KEY: &str = "metrics-test-key";

/// The value of series `name` whose labels include `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then(|| v.parse().ok())?
    })
}

async fn scrape(url: &str, key: Option<&str>) -> (u16, String) {
    let mut req = client().get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    if status == 200 {
        assert_eq!(res.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    }
    (status, res.text().await.unwrap())
}

/// `promtool check metrics` on `text`: its verdict and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Polls `url` until `ready` holds for the metrics text, within 10 s.
async fn scrape_until(url: &str, key: Option<&str>, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = scrape(url, key).await;
        assert_eq!(status, 200, "{text}");
        if ready(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "not reached within 10 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn live_output_passes_promtool_and_counts_every_transport() {
    let s = Server::start_with(&[("HERALD_AUTH_API_KEYS", KEY)]);
    let url = format!("{}/metrics", s.url);
    let auth = &[("authorization", &*format!("Bearer {KEY}"))];

    // An SSE stream that gets one message live, then leaves.
    let mut events = sse(&s, "/api/channels/m/events?since=now", auth).await;
    let published =
        client().post(format!("{}/api/channels/m", s.url)).bearer_auth(KEY).body("one").send().await.unwrap();
    assert_eq!(published.status(), 200);
    assert_eq!(next_event(&mut events).await.unwrap().data, "one");
    drop(events);

    // A WebSocket that publishes once and closes.
    let mut req = s.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("WebSocket connects");
    ws.send(Ws::text(r#"{"type":"publish","channel":"m","data":"two","ref":1}"#)).await.unwrap();
    while let Some(Ok(frame)) = ws.next().await {
        if frame.to_text().unwrap_or("").contains("\"published\"") {
            break;
        }
    }
    ws.close(None).await.unwrap();

    // MQTT through mosquitto_pub (QoS 1: it waits for the PUBACK).
    let port = s.mqtt.rsplit(':').next().unwrap();
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-q", "1", "-t", "m", "-m", "three", "-P", KEY, "-u", "u"])
        .status()
        .unwrap();
    assert!(st.success());

    // A long poll answered, and one that waits out its time.
    let poll = |q: &str| client().get(format!("{}/api/channels/m/messages?{q}", s.url)).bearer_auth(KEY).send();
    let res = poll("since=2&wait=5").await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(poll("since=3&wait=1").await.unwrap().status(), 304);

    // A notification and a read mark.
    let res = client()
        .post(format!("{}/api/notifications", s.url))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"users":["ann","bob"],"title":"hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client()
        .post(format!("{}/api/users/ann/read", s.url))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"all":true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Connections are counted closed when their task ends: wait for that.
    let text = scrape_until(&url, Some(KEY), |t| {
        value(t, "herald_connections_open", &[("transport", "sse")]) == Some(0.0)
            && value(t, "herald_connections_open", &[("transport", "ws")]) == Some(0.0)
            && value(t, "herald_connections_open", &[("transport", "mqtt")]) == Some(0.0)
    })
    .await;
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics failed: {said}\n{text}");

    let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
    assert_eq!(v("herald_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert_eq!(v("herald_messages_published_total", &[("source", "http")]), Some(1.0));
    assert_eq!(v("herald_messages_published_total", &[("source", "ws")]), Some(1.0));
    assert_eq!(v("herald_messages_published_total", &[("source", "mqtt")]), Some(1.0));
    assert_eq!(v("herald_messages_published_total", &[("source", "notification")]), Some(2.0));
    assert_eq!(v("herald_messages_committed_total", &[]), Some(5.0));
    assert_eq!(v("herald_messages_delivered_total", &[("transport", "sse")]), Some(1.0));
    assert_eq!(v("herald_messages_delivered_total", &[("transport", "longpoll")]), Some(1.0));
    assert_eq!(v("herald_delivery_latency_seconds_count", &[("transport", "sse")]), Some(1.0));
    for t in ["sse", "ws", "mqtt"] {
        assert_eq!(v("herald_connections_opened_total", &[("transport", t)]), Some(1.0), "{t}");
        assert_eq!(v("herald_connections_closed_total", &[("transport", t), ("reason", "client")]), Some(1.0), "{t}");
    }
    assert_eq!(v("herald_connections_closed_total", &[("transport", "longpoll"), ("reason", "answered")]), Some(1.0));
    assert_eq!(
        v("herald_connections_closed_total", &[("transport", "longpoll"), ("reason", "not_modified")]),
        Some(1.0)
    );
    assert_eq!(v("herald_inbox_notifications_total", &[("audience", "users")]), Some(2.0));
    assert_eq!(v("herald_inbox_read_marks_total", &[]), Some(1.0));
    assert!(v("herald_store_commit_seconds_count", &[]).unwrap() >= 4.0, "{text}");
    assert_eq!(v("herald_mqtt_sessions", &[("state", "live")]), Some(0.0));
}

#[tokio::test]
async fn metrics_need_an_api_key_once_auth_is_configured() {
    let s = Server::start_with(&[("HERALD_AUTH_API_KEYS", KEY), ("HERALD_AUTH_JWT_SECRET", "a-secret-of-some-length")]);
    let url = format!("{}/metrics", s.url);
    let (status, body) = scrape(&url, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], "missing_token");
    let (status, _) = scrape(&url, Some("wrong-key")).await;
    assert_eq!(status, 401);
    let user = herald_token("a-secret-of-some-length", "ann");
    let (status, body) = scrape(&url, Some(&user)).await;
    assert_eq!(status, 403, "a user's token is not an operator's");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], "forbidden");
    let (status, text) = scrape(&url, Some(KEY)).await;
    assert_eq!(status, 200);
    assert!(text.contains("herald_build_info{"), "{text}");
}

fn herald_token(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_metrics_address_of_its_own_needs_no_key_and_takes_the_route_off_the_api() {
    let s = Server::start_with(&[("HERALD_AUTH_API_KEYS", KEY), ("HERALD_METRICS_LISTEN", "127.0.0.1:0")]);
    let own = s.metrics_url.clone().expect("the metrics line");
    let (status, text) = scrape(&own, None).await;
    assert_eq!(status, 200);
    assert!(promtool(&text).0, "{text}");
    let (status, _) = scrape(&format!("{}/metrics", s.url), Some(KEY)).await;
    assert_eq!(status, 404, "not on the HTTP address any more");
    let (status, _) = scrape(&own.replace("/metrics", "/api/stats"), None).await;
    assert_eq!(status, 404, "nothing else on the metrics address");
}

/// A Prometheus server (Debian's), on loopback, with its own storage.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second, with the API key.
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: herald\n    \
                 authorization:\n      credentials: {KEY}\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package; scripts/test installs it)");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// The value of an instant query with one result, once it has one
    /// (within 30 s: start-up, then a scrape a second).
    async fn query_until(&self, query: &str, want: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let url = format!("{}/api/v1/query?query={}", self.url, percent_encode(query));
            if let Ok(res) = client().get(url).send().await
                && let Ok(v) = res.json::<Value>().await
            {
                let got = v["data"]["result"][0]["value"][1].as_str().and_then(|x| x.parse::<f64>().ok());
                if let Some(x) = got.filter(|x| want(*x)) {
                    return x;
                }
                last = v;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("Prometheus never answered {query} as wanted; last answer: {last}");
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_herald_and_answers_queries() {
    let s = Server::start_with(&[("HERALD_AUTH_API_KEYS", KEY)]);
    for i in 0..3 {
        let res = client().post(format!("{}/api/channels/p", s.url)).bearer_auth(KEY).body(format!("{i}")).send();
        assert_eq!(res.await.unwrap().status(), 200);
    }
    let _open = sse(&s, "/api/channels/p/events?since=0", &[("authorization", &*format!("Bearer {KEY}"))]).await;
    let prom = Prometheus::start(&s.addr);
    // Scraped with the key: the target is up.
    prom.query_until("up{job=\"herald\"}", |v| v == 1.0).await;
    prom.query_until("herald_build_info", |v| v == 1.0).await;
    prom.query_until("herald_messages_published_total{source=\"http\"}", |v| v == 3.0).await;
    prom.query_until("herald_connections_open{transport=\"sse\"}", |v| v == 1.0).await;
    prom.query_until("sum(herald_messages_delivered_total)", |v| v == 3.0).await;
    // A histogram is usable as one: its buckets feed histogram_quantile.
    let p = prom.query_until("histogram_quantile(0.5, sum by (le) (herald_store_commit_seconds_bucket))", |v| v > 0.0);
    assert!(p.await.is_finite());
}

/// Over Redis the store's figures (those of `/api/stats`'s `redis` section)
/// are series too, and the commit histogram times each publish's script.
#[tokio::test]
async fn over_redis_the_store_exports_its_figures() {
    let redis = redis_server::RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let s = Server::start_with(&[
        ("HERALD_AUTH_API_KEYS", KEY),
        ("HERALD_REDIS_URL", &redis.url()),
        ("HERALD_REDIS_PARTITIONS", "4"),
    ]);
    let res = client().post(format!("{}/api/channels/r", s.url)).bearer_auth(KEY).body("x").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let url = format!("{}/metrics", s.url);
    let text = scrape_until(&url, Some(KEY), |t| value(t, "herald_redis_feed_received_total", &[]) >= Some(1.0)).await;
    let (ok, said) = promtool(&text);
    assert!(ok, "{said}\n{text}");
    assert_eq!(value(&text, "herald_store_available", &[]), Some(1.0));
    assert_eq!(value(&text, "herald_redis_shards", &[]), Some(1.0));
    assert_eq!(value(&text, "herald_redis_shards_available", &[]), Some(1.0));
    assert_eq!(value(&text, "herald_store_commit_seconds_count", &[]), Some(1.0), "{text}");
    assert_eq!(value(&text, "herald_messages_published_total", &[("source", "http")]), Some(1.0));
}
