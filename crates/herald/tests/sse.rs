//! Server-Sent Events, against the real binary with a real SSE parser.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn replays_history_then_goes_live() {
    let s = Server::start();
    publish_json(&s, "chat/room/Default", Some("chat"), &json!({"from":"bob","msg":"one"})).await;
    publish(&s, "chat/room/Default", "two").await;
    let mut ev = sse(&s, "/api/channels/chat/room/Default/events", &[]).await;
    let e = next_event(&mut ev).await.unwrap();
    assert_eq!((e.id.as_str(), e.event.as_str()), ("1", "chat"));
    assert_eq!(serde_json::from_str::<Value>(&e.data).unwrap(), json!({"from":"bob","msg":"one"}));
    let e = next_event(&mut ev).await.unwrap();
    assert_eq!(
        (e.id.as_str(), e.event.as_str(), e.data.as_str()),
        ("2", "message", "two"),
        "no event: line when unnamed"
    );
    assert_eq!(e.retry, None);
    publish(&s, "chat/room/Default", "three").await;
    let e = next_event(&mut ev).await.unwrap();
    assert_eq!((e.id.as_str(), e.data.as_str()), ("3", "three"));
}

#[tokio::test]
async fn stream_starts_with_retry_and_splits_multiline_data() {
    let s = Server::start();
    publish(&s, "c", "line 1\nline 2\r\nline 3").await;
    let res = client().get(format!("{}/api/channels/c/events", s.url)).send().await.unwrap();
    let mut body = res.bytes_stream();
    let mut text = String::new();
    while !text.contains("line 3") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.starts_with("retry: 3000\n\n"), "{text:?}");
    assert!(text.contains("id: 1\ndata: line 1\ndata: line 2\ndata: line 3\n\n"), "{text:?}");
}

#[tokio::test]
async fn resumes_from_last_event_id_header_query_or_since() {
    let s = Server::start();
    for i in 1..=5 {
        publish(&s, "c", &format!("m{i}")).await;
    }
    let first_id = |mut ev: std::pin::Pin<Box<dyn futures_util::Stream<Item = eventsource_stream::Event> + Send>>| async move {
        next_event(&mut ev).await.unwrap().id
    };
    let path = "/api/channels/c/events";
    assert_eq!(first_id(Box::pin(sse(&s, path, &[("last-event-id", "3")]).await)).await, "4");
    assert_eq!(first_id(Box::pin(sse(&s, &format!("{path}?lastEventId=2"), &[]).await)).await, "3");
    assert_eq!(first_id(Box::pin(sse(&s, &format!("{path}?since=4"), &[]).await)).await, "5");
    // A reconnecting browser sends the header while its URL still says since=0.
    assert_eq!(first_id(Box::pin(sse(&s, &format!("{path}?since=0"), &[("last-event-id", "4")]).await)).await, "5");
    // Bad cursors are refused before the stream starts.
    let res = client().get(format!("{}{path}", s.url)).header("last-event-id", "12abc").send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "invalid_cursor");
}

#[tokio::test]
async fn reconnect_gets_exactly_the_missed_messages() {
    let s = Server::start();
    let mut ev = sse(&s, "/api/channels/c/events", &[]).await;
    for i in 1..=3 {
        publish(&s, "c", &i.to_string()).await;
    }
    let mut last = String::new();
    for want in ["1", "2", "3"] {
        let e = next_event(&mut ev).await.unwrap();
        assert_eq!(e.data, want);
        last = e.id;
    }
    drop(ev); // the client goes away while others keep posting
    for i in 4..=6 {
        publish(&s, "c", &i.to_string()).await;
    }
    let mut ev = sse(&s, "/api/channels/c/events", &[("last-event-id", &last)]).await;
    for want in ["4", "5", "6"] {
        assert_eq!(next_event(&mut ev).await.unwrap().data, want);
    }
    publish(&s, "c", "7").await;
    assert_eq!(next_event(&mut ev).await.unwrap().data, "7", "then live, with nothing repeated");
}

