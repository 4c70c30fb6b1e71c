//! Black-box tests of the WebSocket protocol at `/api/ws` (DESIGN.md,
//! "WebSocket protocol"), against the real binary with a real client.

mod clients;
mod common;

use std::collections::BTreeSet;

use clients::{SilentWs, Ws, id_of, publish_ids, text_of};
use common::{Server, get_json, next_event, publish, publish_json, sse};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

/// Asserts a `message` frame is message `id` of `channel` with the text
/// `publish_ids` gave it, and carries a time.
fn assert_message(v: &Value, channel: &str, id: u64) {
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["channel"], channel, "{v}");
    assert_eq!(id_of(v), id, "{v}");
    assert_eq!(v["data"], text_of(id), "{v}");
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "RFC 3339 UTC time in {v}");
}

#[tokio::test]
async fn subscribe_with_since_replays_history_after_the_subscribed_frame_then_goes_live() {
    let s = Server::start();
    publish_ids(&s, "room", 1..=3).await;
    let mut ws = Ws::connect(&s).await;

    let sub = ws.subscribe("room", Some(json!(1))).await;
    assert_eq!(sub["head"], 3, "head is the latest id at subscribe time: {sub}");
    assert_eq!(sub["gap"], false, "{sub}");
    for (v, id) in ws.messages(2).await.iter().zip(2..) {
        assert_message(v, "room", id);
    }

    publish_ids(&s, "room", 4..=4).await;
    assert_message(&ws.recv().await, "room", 4);
}

#[tokio::test]
async fn subscribe_without_since_replays_all_retained_history() {
    let s = Server::start();
    publish_ids(&s, "room", 1..=3).await;
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe("room", None).await;
    assert_eq!(sub["head"], 3);
    for (v, id) in ws.messages(3).await.iter().zip(1..) {
        assert_message(v, "room", id);
    }
}

#[tokio::test]
async fn subscribe_to_a_channel_never_published_to_has_head_zero_and_goes_live() {
    let s = Server::start();
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe("fresh", Some(json!(0))).await;
    assert_eq!(sub["head"], 0, "{sub}");
    assert_eq!(sub["gap"], false, "{sub}");
    publish_ids(&s, "fresh", 1..=1).await;
    assert_message(&ws.recv().await, "fresh", 1);
}

#[tokio::test]
async fn cursor_older_than_the_history_gets_a_gap_frame_then_the_oldest_retained() {
    let s = Server::start_with(&[("HERALD_HISTORY_SIZE", "5")]);
    publish_ids(&s, "news", 1..=12).await; // ids 8..=12 are retained
    let mut ws = Ws::connect(&s).await;

    let sub = ws.subscribe("news", Some(json!(2))).await;
    assert_eq!(sub["head"], 12, "{sub}");
    assert_eq!(sub["gap"], true, "the subscribed frame announces the gap: {sub}");
    let gap = ws.recv_type("gap").await;
    assert_eq!(gap["channel"], "news", "{gap}");
    assert_eq!((gap["from"].as_u64(), gap["to"].as_u64()), (Some(3), Some(7)), "ids 3..=7 are known lost: {gap}");
    for (v, id) in ws.messages(5).await.iter().zip(8..) {
        assert_message(v, "news", id);
    }

    // A cursor inside the history is no gap.
    let mut other = Ws::connect(&s).await;
    let sub = other.subscribe("news", Some(json!(7))).await;
    assert_eq!(sub["gap"], false, "cursor 7 is just before the oldest retained: {sub}");
    assert_message(&other.recv().await, "news", 8);
}

#[tokio::test]
async fn since_now_delivers_only_live_messages() {
    let s = Server::start();
    publish_ids(&s, "live", 1..=3).await;
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe("live", Some(json!("now"))).await;
    assert_eq!(sub["head"], 3, "{sub}");
    assert_eq!(sub["gap"], false, "{sub}");
    publish_ids(&s, "live", 4..=5).await;
    // The first thing after `subscribed` is the first live message, not history.
    assert_message(&ws.recv().await, "live", 4);
    assert_message(&ws.recv().await, "live", 5);
}

