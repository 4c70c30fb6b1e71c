//! The cross-transport matrix: one channel, every transport (SSE, long poll,
//! short poll, WebSocket, hidden iframe) receives every message in order; each
//! one cut off part-way resumes from its cursor with nothing lost and nothing
//! duplicated. Also the multi-channel SSE stream resumed by its cursor token.

mod clients;
mod common;

use std::collections::BTreeMap;

use clients::{Iframe, Ws, id_of, publish_ids, text_of};
use common::{Server, client, next_event, sse};
use eventsource_stream::Event;
use futures_util::Stream;
use serde_json::{Value, json};

const CH: &str = "matrix/room";
/// Published before the first reader connects.
const N: u64 = 50;
/// Read before the connection is cut.
const K: u64 = 20;
/// Published while the reader is away.
const M: u64 = 30;
/// Published live after it resumed.
const L: u64 = 5;

/// `ids` is exactly 1..=n: every message, in order, none twice.
fn assert_exactly(what: &str, ids: &[u64], n: u64) {
    let want: Vec<u64> = (1..=n).collect();
    assert_eq!(ids, want.as_slice(), "{what}: expected ids 1..={n} in order, once each");
}

/// A message object from a poll, WS or iframe: its id, after checking its
/// channel and payload.
fn checked_id(v: &Value) -> u64 {
    assert_eq!(v["channel"], CH, "{v}");
    let id = id_of(v);
    assert_eq!(v["data"], text_of(id), "{v}");
    id
}

// ---- per-transport readers -------------------------------------------------

/// One poll request; `None` for `304 Not Modified`. Checks the answer's shape.
async fn poll(s: &Server, since: u64, params: &str) -> Option<(Vec<u64>, u64)> {
    let url = format!("{}/api/channels/{CH}/messages?since={since}&{params}", s.url);
    let res = client().get(url).send().await.unwrap();
    if res.status() == 304 {
        return None;
    }
    assert_eq!(res.status(), 200, "poll since={since}&{params}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["gap"], false, "{body}");
    let ids: Vec<u64> = body["messages"].as_array().expect("messages").iter().map(checked_id).collect();
    let next = body["next"].as_u64().expect("next");
    assert_eq!(next, ids.last().copied().unwrap_or(since), "next is the last id returned, else since: {body}");
    Some((ids, next))
}

/// Long polls from `since` until `until` is reached; returns the ids and the cursor.
async fn long_poll_until(s: &Server, mut since: u64, until: u64, params: &str) -> (Vec<u64>, u64) {
    let mut ids = Vec::new();
    while since < until {
        if let Some((got, next)) = poll(s, since, &format!("wait=5&{params}")).await {
            assert!(!got.is_empty(), "a long poll answers with messages or 304");
            ids.extend(got);
            since = next;
        }
    }
    (ids, since)
}

/// Short polls 7 at a time from `since` until `until` is reached.
async fn short_poll_until(s: &Server, mut since: u64, until: u64) -> (Vec<u64>, u64) {
    let mut ids = Vec::new();
    while since < until {
        let (got, next) = poll(s, since, "limit=7").await.expect("a short poll always answers");
        assert!(!got.is_empty() && got.len() <= 7, "pages of at most 7, while some are left: {got:?}");
        ids.extend(got);
        since = next;
    }
    (ids, since)
}

async fn sse_ids(events: &mut (impl Stream<Item = Event> + Unpin), n: u64) -> Vec<u64> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let e = next_event(events).await.expect("the SSE stream stays open");
        let id: u64 = e.id.parse().unwrap_or_else(|_| panic!("plain numeric id on a single-channel stream: {e:?}"));
        assert_eq!(e.data, text_of(id), "{e:?}");
        assert_eq!(e.event, "message", "{e:?}");
        ids.push(id);
    }
    ids
}

async fn ws_ids(ws: &mut Ws, n: u64) -> Vec<u64> {
    ws.messages(n as usize).await.iter().map(checked_id).collect()
}

async fn iframe_ids(frame: &mut Iframe, n: u64) -> Vec<u64> {
    frame.calls(n as usize).await.iter().map(checked_id).collect()
}

// ---- every transport, all messages, in order --------------------------------