#[tokio::test]
async fn gap_event_when_the_cursor_is_older_than_the_history() {
    let s = Server::start_with(&[("HERALD_HISTORY_SIZE", "2")]);
    for i in 1..=6 {
        publish(&s, "c", &i.to_string()).await;
    }
    let mut ev = sse(&s, "/api/channels/c/events", &[("last-event-id", "1")]).await;
    let gap = next_event(&mut ev).await.unwrap();
    assert_eq!(gap.event, "gap");
    assert_eq!(serde_json::from_str::<Value>(&gap.data).unwrap(), json!({"channel":"c","from":2,"to":4}));
    assert_eq!(next_event(&mut ev).await.unwrap().id, "5");
    assert_eq!(next_event(&mut ev).await.unwrap().id, "6");
}

#[tokio::test]
async fn heartbeat_comments_keep_a_quiet_stream_alive() {
    let s = Server::start_with(&[("HERALD_SSE_HEARTBEAT", "200ms")]);
    let res = client().get(format!("{}/api/channels/quiet/events", s.url)).send().await.unwrap();
    let mut body = res.bytes_stream();
    let mut text = String::new();
    while text.matches(": keep-alive").count() < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn max_lifetime_ends_the_stream_and_a_resume_misses_nothing() {
    let s = Server::start_with(&[("HERALD_SSE_MAX_LIFETIME", "500ms")]);
    publish(&s, "c", "1").await;
    let mut ev = sse(&s, "/api/channels/c/events", &[]).await;
    let e = next_event(&mut ev).await.unwrap();
    assert_eq!(e.id, "1");
    assert!(next_event(&mut ev).await.is_none(), "the server ends the stream after its lifetime");
    publish(&s, "c", "2").await;
    let mut ev = sse(&s, "/api/channels/c/events", &[("last-event-id", &e.id)]).await;
    assert_eq!(next_event(&mut ev).await.unwrap().data, "2");
}

#[tokio::test]
async fn multi_channel_stream_with_filters_and_token_resume() {
    let s = Server::start();
    publish(&s, "room/a", "a1").await;
    publish(&s, "room/b", "b1").await;
    publish(&s, "other", "o1").await;
    let mut ev = sse(&s, "/api/events?channel=room%2F%2B&channel=other", &[]).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..3 {
        let e = next_event(&mut ev).await.unwrap();
        let msg: Value = serde_json::from_str(&e.data).unwrap();
        seen.push(format!("{}:{}", msg["channel"].as_str().unwrap(), msg["data"].as_str().unwrap()));
        token = e.id;
    }
    seen.sort();
    assert_eq!(seen, ["other:o1", "room/a:a1", "room/b:b1"]);
    drop(ev);
    publish(&s, "room/a", "a2").await;
    publish(&s, "room/c", "c1").await; // a new channel under the filter
    let mut ev = sse(&s, "/api/events?channel=room%2F%2B&channel=other", &[("last-event-id", &token)]).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let msg: Value = serde_json::from_str(&next_event(&mut ev).await.unwrap().data).unwrap();
        seen.push(msg["data"].as_str().unwrap().to_string());
    }
    seen.sort();
    assert_eq!(seen, ["a2", "c1"], "only what was missed, including a channel born meanwhile");
    let bad =
        client().get(format!("{}/api/events?channel=x", s.url)).header("last-event-id", "x=1,=").send().await.unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn envelope_mode_drops_event_lines() {
    let s = Server::start();
    publish_json(&s, "c", Some("chat"), &json!({"x":1})).await;
    let mut ev = sse(&s, "/api/events?channel=c&envelope=1", &[]).await;
    let e = next_event(&mut ev).await.unwrap();
    assert_eq!(e.event, "message");
    let msg: Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!((msg["event"].as_str(), msg["id"].as_u64()), (Some("chat"), Some(1)));
    assert_eq!(e.id, "c=1");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_exits_cleanly() {
    let mut s = Server::start();
    publish(&s, "c", "1").await;
    let mut ev = sse(&s, "/api/channels/c/events", &[]).await;
    assert_eq!(next_event(&mut ev).await.unwrap().data, "1");
    let status = s.stop();
    assert!(status.success(), "exit status {status}");
    assert!(next_event(&mut ev).await.is_none(), "the stream was ended, not cut");
}
