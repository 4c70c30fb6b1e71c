//! Inboxes and live unread counts (the red dot) across transports, groups and
//! everyone-notifications, read marks, and a 100,000-member group.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;

const KEY: &str = "backend-key";
const SECRET: &str = "inbox-test-secret";

fn server() -> Server {
    Server::start_with(&[("HERALD_AUTH_JWT_SECRET", SECRET), ("HERALD_AUTH_API_KEYS", KEY)])
}

fn token(sub: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "--sub", sub, "--channels", "chat/#"])
        .env("HERALD_AUTH_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn call(s: &Server, method: &str, path: &str, auth: &str, body: Option<Value>) -> Value {
    let mut req = client().request(method.parse().unwrap(), format!("{}{path}", s.url)).bearer_auth(auth);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    v
}

async fn ws_next(ws: &mut (impl StreamExt<Item = Result<Ws, tokio_tungstenite::tungstenite::Error>> + Unpin)) -> Value {
    let frame =
        tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10s").unwrap().unwrap();
    serde_json::from_str(frame.to_text().unwrap()).unwrap()
}

async fn next_unread(ev: &mut (impl futures_util::Stream<Item = eventsource_stream::Event> + Unpin)) -> u64 {
    loop {
        let e = next_event(ev).await.expect("stream open");
        if e.event == "unread" {
            return serde_json::from_str::<Value>(&e.data).unwrap()["count"].as_u64().unwrap();
        }
    }
}