#[tokio::test]
async fn every_transport_receives_every_message_in_order() {
    let s = Server::start();
    // Half is history when the readers connect, half arrives live.
    let half = N / 2;
    publish_ids(&s, CH, 1..=half).await;

    let mut events = sse(&s, &format!("/api/channels/{CH}/events"), &[]).await;
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe(CH, Some(json!(0))).await;
    assert_eq!(sub["head"], half, "{sub}");
    let mut frame = Iframe::open(&s, CH, "cb", "0").await;
    let s = std::sync::Arc::new(s);
    let long_poller = {
        let s = s.clone();
        tokio::spawn(async move { long_poll_until(&s, 0, N, "limit=20").await })
    };

    publish_ids(&s, CH, half + 1..=N).await;

    assert_exactly("SSE", &sse_ids(&mut events, N).await, N);
    assert_exactly("WebSocket", &ws_ids(&mut ws, N).await, N);
    assert_exactly("iframe", &iframe_ids(&mut frame, N).await, N);
    let (ids, next) = long_poller.await.unwrap();
    assert_exactly("long poll", &ids, N);
    assert_eq!(next, N);
    let (ids, next) = short_poll_until(&s, 0, N).await;
    assert_exactly("short poll", &ids, N);
    assert_eq!(next, N);
    // Caught up: a short poll at the head answers at once, empty, with next = since.
    assert_eq!(poll(&s, N, "").await, Some((vec![], N)));
}

// ---- cut off part-way, resumed from the cursor ------------------------------

/// A server with 1..=N published.
async fn server_with_history() -> Server {
    let s = Server::start();
    publish_ids(&s, CH, 1..=N).await;
    s
}

#[tokio::test]
async fn sse_resumes_from_last_event_id() {
    let s = server_with_history().await;
    let mut events = sse(&s, &format!("/api/channels/{CH}/events"), &[]).await;
    let mut seen = sse_ids(&mut events, K).await;
    drop(events); // cut off; more may have been on the wire, unread

    publish_ids(&s, CH, N + 1..=N + M).await;
    let last = seen.last().unwrap().to_string();
    let mut events = sse(&s, &format!("/api/channels/{CH}/events"), &[("Last-Event-ID", &last)]).await;
    seen.extend(sse_ids(&mut events, N + M - K).await);
    publish_ids(&s, CH, N + M + 1..=N + M + L).await;
    seen.extend(sse_ids(&mut events, L).await);
    assert_exactly("SSE resumed", &seen, N + M + L);
}

#[tokio::test]
async fn long_poll_resumes_from_since() {
    let s = server_with_history().await;
    let (mut seen, cursor) = long_poll_until(&s, 0, K, "limit=10").await;
    assert_eq!(cursor, K);
    // An answer the client never read (the connection dropped) moves nothing.
    let lost = client().get(format!("{}/api/channels/{CH}/messages?since={cursor}&wait=5&limit=10", s.url));
    drop(lost.send().await.unwrap());

    publish_ids(&s, CH, N + 1..=N + M).await;
    let (more, cursor) = long_poll_until(&s, cursor, N + M, "").await;
    seen.extend(more);
    // Live: a waiting long poll is answered by the next publish.
    let s = std::sync::Arc::new(s);
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { long_poll_until(&s, cursor, N + M + L, "").await })
    };
    publish_ids(&s, CH, N + M + 1..=N + M + L).await;
    let (more, cursor) = waiting.await.unwrap();
    seen.extend(more);
    assert_eq!(cursor, N + M + L);
    assert_exactly("long poll resumed", &seen, N + M + L);
}

#[tokio::test]
async fn short_poll_resumes_from_since() {
    let s = server_with_history().await;
    let (mut seen, cursor) = short_poll_until(&s, 0, K).await; // three pages of 7: 21
    assert_eq!(cursor, 21);
    let lost = client().get(format!("{}/api/channels/{CH}/messages?since={cursor}&limit=7", s.url));
    drop(lost.send().await.unwrap());

    publish_ids(&s, CH, N + 1..=N + M).await;
    let (more, cursor) = short_poll_until(&s, cursor, N + M).await;
    seen.extend(more);
    publish_ids(&s, CH, N + M + 1..=N + M + L).await;
    let (more, _) = short_poll_until(&s, cursor, N + M + L).await;
    seen.extend(more);
    assert_exactly("short poll resumed", &seen, N + M + L);
}