#[tokio::test]
async fn a_filter_selects_matching_channels_only() {
    let s = Server::start();
    publish_ids(&s, "chat/old", 1..=1).await; // history of a matching channel
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe("chat/+", Some(json!(0))).await;
    assert_eq!(sub["gap"], false, "{sub}");
    assert_message(&ws.recv().await, "chat/old", 1);

    publish_ids(&s, "chat/a", 1..=1).await;
    publish_ids(&s, "chat/a/deep", 1..=1).await; // `+` is one segment only
    publish_ids(&s, "other/a", 1..=1).await;
    publish_ids(&s, "chat", 1..=1).await;
    publish_ids(&s, "chat/b", 1..=2).await;

    let got: Vec<(String, u64)> =
        ws.messages(3).await.iter().map(|v| (v["channel"].as_str().unwrap().to_string(), id_of(v))).collect();
    assert_eq!(got, [("chat/a".to_string(), 1), ("chat/b".to_string(), 1), ("chat/b".to_string(), 2)]);
    // Nothing from the non-matching channels is queued behind them.
    ws.assert_usable().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_each_message_once() {
    let s = Server::start();
    publish_ids(&s, "chat/a", 1..=2).await;
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("chat/+", Some(json!(0))).await;
    ws.subscribe_more("chat/#", Some(json!(0))).await;
    ws.subscribe_more("chat/a", Some(json!(0))).await;
    publish_ids(&s, "chat/a", 3..=4).await;
    publish_ids(&s, "chat/b", 1..=1).await; // a marker: everything before it has arrived

    let mut got = Vec::new();
    loop {
        let v = ws.recv_type("message").await;
        if v["channel"] == "chat/b" {
            break;
        }
        assert_eq!(v["channel"], "chat/a", "{v}");
        got.push(id_of(&v));
    }
    assert_eq!(got, [1, 2, 3, 4], "history and live, each once, in order");
}

#[tokio::test]
async fn unsubscribe_stops_delivery_unless_another_subscription_covers_the_channel() {
    let s = Server::start();
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("a", None).await;
    ws.subscribe("b", None).await;
    ws.send_json(json!({ "type": "unsubscribe", "channel": "a" })).await;
    let ack = ws.recv_type("unsubscribed").await;
    assert_eq!(ack["channel"], "a", "{ack}");

    publish_ids(&s, "a", 1..=1).await;
    publish_ids(&s, "b", 1..=1).await;
    assert_message(&ws.recv().await, "b", 1); // not a's message first

    // Unsubscribing again is an error, and the connection stays usable.
    ws.send_json(json!({ "type": "unsubscribe", "channel": "a" })).await;
    assert_eq!(ws.recv_type("error").await["code"], "not_subscribed");
    ws.assert_usable().await;

    // With a filter still covering it, dropping the exact subscription keeps delivery.
    ws.subscribe("room/+", Some(json!("now"))).await;
    ws.subscribe("room/x", Some(json!("now"))).await;
    ws.send_json(json!({ "type": "unsubscribe", "channel": "room/x" })).await;
    ws.recv_type("unsubscribed").await;
    publish_ids(&s, "room/x", 1..=1).await;
    assert_message(&ws.recv().await, "room/x", 1);
    // And dropping the filter too stops it.
    ws.send_json(json!({ "type": "unsubscribe", "channel": "room/+" })).await;
    ws.recv_type("unsubscribed").await;
    publish_ids(&s, "room/x", 2..=2).await;
    publish_ids(&s, "b", 2..=2).await;
    assert_message(&ws.recv().await, "b", 2);
}

#[tokio::test]
async fn publish_with_ref_is_acknowledged_and_reaches_sse_and_ws_subscribers() {
    let s = Server::start();
    let mut events = sse(&s, "/api/channels/pub/x/events", &[]).await;
    let mut listener = Ws::connect(&s).await;
    listener.subscribe("pub/x", None).await;
    let mut ws = Ws::connect(&s).await;

    ws.send_json(json!({ "type": "publish", "channel": "pub/x", "data": { "k": [1, 2] }, "ref": "r1" })).await;
    let ack = ws.recv().await;
    assert_eq!(ack, json!({ "type": "published", "ref": "r1", "channel": "pub/x", "id": 1 }));

    ws.send_json(json!({ "type": "publish", "channel": "pub/x", "event": "chat", "data": "hi there", "ref": 7 })).await;
    let ack = ws.recv().await;
    assert_eq!(ack, json!({ "type": "published", "ref": 7, "channel": "pub/x", "id": 2 }));

    // SSE: JSON data as published, a JSON string as its text, the event name kept.
    let e = next_event(&mut events).await.expect("first SSE event");
    assert_eq!((e.id.as_str(), e.event.as_str()), ("1", "message"));
    assert_eq!(serde_json::from_str::<Value>(&e.data).unwrap(), json!({ "k": [1, 2] }));
    let e = next_event(&mut events).await.expect("second SSE event");
    assert_eq!((e.id.as_str(), e.event.as_str(), e.data.as_str()), ("2", "chat", "hi there"));

    // Another WebSocket subscriber gets both as message frames.
    let m = listener.recv_type("message").await;
    assert_eq!((id_of(&m), &m["data"]), (1, &json!({ "k": [1, 2] })));
    assert!(m.get("event").is_none(), "no event name when published without one: {m}");
    let m = listener.recv_type("message").await;
    assert_eq!((id_of(&m), &m["data"], &m["event"]), (2, &json!("hi there"), &json!("chat")));
}

#[tokio::test]
async fn publish_without_ref_is_acknowledged_with_the_id() {
    let s = Server::start();
    publish(&s, "p", "one").await;
    let mut ws = Ws::connect(&s).await;
    ws.send_json(json!({ "type": "publish", "channel": "p", "data": 2 })).await;
    let ack = ws.recv_type("published").await;
    assert_eq!((ack["channel"].as_str(), ack["id"].as_u64()), (Some("p"), Some(2)), "{ack}");
    let (status, page) = get_json(&s, "/api/channels/p/messages?since=1").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["data"], 2, "{page}");
}