async fn next_ws_unread(
    ws: &mut (impl StreamExt<Item = Result<Ws, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> u64 {
    loop {
        let v = ws_next(ws).await;
        if v["type"] == "unread" {
            return v["count"].as_u64().unwrap();
        }
    }
}

#[tokio::test]
async fn counts_stay_in_sync_across_sse_websocket_and_long_poll() {
    let s = server();
    let t = token("u");
    // SSE: the current count comes first.
    let mut sse_ev = sse(&s, "/api/channels/user/u/events", &[("authorization", &format!("Bearer {t}"))]).await;
    assert_eq!(next_unread(&mut sse_ev).await, 0);
    // WebSocket: subscribing to the inbox sends the count.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?token={t}", s.ws_url())).await.unwrap();
    ws.send(Ws::text(r#"{"type":"subscribe","channel":"user/u"}"#)).await.unwrap();
    assert_eq!(next_ws_unread(&mut ws).await, 0);
    // Long poll: says it shows 0, so it waits for a change.
    let url = format!("{}/api/channels/user/u/messages?since=0&wait=30&unread=0", s.url);
    let tok = t.clone();
    let poll = tokio::spawn(async move { client().get(url).bearer_auth(tok).send().await.unwrap() });

    call(&s, "POST", "/api/notifications", KEY, Some(json!({"users":["u"],"title":"hello"}))).await;
    assert_eq!(next_unread(&mut sse_ev).await, 1);
    assert_eq!(next_ws_unread(&mut ws).await, 1);
    let res = poll.await.unwrap();
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    assert_eq!(page["unread"], 1);
    assert_eq!(page["messages"][0]["event"], "notification");

    // A group notification raises it too, although it is not on user/u.
    call(&s, "PUT", "/api/groups/team/members", KEY, Some(json!({"users":["u","v"]}))).await;
    call(&s, "POST", "/api/notifications", KEY, Some(json!({"group":"team","title":"standup"}))).await;
    assert_eq!(next_unread(&mut sse_ev).await, 2);
    assert_eq!(next_ws_unread(&mut ws).await, 2);
    // A long poll answers on a count change alone.
    let url = format!("{}/api/channels/user/u/messages?since=1&wait=30&unread=2", s.url);
    let tok = t.clone();
    let poll = tokio::spawn(async move { client().get(url).bearer_auth(tok).send().await.unwrap() });

    // Reading on one device clears it on the others.
    let v = call(&s, "POST", "/api/users/u/read", &t, Some(json!({"all":true}))).await;
    assert_eq!(v["count"], 0);
    assert_eq!(next_unread(&mut sse_ev).await, 0);
    assert_eq!(next_ws_unread(&mut ws).await, 0);
    let page: Value = poll.await.unwrap().json().await.unwrap();
    assert_eq!((page["unread"].as_u64(), page["messages"].as_array().unwrap().len()), (Some(0), 0));
}

#[tokio::test]
async fn inbox_listing_marks_and_audiences() {
    let s = server();
    let t = token("ann");
    call(&s, "POST", "/api/notifications", KEY, Some(json!({"all":true,"title":"old news"}))).await;
    call(&s, "POST", "/api/notifications", KEY, Some(json!({"group":"ops","title":"before ann joined"}))).await;
    call(&s, "PUT", "/api/groups/ops/members", KEY, Some(json!({"users":["ann"]}))).await;
    call(&s, "POST", "/api/notifications", KEY, Some(json!({"group":"ops","title":"pager","data":{"sev":2}}))).await;
    let v =
        call(&s, "POST", "/api/notifications", KEY, Some(json!({"users":["ann","bob"],"title":"direct","body":"hi"})))
            .await;
    assert_eq!(v["results"].as_array().unwrap().len(), 2, "one message per named user");

    let list = call(&s, "GET", "/api/users/ann/notifications", &t, None).await;
    let items = list["notifications"].as_array().unwrap();
    let titles: Vec<&str> = items.iter().map(|n| n["title"].as_str().unwrap()).collect();
    let mut sorted = titles.clone();
    sorted.sort();
    assert_eq!(sorted, ["direct", "old news", "pager"], "nothing from before joining the group");
    let times: Vec<&str> = items.iter().map(|n| n["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    assert_eq!(titles[2], "old news");
    assert_eq!(list["unread"], 3);
    let by_title = |t: &str| items.iter().find(|n| n["title"] == t).unwrap().clone();
    let pager = by_title("pager");
    assert_eq!((pager["data"].clone(), pager["read"].as_bool()), (json!({"sev":2}), Some(false)));
    assert_eq!(by_title("direct")["body"], "hi");

    // Mark one read by id; the unread filter and the count follow.
    let id = pager["id"].as_str().unwrap();
    assert_eq!(call(&s, "POST", "/api/users/ann/read", &t, Some(json!({"ids":[id]}))).await["count"], 2);
    let unread = call(&s, "GET", "/api/users/ann/notifications?unread=true", &t, None).await;
    assert_eq!(unread["notifications"].as_array().unwrap().len(), 2);
    assert_eq!(call(&s, "GET", "/api/users/ann/unread", &t, None).await["count"], 2);

    // Paging: one at a time, following `next`, visits every item once.
    let mut seen = Vec::new();
    let mut path = "/api/users/ann/notifications?limit=1".to_string();
    loop {
        let page = call(&s, "GET", &path, &t, None).await;
        seen.extend(page["notifications"].as_array().unwrap().iter().map(|n| n["title"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/users/ann/notifications?limit=1&before={}", urlencode(next)),
            None => break,
        }
    }
    assert_eq!(seen, titles, "the same order, each item once");

    // Leaving the group removes its notifications from the inbox.
    call(&s, "DELETE", "/api/groups/ops/members", KEY, Some(json!({"users":["ann"]}))).await;
    assert_eq!(call(&s, "GET", "/api/users/ann/unread", &t, None).await["count"], 2);
    assert_eq!(call(&s, "GET", "/api/users/bob/unread", KEY, None).await["count"], 2, "bob: direct + everyone");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// 100,000 users in one group, one notification: it is one message, and the
/// sampled users' counts are right. (The cost figures are in BENCHMARKS.md.)
#[tokio::test]
async fn group_of_100k_is_one_write() {
    let s = server();
    let users: Vec<String> = (0..100_000).map(|i| format!("user{i}")).collect();
    let v = call(&s, "PUT", "/api/groups/everyone-big/members", KEY, Some(json!({ "users": users }))).await;
    assert_eq!(v["added"], 100_000);
    let v = call(&s, "POST", "/api/notifications", KEY, Some(json!({"group":"everyone-big","title":"release"}))).await;
    assert_eq!(v, json!({"channel":"$group/everyone-big","id":1}), "one message for the whole group");
    for i in [0, 1, 4_999, 50_000, 99_999] {
        assert_eq!(call(&s, "GET", &format!("/api/users/user{i}/unread"), KEY, None).await["count"], 1, "user{i}");
    }
    assert_eq!(call(&s, "GET", "/api/users/not-a-member/unread", KEY, None).await["count"], 0);
    let members = call(&s, "GET", "/api/groups/everyone-big/members?limit=3", KEY, None).await;
    assert_eq!(members["members"], json!(["user0", "user1", "user10"]));
}

#[tokio::test]
async fn notification_input_is_validated() {
    let s = server();
    for (body, code) in [
        (json!({"title":"x"}), "invalid_request"),
        (json!({"users":["a"],"group":"g","title":"x"}), "invalid_request"),
        (json!({"users":[],"title":"x"}), "invalid_request"),
        (json!({"users":["a/b"],"title":"x"}), "invalid_user"),
        (json!({"users":["u".repeat(300)],"title":"x"}), "invalid_user"),
        (json!({"group":"g".repeat(300),"title":"x"}), "invalid_group"),
        (json!({"group":"..","title":"x"}), "invalid_group"),
        (json!({"all":true}), "invalid_request"),
    ] {
        let res =
            client().post(format!("{}/api/notifications", s.url)).bearer_auth(KEY).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 400, "{body}");
        assert_eq!(res.json::<Value>().await.unwrap()["code"], code, "{body}");
    }
    let res = client()
        .post(format!("{}/api/users/a/read", s.url))
        .bearer_auth(KEY)
        .json(&json!({"ids":["nope"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "invalid_id");
}