#[tokio::test]
async fn websocket_resumes_from_since() {
    let s = server_with_history().await;
    let mut ws = Ws::connect(&s).await;
    ws.subscribe(CH, Some(json!(0))).await;
    let mut seen = ws_ids(&mut ws, K).await;
    drop(ws); // no closing handshake: the connection just goes away

    publish_ids(&s, CH, N + 1..=N + M).await;
    let mut ws = Ws::connect(&s).await;
    let sub = ws.subscribe(CH, Some(json!(seen.last().unwrap()))).await;
    assert_eq!((&sub["head"], &sub["gap"]), (&json!(N + M), &json!(false)), "{sub}");
    seen.extend(ws_ids(&mut ws, N + M - K).await);
    publish_ids(&s, CH, N + M + 1..=N + M + L).await;
    seen.extend(ws_ids(&mut ws, L).await);
    assert_exactly("WebSocket resumed", &seen, N + M + L);
}

#[tokio::test]
async fn iframe_resumes_from_since() {
    let s = server_with_history().await;
    let mut frame = Iframe::open(&s, CH, "cb", "0").await;
    let mut seen = iframe_ids(&mut frame, K).await;
    drop(frame);

    publish_ids(&s, CH, N + 1..=N + M).await;
    let mut frame = Iframe::open(&s, CH, "cb", &seen.last().unwrap().to_string()).await;
    seen.extend(iframe_ids(&mut frame, N + M - K).await);
    publish_ids(&s, CH, N + M + 1..=N + M + L).await;
    seen.extend(iframe_ids(&mut frame, L).await);
    assert_exactly("iframe resumed", &seen, N + M + L);
}

// ---- multi-channel SSE, resumed by its cursor token --------------------------

/// Publishes ids `ids` to `mx/a` and `mx/b`, interleaved.
async fn publish_both(s: &Server, ids: std::ops::RangeInclusive<u64>) {
    for id in ids {
        publish_ids(s, "mx/a", id..=id).await;
        publish_ids(s, "mx/b", id..=id).await;
    }
}

/// Reads `n` events of a multi-channel stream into `seen` (ids per channel);
/// returns the last event's id, the stream's cursor token.
async fn read_multi(
    events: &mut (impl Stream<Item = Event> + Unpin),
    n: u64,
    seen: &mut BTreeMap<String, Vec<u64>>,
) -> String {
    let mut token = String::new();
    for _ in 0..n {
        let e = next_event(events).await.expect("the SSE stream stays open");
        let v: Value = serde_json::from_str(&e.data).unwrap_or_else(|_| panic!("data is the message object: {e:?}"));
        let channel = v["channel"].as_str().expect("channel").to_string();
        let id = id_of(&v);
        assert_eq!(v["data"], text_of(id), "{v}");
        assert!(!e.id.is_empty(), "every event carries the cursor token: {e:?}");
        seen.entry(channel).or_default().push(id);
        token = e.id;
    }
    token
}

async fn multi_channel_resumes_by_token(query: &str) {
    let s = Server::start();
    let half = 25;
    publish_both(&s, 1..=half).await;
    let path = format!("/api/events?{query}");
    let mut seen = BTreeMap::new();

    let mut events = sse(&s, &path, &[]).await;
    let token = read_multi(&mut events, K, &mut seen).await;
    drop(events);

    publish_both(&s, half + 1..=half + 15).await;
    let mut events = sse(&s, &path, &[("Last-Event-ID", &token)]).await;
    read_multi(&mut events, 2 * half - K + 2 * 15, &mut seen).await;
    publish_both(&s, half + 16..=half + 18).await;
    read_multi(&mut events, 6, &mut seen).await;

    assert_eq!(seen.keys().collect::<Vec<_>>(), ["mx/a", "mx/b"], "{seen:?}");
    for (channel, ids) in &seen {
        assert_exactly(&format!("multi-channel SSE {query}, {channel}"), ids, half + 18);
    }
}

#[tokio::test]
async fn multi_channel_sse_resumes_by_its_token() {
    multi_channel_resumes_by_token("channel=mx/a&channel=mx/b").await;
}

