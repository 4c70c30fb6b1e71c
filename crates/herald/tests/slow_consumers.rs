//! Slow consumers, on every transport: a raw client with a tiny receive
//! buffer subscribes and stops reading. Its server-side writes stall, and
//! within `[limits] write_timeout` the server closes it, freeing its task,
//! subscription and buffers (the connection counts and the messages waiting
//! in mailboxes go back to where they were), while a normal subscriber's
//! deliveries go on.
//! With `[limits] max_lag`, a subscriber that fell too far behind is closed
//! (SSE `event: close`, WebSocket `4008`) instead of catching up, and
//! resumes from its cursor with nothing lost.

mod clients;
mod common;

use std::time::Duration;

use clients::{PATIENCE, raw_mqtt as raw};
use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

/// Bytes of one message: well past what the stalled client's buffers hold
/// in a few dozen messages.
const PAYLOAD: usize = 60_000;
/// Most messages a test publishes before the stalled client must be closed.
const MAX_MESSAGES: u64 = 600;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Sse,
    Iframe,
    LongPoll,
    Ws,
    Mqtt,
    MqttWs,
}

impl Kind {
    /// Its counter in `/api/stats` `connections`.
    fn stat(self) -> &'static str {
        match self {
            Kind::Sse => "sse",
            Kind::Iframe => "iframe",
            Kind::LongPoll => "longpoll",
            Kind::Ws => "ws",
            Kind::Mqtt | Kind::MqttWs => "mqtt",
        }
    }
}