#[tokio::test]
async fn ping_gets_pong() {
    let s = Server::start();
    let mut ws = Ws::connect(&s).await;
    for _ in 0..3 {
        ws.send_json(json!({ "type": "ping" })).await;
        assert_eq!(ws.recv().await, json!({ "type": "pong" }));
    }
}

#[tokio::test]
async fn each_bad_frame_gets_an_error_frame_and_the_connection_stays_usable() {
    let s = Server::start();
    let mut ws = Ws::connect(&s).await;
    let cases: Vec<(Message, &[&str])> = vec![
        (Message::text("this is not JSON"), &["invalid_json"]),
        (Message::text("{\"type\":\"subscribe\",\"channel\":"), &["invalid_json"]),
        (Message::text(r#"{"type":"frobnicate","channel":"a"}"#), &["invalid_frame"]),
        (Message::text(r#"{"channel":"a"}"#), &["invalid_frame"]),
        (Message::text(r#"{"type":"subscribe"}"#), &["invalid_frame"]),
        (Message::text(r#"{"type":"publish","data":1}"#), &["invalid_frame"]),
        (Message::text(r#"{"type":"publish","channel":"a"}"#), &["invalid_frame"]),
        (Message::text(r#"{"type":"subscribe","channel":"a","colour":"red"}"#), &["invalid_frame"]),
        (Message::text(r#"{"type":"subscribe","channel":"a/../b"}"#), &["invalid_channel", "invalid_filter"]),
        (Message::text(r#"{"type":"subscribe","channel":"a/#/b"}"#), &["invalid_filter"]),
        (Message::text(r#"{"type":"subscribe","channel":"a","since":"yesterday"}"#), &["invalid_cursor"]),
        (Message::text(r#"{"type":"publish","channel":"a//b","data":1}"#), &["invalid_channel"]),
        (Message::text(r#"{"type":"publish","channel":"chat/+","data":1}"#), &["invalid_channel"]),
        (Message::text(r#"{"type":"publish","channel":"$sys","data":1}"#), &["reserved_channel"]),
        (Message::text(r#"{"type":"publish","channel":"a","event":"gap","data":1}"#), &["reserved_event"]),
        (Message::text(r#"{"type":"publish","channel":"a","event":"no spaces","data":1}"#), &["invalid_event"]),
        (Message::binary(b"{\"type\":\"ping\"}".to_vec()), &["invalid_frame"]),
    ];
    for (frame, codes) in cases {
        let shown = format!("{frame:?}");
        ws.send(frame).await;
        let err = ws.recv().await;
        assert_eq!(err["type"], "error", "{shown} -> {err}");
        let code = err["code"].as_str().unwrap_or_else(|| panic!("no code for {shown}: {err}"));
        assert!(codes.contains(&code), "{shown}: code {code}, expected one of {codes:?}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{shown}: a message: {err}");
        ws.assert_usable().await;
    }

    // The error names the ref of the frame it answers.
    ws.send_json(json!({ "type": "publish", "channel": "a", "event": "gap", "data": 1, "ref": "r9" })).await;
    let err = ws.recv_type("error").await;
    assert_eq!((&err["code"], &err["ref"]), (&json!("reserved_event"), &json!("r9")), "{err}");

    // None of the refused publishes stored anything.
    let (status, page) = get_json(&s, "/api/channels/a/messages?since=0").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"], json!([]), "{page}");

    // And the connection still does real work.
    ws.subscribe("a", None).await;
    publish_ids(&s, "a", 1..=1).await;
    assert_message(&ws.recv().await, "a", 1);
}

#[tokio::test]
async fn more_than_twenty_bad_frames_a_minute_close_the_connection_with_1008() {
    let s = Server::start();
    let mut ws = Ws::connect(&s).await;
    for i in 0..20 {
        ws.send_text(&format!("garbage {i}")).await;
        assert_eq!(ws.recv_type("error").await["code"], "invalid_json");
    }
    ws.assert_usable().await; // twenty are tolerated

    ws.send_text("one too many").await;
    let close = ws.closed().await.expect("a close frame, not a dropped socket").expect("a close code");
    assert_eq!(close.code, CloseCode::Policy, "close code 1008: {close:?}");
    assert!(!close.reason.is_empty(), "the close says why");

    // Other clients are unaffected.
    let mut other = Ws::connect(&s).await;
    other.assert_usable().await;
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_that_connection_only() {
    let s = Server::start_with(&[("HERALD_LIMITS_MAX_PAYLOAD", "1KiB")]);
    let mut bystander = Ws::connect(&s).await;
    bystander.subscribe("big", None).await;
    let mut ws = Ws::connect(&s).await;

    // A payload over the limit in a frame under the frame limit: an error frame.
    let payload = "x".repeat(2048);
    ws.send_json(json!({ "type": "publish", "channel": "big", "data": payload, "ref": 1 })).await;
    let err = ws.recv_type("error").await;
    assert_eq!((&err["code"], &err["ref"]), (&json!("payload_too_large"), &json!(1)), "{err}");
    ws.assert_usable().await;

    // A frame over payload + 16 KiB: the connection is closed.
    let huge = json!({ "type": "publish", "channel": "big", "data": "y".repeat(18 * 1024) }).to_string();
    let _ = ws.try_send(Message::text(huge)).await; // the server may hang up mid-write
    if let Some(frame) = ws.closed().await {
        let frame = frame.expect("a close code");
        assert_eq!(frame.code, CloseCode::Size, "1009 message too big: {frame:?}");
    }

    // The server goes on serving: the bystander and new connections.
    publish_ids(&s, "big", 1..=1).await;
    assert_message(&bystander.recv().await, "big", 1);
    let mut fresh = Ws::connect(&s).await;
    fresh.assert_usable().await;
    let (_, page) = get_json(&s, "/api/channels/big/messages?since=0").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "nothing over the limit was stored: {page}");
}

#[tokio::test]
async fn graceful_shutdown_closes_websockets_with_1012_and_exits_zero() {
    let mut s = Server::start();
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("room", None).await;

    let stopping = tokio::task::spawn_blocking(move || {
        let status = s.stop();
        (s, status)
    });
    let close = ws.closed().await.expect("a close frame before the process exits").expect("a close code");
    assert_eq!(close.code, CloseCode::Restart, "1012 tells the client to reconnect: {close:?}");
    let (_s, status) = stopping.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let s = Server::start_with(&[("HERALD_WS_PING", "300ms")]);
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("beat", None).await;
    // Six pings span well over the two silent intervals after which the server
    // gives up on a client; tungstenite answers each while we read.
    let mut pings = 0;
    while pings < 6 {
        match ws.next_frame().await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings while idle, got {other:?}"),
        }
    }
    publish_ids(&s, "beat", 1..=1).await;
    assert_message(&ws.recv().await, "beat", 1);
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_with_1001() {
    let s = Server::start_with(&[("HERALD_WS_PING", "300ms")]);
    let mut silent = SilentWs::connect(&s).await;
    let mut opcodes = BTreeSet::new();
    let close = loop {
        let (op, payload) = silent.frame().await.expect("a close frame before the socket ends");
        opcodes.insert(op);
        if op == 0x8 {
            break payload;
        }
    };
    assert!(opcodes.contains(&0x9), "the server pinged first: {opcodes:?}");
    assert!(close.len() >= 2, "a close code: {close:?}");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1001, "reason {:?}", String::from_utf8_lossy(&close[2..]));
    // The server is still up for others.
    let mut ws = Ws::connect(&s).await;
    ws.assert_usable().await;
}

#[tokio::test]
async fn json_data_and_events_round_trip_through_history() {
    let s = Server::start();
    publish_json(&s, "j", Some("chat"), &json!({ "from": "bob", "msg": "Hi" })).await;
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("j", None).await;
    let m = ws.recv_type("message").await;
    assert_eq!(m["data"], json!({ "from": "bob", "msg": "Hi" }), "{m}");
    assert_eq!(m["event"], "chat", "{m}");
    assert_eq!(id_of(&m), 1);
}

#[tokio::test]
async fn a_filter_with_since_now_starts_every_matching_channel_at_its_head() {
    let s = Server::start();
    publish_ids(&s, "chat/a", 1..=2).await;
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("chat/+", Some(json!("now"))).await;
    publish_ids(&s, "chat/a", 3..=3).await;
    publish_ids(&s, "chat/new", 1..=1).await; // a channel that did not exist yet
    assert_message(&ws.recv().await, "chat/a", 3);
    assert_message(&ws.recv().await, "chat/new", 1);
}

#[tokio::test]
async fn a_filter_subscription_reports_a_gap_for_each_channel_older_than_its_history() {
    let s = Server::start_with(&[("HERALD_HISTORY_SIZE", "5")]);
    publish_ids(&s, "g/a", 1..=8).await; // 4..=8 retained
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("g/+", Some(json!(0))).await;
    let gap = ws.recv_type("gap").await;
    assert_eq!(gap["channel"], "g/a", "{gap}");
    assert_eq!((gap["from"].as_u64(), gap["to"].as_u64()), (Some(1), Some(3)), "{gap}");
    for (v, id) in ws.messages(5).await.iter().zip(4..) {
        assert_message(v, "g/a", id);
    }
}

#[tokio::test]
async fn the_subscribed_frame_of_a_filter_announces_a_gap_that_follows() {
    let s = Server::start_with(&[("HERALD_HISTORY_SIZE", "5")]);
    publish_ids(&s, "g/a", 1..=8).await;
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe("g/+", Some(json!(0))).await;
    assert_eq!(ws.recv_type("gap").await["channel"], "g/a");
    assert_eq!(sub["gap"], true, "a gap frame followed this subscribed frame: {sub}");
}

#[tokio::test]
async fn a_cursor_ahead_of_the_head_is_reported_as_a_reset_then_everything_retained() {
    let s = Server::start();
    publish_ids(&s, "r", 1..=3).await;
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe("r", Some(json!(10))).await; // from a history this server never had
    assert_eq!((&sub["head"], &sub["gap"]), (&json!(3), &json!(true)), "{sub}");
    let gap = ws.recv_type("gap").await;
    assert_eq!((&gap["channel"], &gap["reset"]), (&json!("r"), &json!(true)), "{gap}");
    for (v, id) in ws.messages(3).await.iter().zip(1..) {
        assert_message(v, "r", id);
    }
}

#[tokio::test]
async fn subscribing_again_restarts_the_channel_from_the_new_cursor() {
    let s = Server::start();
    publish_ids(&s, "again", 1..=3).await;
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("again", Some(json!(0))).await;
    for (v, id) in ws.messages(3).await.iter().zip(1..) {
        assert_message(v, "again", id);
    }
    ws.subscribe("again", Some(json!(1))).await;
    for (v, id) in ws.messages(2).await.iter().zip(2..) {
        assert_message(v, "again", id);
    }
    publish_ids(&s, "again", 4..=4).await;
    assert_message(&ws.recv().await, "again", 4); // once, though subscribed twice
    ws.assert_usable().await;
}

#[tokio::test]
async fn a_channel_subscription_honours_its_cursor_even_when_a_filter_covers_the_channel() {
    let s = Server::start();
    publish_ids(&s, "chat/a", 1..=3).await;
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("chat/+", Some(json!("now"))).await; // chat/a starts at its head, 3
    let sub = ws.subscribe("chat/a", Some(json!(0))).await; // but this asks for all of it
    assert_eq!(sub["head"], 3, "{sub}");
    publish_ids(&s, "chat/a", 4..=4).await;
    let mut got = Vec::new();
    while got.last() != Some(&4) {
        got.push(id_of(&ws.recv_type("message").await));
    }
    assert_eq!(got, [1, 2, 3, 4], "the history after cursor 0, then live");
}

#[tokio::test]
async fn subscriptions_per_connection_are_limited() {
    let s = Server::start_with(&[("HERALD_WS_MAX_SUBSCRIPTIONS", "2")]);
    let mut ws = Ws::connect(&s).await;
    ws.subscribe("one", None).await;
    ws.subscribe("two/+", None).await;
    ws.subscribe("one", Some(json!("now"))).await; // the same target again does not count twice
    ws.send_json(json!({ "type": "subscribe", "channel": "three", "ref": "x" })).await;
    let err = ws.recv_type("error").await;
    assert_eq!((&err["code"], &err["ref"]), (&json!("too_many_subscriptions"), &json!("x")), "{err}");
    // Freeing one makes room.
    ws.send_json(json!({ "type": "unsubscribe", "channel": "one" })).await;
    ws.recv_type("unsubscribed").await;
    ws.subscribe("three", None).await;
    publish_ids(&s, "three", 1..=1).await;
    assert_message(&ws.recv().await, "three", 1);
}

/// The handshake's answer to a raw request, head and body as text.
async fn raw_handshake(s: &Server, path: &str, extra_headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra_headers}\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    // The server closes after refusing; a 101 is read up to its blank line.
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.starts_with(b"HTTP/1.1 101") {
        let n = tcp.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn refused_handshakes_say_why_and_another_version_is_told_which_one_is_spoken() {
    let s = Server::start();
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for path in ["/api/ws", "/mqtt"] {
        let other_version = raw_handshake(&s, path, &format!("{key}Sec-WebSocket-Version: 8\r\n")).await;
        assert!(other_version.starts_with("HTTP/1.1 426"), "{path}: {other_version}");
        assert!(other_version.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{other_version}");
        let bad_key = raw_handshake(&s, path, "Sec-WebSocket-Key: short==\r\nSec-WebSocket-Version: 13\r\n").await;
        assert!(bad_key.starts_with("HTTP/1.1 400"), "{path}: {bad_key}");
        assert!(bad_key.contains(r#""code":"websocket_expected""#) && bad_key.contains("Key"), "{bad_key}");
    }
    // The RFC's example, accepted; MQTT's subprotocol echoed as the client spelt it.
    let ok = raw_handshake(&s, "/mqtt", &format!("{key}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: MQTT\r\n"))
        .await;
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    assert!(ok.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{ok}");
    assert!(ok.contains("sec-websocket-protocol: MQTT\r\n"), "{ok}");
}