#[tokio::test]
async fn multi_channel_sse_over_a_filter_resumes_by_its_token() {
    multi_channel_resumes_by_token("channel=mx%2F%2B").await;
}

// ---- a subscriber that cannot keep up ----------------------------------------

/// With a mailbox of one message, a publish of ten channels at once overflows
/// every live subscriber of them; each must catch up from the store and still
/// get every message of every channel once, in order.
#[tokio::test]
async fn lagging_subscribers_catch_up_with_nothing_lost() {
    let s = Server::start_with(&[("HERALD_LIMITS_SUBSCRIBER_QUEUE", "1")]);
    let channels: Vec<String> = (0..10).map(|i| format!("lag/{i}")).collect();
    let rounds = 20;

    let mut ws = Ws::connect(&s).await;
    ws.subscribe("lag/+", Some(json!(0))).await;
    let mut multi = sse(&s, "/api/events?channel=lag%2F%2B", &[]).await;
    let mut single = sse(&s, "/api/channels/lag/0/events", &[]).await;

    for id in 1..=rounds {
        let res = client()
            .post(format!("{}/api/publish", s.url))
            .json(&json!({ "channels": channels, "data": text_of(id) }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        let ids: Vec<u64> = body["results"].as_array().expect("results").iter().map(id_of).collect();
        assert_eq!(ids, vec![id; channels.len()], "{body}");
    }

    let total = rounds * channels.len() as u64;
    let mut by_ws: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in ws.messages(total as usize).await {
        let id = id_of(&v);
        assert_eq!(v["data"], text_of(id), "{v}");
        by_ws.entry(v["channel"].as_str().unwrap().to_string()).or_default().push(id);
    }
    let mut by_sse = BTreeMap::new();
    read_multi(&mut multi, total, &mut by_sse).await;
    for ch in &channels {
        assert_exactly(&format!("WebSocket {ch}"), &by_ws[ch], rounds);
        assert_exactly(&format!("multi-channel SSE {ch}"), &by_sse[ch], rounds);
    }
    assert_exactly("single-channel SSE lag/0", &sse_ids(&mut single, rounds).await, rounds);
    ws.assert_usable().await; // and nothing more was queued behind them
}

// ---- since=now ---------------------------------------------------------------

/// Opens a stream with `since=now` `rounds` times and publishes two messages
/// as soon as the stream is confirmed (response headers, or the `subscribed`
/// frame): the first thing delivered must be the first of the two. A "now"
/// resolved later than the confirmation would swallow it.
async fn since_now_keeps_the_first_live_message(transport: &str, rounds: u64) {
    let s = Server::start();
    for round in 0..rounds {
        let ch = format!("now/{round}");
        publish_ids(&s, &ch, 1..=1).await; // history that must not come
        let first = match transport {
            "sse" => {
                let mut events = sse(&s, &format!("/api/channels/{ch}/events?since=now"), &[]).await;
                publish_ids(&s, &ch, 2..=3).await;
                next_event(&mut events).await.expect("an event").id.parse::<u64>().unwrap()
            }
            "iframe" => {
                let mut frame = Iframe::open(&s, &ch, "cb", "now").await;
                publish_ids(&s, &ch, 2..=3).await;
                id_of(&frame.next_call().await)
            }
            "ws" => {
                let mut ws = Ws::connect(&s).await;
                ws.subscribe(&ch, Some(json!("now"))).await;
                publish_ids(&s, &ch, 2..=3).await;
                id_of(&ws.recv_type("message").await)
            }
            other => unreachable!("{other}"),
        };
        assert_eq!(first, 2, "{transport}, round {round}: the first message published after the stream opened");
    }
}

#[tokio::test]
async fn since_now_on_websocket_keeps_a_message_published_right_after_subscribing() {
    since_now_keeps_the_first_live_message("ws", 100).await;
}

#[tokio::test]
async fn since_now_on_sse_keeps_a_message_published_right_after_the_stream_opened() {
    since_now_keeps_the_first_live_message("sse", 300).await;
}

#[tokio::test]
async fn since_now_on_iframe_keeps_a_message_published_right_after_the_stream_opened() {
    since_now_keeps_the_first_live_message("iframe", 300).await;
}