/// A masked client WebSocket frame.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend((n as u16).to_be_bytes());
        }
    }
    out.extend(mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// Reads until `needle` has come (the answers before the client stops reading).
async fn read_until(tcp: &mut TcpStream, needle: &[u8]) {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while !got.windows(needle.len()).any(|w| w == needle) {
            let mut buf = [0u8; 1024];
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {:?} within 10s", String::from_utf8_lossy(needle)));
}

/// A WebSocket handshake on `path` by hand, its `101` read.
async fn ws_handshake(tcp: &mut TcpStream, path: &str, protocol: &str) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    read_until(tcp, b"\r\n\r\n").await;
}

/// A client from 127.0.0.2 with a 4 KiB receive buffer, subscribed to
/// `slow` on `kind`, that will read nothing more.
async fn stalled_client(s: &Server, kind: Kind) -> TcpStream {
    let addr = if matches!(kind, Kind::Mqtt) { s.mqtt.clone() } else { s.addr.clone() };
    let mut tcp = tcp_from("127.0.0.2", &addr, Some(4096)).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    match kind {
        Kind::Sse => tcp.write_all(get("/api/channels/slow/events?since=now").as_bytes()).await.unwrap(),
        Kind::Iframe => tcp.write_all(get("/api/channels/slow/iframe?callback=cb&since=now").as_bytes()).await.unwrap(),
        Kind::LongPoll => {
            tcp.write_all(get("/api/channels/slow/messages?since=0&limit=1000&wait=30").as_bytes()).await.unwrap()
        }
        Kind::Ws => {
            ws_handshake(&mut tcp, "/api/ws", "").await;
            let sub = br#"{"type":"subscribe","channel":"slow","since":"now"}"#;
            tcp.write_all(&ws_frame(0x1, sub)).await.unwrap();
            read_until(&mut tcp, b"subscribed").await;
        }
        Kind::Mqtt => {
            tcp.write_all(&raw::connect_packet(4, "slow", 0)).await.unwrap();
            assert_eq!(raw::read_packet(&mut tcp).await[0], 0x20, "CONNACK");
            assert_eq!(raw::subscribe_code(&mut tcp, 4, 1, "slow").await, 1);
        }
        Kind::MqttWs => {
            ws_handshake(&mut tcp, "/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n").await;
            tcp.write_all(&ws_frame(0x2, &raw::connect_packet(4, "slow-ws", 0))).await.unwrap();
            let mut sub = vec![0x82, 9, 0, 1, 0, 4];
            sub.extend(b"slow");
            sub.push(0);
            tcp.write_all(&ws_frame(0x2, &sub)).await.unwrap();
            read_until(&mut tcp, &[0x90, 3, 0, 1, 0]).await; // SUBACK, QoS 0 granted
        }
    }
    tcp
}

/// An SSE subscriber on `slow` that reads everything, in a task: the ids it
/// received come out of the channel.
async fn normal_subscriber(s: &Server) -> mpsc::UnboundedReceiver<u64> {
    let mut events = common::sse(s, "/api/channels/slow/events?since=now", &[]).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if tx.send(e.id.parse().unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

/// Publishes until the server reports a slow consumer closed (checking every
/// ten messages); returns the last id published and the most messages seen
/// waiting in mailboxes meanwhile.
async fn publish_until_closed(s: &Server, first: u64) -> (u64, u64) {
    let payload = "x".repeat(PAYLOAD);
    let mut id = first;
    let mut most_queued = 0;
    loop {
        assert_eq!(publish(s, "slow", &payload).await, id);
        if id % 10 == 0 {
            let v = stats(s).await;
            most_queued = most_queued.max(v["subscribers"]["queued"].as_u64().unwrap());
            if v["guards"]["slow_consumers_closed"] == 1 {
                return (id, most_queued);
            }
        }
        assert!(id < MAX_MESSAGES, "no slow consumer closed after {id} messages of {PAYLOAD} bytes");
        id += 1;
    }
}

/// The server closes it: reading drains what was sent, then the end (or a
/// reset).
async fn assert_closed_by_server(tcp: &mut TcpStream) {
    tokio::time::timeout(PATIENCE * 3, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the stalled connection");
}

async fn a_client_that_stops_reading_is_closed(kind: Kind) {
    let s = Server::start_with(&[("HERALD_LIMITS_WRITE_TIMEOUT", "1s")]);
    let mut normal = normal_subscriber(&s).await;
    let mut first = 1;
    if matches!(kind, Kind::LongPoll) {
        // A long poll's answer is one write: everything after its cursor.
        let payload = "x".repeat(PAYLOAD);
        for id in 1..=100 {
            assert_eq!(publish(&s, "slow", &payload).await, id);
        }
        first = 101;
    }
    let base = stats(&s).await;
    let mut stalled = stalled_client(&s, kind).await;
    if !matches!(kind, Kind::LongPoll) {
        let open = base["connections"][kind.stat()].as_i64().unwrap() + 1;
        until_stats(&s, "the stalled client connected", |v| v["connections"][kind.stat()] == open).await;
    }
    let (last, most_queued) = publish_until_closed(&s, first).await;
    // Gone, and what it held with it: its task and subscription (counted as
    // a connection until they are dropped) and the messages its mailbox
    // held while its writes stalled.
    let after = until_stats(&s, "the stalled connection and its queue gone", |v| {
        v["connections"] == base["connections"] && v["subscribers"]["queued"] == 0
    })
    .await;
    assert_eq!(after["guards"]["slow_consumers_closed"], 1, "{after}");
    if !matches!(kind, Kind::LongPoll) {
        assert!(most_queued > 0, "messages waited for the stalled client while it was open");
    }
    // Deliveries to the normal subscriber went on: every message, in order.
    for id in 1..=last {
        let got = tokio::time::timeout(PATIENCE, normal.recv()).await.expect("a delivery within 10s");
        assert_eq!(got, Some(id));
    }
    assert_closed_by_server(&mut stalled).await;
}

#[tokio::test]
async fn sse() {
    a_client_that_stops_reading_is_closed(Kind::Sse).await;
}

#[tokio::test]
async fn iframe() {
    a_client_that_stops_reading_is_closed(Kind::Iframe).await;
}

#[tokio::test]
async fn long_poll() {
    a_client_that_stops_reading_is_closed(Kind::LongPoll).await;
}

#[tokio::test]
async fn websocket() {
    a_client_that_stops_reading_is_closed(Kind::Ws).await;
}

#[tokio::test]
async fn mqtt_over_tcp() {
    a_client_that_stops_reading_is_closed(Kind::Mqtt).await;
}

#[tokio::test]
async fn mqtt_over_websocket() {
    a_client_that_stops_reading_is_closed(Kind::MqttWs).await;
}

/// A server where a subscriber more than a second behind is closed instead
/// of caught up. Writes time out far later than the test's stall: the
/// client is merely behind, and under a loaded machine a 1 s write timeout
/// raced `max_lag` and closed the stream without its close event.
fn max_lag_server() -> Server {
    Server::start_with(&[
        ("HERALD_LIMITS_WRITE_TIMEOUT", "20s"),
        ("HERALD_LIMITS_MAX_LAG", "1s"),
        ("HERALD_LIMITS_SUBSCRIBER_QUEUE", "8"),
    ])
}

/// Publishes `n` big messages while `tcp` reads nothing (its mailbox
/// overflows), waits out `max_lag`, then reads everything the server sends
/// until `done` says it ended (or the connection does).
async fn fall_behind_then_read(s: &Server, tcp: &mut TcpStream, n: u64, done: fn(&[u8]) -> bool) -> Vec<u8> {
    let payload = "x".repeat(PAYLOAD);
    for id in 1..=n {
        assert_eq!(publish(s, "slow", &payload).await, id);
    }
    // The interval under test: the oldest undelivered message ages past max_lag.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE * 3, async {
        let mut buf = vec![0u8; 64 * 1024];
        while !done(&got) {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the end within 30s");
    got
}

/// The message ids of an SSE stream's bytes, in order.
fn sse_ids(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.strip_prefix("id: ")).map(|id| id.parse().unwrap()).collect()
}

#[tokio::test]
async fn past_max_lag_an_sse_stream_is_closed_with_a_reason_and_resumes_with_nothing_lost() {
    let s = max_lag_server();
    let mut tcp = stalled_client(&s, Kind::Sse).await;
    // The stream ends (its last chunk); the connection may stay for another request.
    let got = fall_behind_then_read(&s, &mut tcp, 120, |b| b.ends_with(b"\r\n0\r\n\r\n")).await;
    let text = String::from_utf8_lossy(&got);
    let ids = sse_ids(&text);
    assert!(!ids.is_empty() && ids.len() < 120, "some delivered, then closed: {} ids", ids.len());
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "in order, nothing skipped");
    let close = text.find("event: close\ndata: ").expect("a close event says why");
    assert!(text[close..].contains("\"code\":\"slow_consumer\""), "{}", &text[close..]);
    assert_eq!(stats(&s).await["guards"]["lagging_closed"], 1);
    // Resuming from the last id it had gets the rest.
    let last = ids.last().unwrap().to_string();
    let mut resumed = common::sse(&s, "/api/channels/slow/events", &[("last-event-id", &last)]).await;
    for id in ids.len() as u64 + 1..=120 {
        assert_eq!(next_event(&mut resumed).await.unwrap().id, id.to_string());
    }
}

/// Server frames in `bytes`: (opcode, payload) until the bytes run out.
fn ws_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let (len, at) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        let Some(payload) = bytes.get(at..at + len) else { break };
        out.push((bytes[0] & 0x0f, payload.to_vec()));
        bytes = &bytes[at + len..];
    }
    out
}

#[tokio::test]
async fn past_max_lag_a_websocket_is_closed_4008_and_resumes_with_nothing_lost() {
    let s = max_lag_server();
    let mut tcp = stalled_client(&s, Kind::Ws).await;
    let got = fall_behind_then_read(&s, &mut tcp, 120, |_| false).await;
    let frames = ws_frames(&got);
    let ids: Vec<u64> = frames
        .iter()
        .filter(|(op, _)| *op == 1)
        .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok())
        .filter(|v| v["type"] == "message")
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.is_empty() && ids.len() < 120, "some delivered, then closed: {} ids", ids.len());
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "in order, nothing skipped");
    let (op, close) = frames.last().expect("frames");
    assert_eq!(*op, 8, "the last frame is the close");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 4008);
    assert!(String::from_utf8_lossy(&close[2..]).starts_with("slow_consumer"), "{close:?}");
    // Resuming from the last id it had gets the rest.
    let mut ws = clients::Ws::connect(&s).await;
    ws.subscribe("slow", Some(serde_json::json!(ids.last().unwrap()))).await;
    let rest: Vec<u64> = ws.messages(120 - ids.len()).await.iter().map(clients::id_of).collect();
    assert_eq!(rest, (ids.len() as u64 + 1..=120).collect::<Vec<_>>());
}
