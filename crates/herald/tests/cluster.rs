//! Several Herald nodes sharing one Redis, as behind a load balancer without
//! sticky sessions: real `herald` processes, a real `redis-server`, real
//! clients of every transport spread over the nodes, and a checker that
//! records every acknowledged publish and every delivery.
//!
//! What the checker demands of every subscriber: it received every
//! acknowledged message (or, only where Redis really lost data, a `gap`
//! covering its id), ids increase, and no id ever carries two payloads, on
//! any subscriber, across Redis restarts and wipes.

mod clients;
mod common;
#[path = "../../herald-store/tests/redis_server/mod.rs"]
mod redis_server;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use redis_server::{RedisCluster, RedisServer};
use serde_json::{Value, json};
use tokio::{sync::Notify, task::JoinHandle};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use common::{Server, client, get_json, next_event, sse};

/// A node on `redis` (several URLs: shards), with short timeouts so that
/// faults show quickly.
fn node(redis: &[&RedisServer]) -> Server {
    let urls: Vec<String> = redis.iter().map(|r| r.url()).collect();
    let urls = urls.join(",");
    Server::start_with(&[
        ("HERALD_REDIS_URL", &urls),
        ("HERALD_REDIS_PARTITIONS", "8"),
        ("HERALD_REDIS_CHECK_EVERY", "200ms"),
        ("HERALD_REDIS_TIMEOUT", "1s"),
        ("HERALD_REDIS_CONNECT_TIMEOUT", "500ms"),
    ])
}

/// A node like [`node`], named.
fn named_node(redis: &RedisServer, name: &str) -> Server {
    let url = redis.url();
    Server::start_with(&[
        ("HERALD_REDIS_URL", &url),
        ("HERALD_REDIS_PARTITIONS", "8"),
        ("HERALD_REDIS_CHECK_EVERY", "200ms"),
        ("HERALD_SERVER_NODE", name),
    ])
}

/// What one subscriber received, in order: `(id, payload)` (id 0 where the
/// transport has none: MQTT), and the gaps it was told of.
#[derive(Default)]
struct Seen {
    msgs: Vec<(u64, String)>,
    gaps: Vec<(u64, u64)>,
}

impl Seen {
    fn has(&self, payload: &str) -> bool {
        self.msgs.iter().any(|(_, p)| p == payload)
    }

    fn has_all<'a>(&self, mut payloads: impl Iterator<Item = &'a String>) -> bool {
        payloads.all(|p| self.has(p))
    }
}

#[derive(Clone, Default)]
struct Log {
    name: &'static str,
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
}

impl Log {
    fn new(name: &'static str) -> Log {
        Log { name, ..Default::default() }
    }

    fn message(&self, id: u64, payload: &str) {
        self.seen.lock().unwrap().msgs.push((id, payload.to_owned()));
        self.changed.notify_waiters();
    }

    fn gap(&self, from: u64, to: u64) {
        self.seen.lock().unwrap().gaps.push((from, to));
        self.changed.notify_waiters();
    }

    /// Waits (at most 20 s) until `done` holds for what was received.
    async fn until(&self, done: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let changed = self.changed.notified();
            if done(&self.seen.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return; // the checker says what is missing
            }
        }
    }
}

/// Acknowledged publishes: payload -> id (unknown for MQTT publishes: an
/// MQTT PUBACK carries no Herald id).
#[derive(Clone, Default)]
struct Acked {
    map: Arc<Mutex<HashMap<String, Option<u64>>>>,
    changed: Arc<Notify>,
}

impl Acked {
    fn insert(&self, payload: String, id: Option<u64>) {
        self.map.lock().unwrap().insert(payload, id);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> HashMap<String, Option<u64>> {
        self.map.lock().unwrap().clone()
    }

    /// Waits until `n` publishes were acknowledged.
    async fn reached(&self, n: usize) {
        loop {
            let changed = self.changed.notified();
            if self.map.lock().unwrap().len() >= n {
                return;
            }
            changed.await;
        }
    }
}

/// Checks one subscriber's log against the acknowledged publishes.
/// `ids` collects id -> payload over every subscriber, so that an id
/// delivered with two payloads anywhere fails.
fn check(log: &Log, acked: &HashMap<String, Option<u64>>, ids: &mut HashMap<u64, String>) {
    let seen = log.seen.lock().unwrap();
    let name = log.name;
    // Ids known for MQTT-published payloads, from the other subscribers.
    let id_of = |payload: &str, id: u64| if id != 0 { Some(id) } else { acked.get(payload).copied().flatten() };
    let mut last = 0;
    for (id, payload) in &seen.msgs {
        if *id != 0 {
            if let Some(prior) = ids.insert(*id, payload.clone()) {
                assert_eq!(&prior, payload, "{name}: id {id} delivered with two payloads");
            }
            if let Some(Some(acked_id)) = acked.get(payload) {
                assert_eq!(acked_id, id, "{name}: {payload:?} was acknowledged as id {acked_id}");
            }
        }
        if let Some(id) = id_of(payload, *id) {
            assert!(id > last, "{name}: id {id} after {last}: ids must increase");
            last = id;
        }
    }
    let covered = |id: u64| seen.gaps.iter().any(|(from, to)| (*from..=*to).contains(&id));
    for (payload, id) in acked {
        if seen.msgs.iter().any(|(_, p)| p == payload) {
            continue;
        }
        match id {
            Some(id) if covered(*id) => {}
            _ => panic!("{name}: acknowledged {payload:?} (id {id:?}) never arrived, and no gap covers it"),
        }
    }
}

/// Learns the ids of MQTT-published payloads from a subscriber that has ids.
fn learn_ids(acked: &Acked, from: &Log) {
    let seen = from.seen.lock().unwrap();
    let mut acked = acked.map.lock().unwrap();
    for (id, payload) in &seen.msgs {
        if let Some(slot @ None) = acked.get_mut(payload) {
            *slot = Some(*id);
        }
    }
}

/// Publishes `n` messages `{name}-{i}` over HTTP to `url`, each retried
/// with its Idempotency-Key while the node answers 503 (at most once stored,
/// whatever happened to an answer that did not come back).
fn http_publisher(url: String, channel: &'static str, name: &'static str, n: usize, acked: Acked) -> JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..n {
            let payload = format!("{name}-{i}");
            for _attempt in 0..100 {
                let res = client()
                    .post(format!("{url}/api/channels/{channel}"))
                    .header("idempotency-key", &payload)
                    .body(payload.clone())
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        let id = r.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
                        acked.insert(payload.clone(), Some(id));
                        break;
                    }
                    Ok(r) => {
                        assert_eq!(r.status(), 503, "only 503 while Redis is away");
                        assert!(r.headers().contains_key("retry-after"), "503 says when to retry");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    })
}

/// An SSE subscriber that reconnects as a browser's `EventSource` does,
/// with the last id it received.
fn sse_subscriber(url: String, channel: &'static str, log: Log) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Option<String> = None;
        loop {
            let mut req = client().get(format!("{url}/api/channels/{channel}/events?since=0"));
            if let Some(l) = &last {
                req = req.header("last-event-id", l);
            }
            if let Ok(res) = req.send().await
                && res.status() == 200
            {
                let mut events = res.bytes_stream().eventsource();
                while let Some(Ok(ev)) = events.next().await {
                    if !ev.id.is_empty() {
                        last = Some(ev.id.clone());
                    }
                    match ev.event.as_str() {
                        "gap" => {
                            let g: Value = serde_json::from_str(&ev.data).unwrap();
                            log.gap(g["from"].as_u64().unwrap(), g["to"].as_u64().unwrap());
                        }
                        "message" => log.message(ev.id.parse().unwrap(), &ev.data),
                        _ => {}
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// A WebSocket subscriber that reconnects and resubscribes from its last id.
fn ws_subscriber(addr: String, channel: &'static str, log: Log) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0u64;
        loop {
            if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/ws")).await {
                let sub = json!({"type": "subscribe", "channel": channel, "since": last});
                if ws.send(WsMessage::text(sub.to_string())).await.is_ok() {
                    while let Some(Ok(frame)) = ws.next().await {
                        let WsMessage::Text(t) = frame else { continue };
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        match v["type"].as_str() {
                            Some("message") => {
                                last = v["id"].as_u64().unwrap();
                                log.message(last, v["data"].as_str().unwrap());
                            }
                            Some("gap") => {
                                last = v["to"].as_u64().unwrap();
                                log.gap(v["from"].as_u64().unwrap(), last);
                            }
                            _ => {}
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// A long (`wait`) or short poller, asking again from `next` each time.
fn poller(url: String, channel: &'static str, wait: bool, log: Log) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut since = 0u64;
        loop {
            let q = if wait { "&wait=5" } else { "" };
            let res = client().get(format!("{url}/api/channels/{channel}/messages?since={since}{q}")).send().await;
            match res {
                Ok(r) if r.status() == 200 => {
                    let v: Value = r.json().await.unwrap();
                    if v["gap"] == true {
                        log.gap(v["missed"]["from"].as_u64().unwrap(), v["missed"]["to"].as_u64().unwrap());
                    }
                    for m in v["messages"].as_array().unwrap() {
                        log.message(m["id"].as_u64().unwrap(), m["data"].as_str().unwrap());
                    }
                    since = v["next"].as_u64().unwrap();
                    if !wait {
                        // A short poller's interval: its transport, not a wait for an event.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Ok(r) if r.status() == 304 => {}
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

/// A hidden-iframe reader.
async fn iframe_subscriber(node: &Server, channel: &'static str, log: Log) -> JoinHandle<()> {
    let mut frame = clients::Iframe::open(node, channel, "onHerald", "0").await;
    tokio::spawn(async move {
        loop {
            let v = frame.next_call().await;
            log.message(v["id"].as_u64().unwrap(), v["data"].as_str().unwrap());
        }
    })
}

fn mqtt_options(node: &Server, id: &str) -> rumqttc::MqttOptions {
    let (host, port) = node.mqtt.rsplit_once(':').unwrap();
    let mut o = rumqttc::MqttOptions::new(id, host, port.parse().unwrap());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// An MQTT 3.1.1 subscriber (QoS 1); returns once the subscription is
/// acknowledged.
async fn mqtt_subscriber(node: &Server, channel: &'static str, log: Log) -> JoinHandle<()> {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let (c, mut el) = AsyncClient::new(mqtt_options(node, "cluster-sub"), 1000);
    c.subscribe(channel, QoS::AtLeastOnce).await.unwrap();
    loop {
        match el.poll().await.expect("MQTT connection") {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => {}
        }
    }
    tokio::spawn(async move {
        let _client = c;
        while let Ok(e) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                log.message(0, std::str::from_utf8(&p.payload).unwrap());
            }
        }
    })
}

/// Publishes `n` messages `{name}-{i}` with MQTT QoS 1; each counts as
/// acknowledged once its PUBACK arrives.
async fn mqtt_publisher(node: &Server, channel: &'static str, name: &'static str, n: usize, acked: Acked) {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let (c, mut el) = AsyncClient::new(mqtt_options(node, "cluster-pub"), 1000);
    for i in 0..n {
        let payload = format!("{name}-{i}");
        c.publish(channel, QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.expect("MQTT connection") {
                break;
            }
        }
        acked.insert(payload, None);
    }
}

/// Every transport on every node: HTTP publishers on two nodes and an MQTT
/// publisher on the third, one subscriber per transport spread over them.
#[tokio::test(flavor = "multi_thread")]
async fn every_transport_on_every_node_gets_every_message_in_order() {
    let redis = RedisServer::start(&[]);
    let nodes = [node(&[&redis]), node(&[&redis]), node(&[&redis])];
    let [a, b, c] = &nodes;
    let logs = [
        Log::new("sse@b"),
        Log::new("ws@c"),
        Log::new("long-poll@a"),
        Log::new("short-poll@c"),
        Log::new("iframe@b"),
        Log::new("mqtt@a"),
    ];
    let mut tasks = vec![
        sse_subscriber(b.url.clone(), "room", logs[0].clone()),
        ws_subscriber(c.addr.clone(), "room", logs[1].clone()),
        poller(a.url.clone(), "room", true, logs[2].clone()),
        poller(c.url.clone(), "room", false, logs[3].clone()),
        iframe_subscriber(b, "room", logs[4].clone()).await,
        mqtt_subscriber(a, "room", logs[5].clone()).await,
    ];
    let acked = Acked::default();
    let publishers = [
        http_publisher(a.url.clone(), "room", "http-a", 60, acked.clone()),
        http_publisher(b.url.clone(), "room", "http-b", 60, acked.clone()),
    ];
    mqtt_publisher(c, "room", "mqtt-c", 30, acked.clone()).await;
    for p in publishers {
        p.await.unwrap();
    }
    let payloads: Vec<String> = acked.snapshot().into_keys().collect();
    assert_eq!(payloads.len(), 150);
    for log in &logs {
        log.until(|s| s.has_all(payloads.iter())).await;
    }
    learn_ids(&acked, &logs[0]);
    let acked = acked.snapshot();
    assert!(acked.values().all(Option::is_some), "the SSE subscriber saw every MQTT publish's id");
    let mut ids = HashMap::new();
    for log in &logs {
        check(log, &acked, &mut ids);
    }
    assert_eq!(ids.len(), 150, "one id per acknowledged message");
    tasks.drain(..).for_each(|t| t.abort());
}

/// Publishing on and subscribing through nodes while Redis misbehaves:
/// its feed connections killed, Redis paused, Redis killed and restarted.
/// With AOF and `appendfsync always` nothing acknowledged is lost and no
/// subscriber is told of a gap.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_acknowledged_is_lost_while_redis_fails_with_aof_always() {
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut redis = RedisServer::start(&aof);
    let (a, b) = (node(&[&redis]), node(&[&redis]));
    let logs = [Log::new("sse@a"), Log::new("ws@b"), Log::new("long-poll@b")];
    let tasks = [
        sse_subscriber(a.url.clone(), "room", logs[0].clone()),
        ws_subscriber(b.addr.clone(), "room", logs[1].clone()),
        poller(b.url.clone(), "room", true, logs[2].clone()),
    ];
    let acked = Acked::default();
    let publishers = [
        http_publisher(a.url.clone(), "room", "a", 150, acked.clone()),
        http_publisher(b.url.clone(), "room", "b", 150, acked.clone()),
    ];
    acked.reached(40).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    acked.reached(80).await;
    redis.cli(&["CLIENT", "PAUSE", "700", "ALL"]);
    acked.reached(120).await;
    redis.kill_and_restart(&aof);
    acked.reached(200).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.snapshot();
    assert_eq!(acked.len(), 300, "every publish was acknowledged in the end");
    let mut ids = HashMap::new();
    for log in &logs {
        log.until(|s| s.has_all(acked.keys())).await;
        check(log, &acked, &mut ids);
        assert!(log.seen.lock().unwrap().gaps.is_empty(), "{}: no gap with appendfsync always", log.name);
    }
    let (_, stats) = get_json(&a, "/api/stats").await;
    assert!(stats["redis"]["shards"][0]["feed_reconnects"].as_u64().unwrap() >= 2, "{stats}");
    tasks.into_iter().for_each(|t| t.abort());
}

/// A Redis that loses its data (restarted without persistence, the same as
/// a wipe): ids go on from a higher base, subscribers are told of a gap, and
/// no id is ever delivered with two payloads.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_lost_its_data_shows_a_gap_never_a_reused_id() {
    let mut redis = RedisServer::start(&[]);
    let (a, b) = (node(&[&redis]), node(&[&redis]));
    let logs = [Log::new("sse@a"), Log::new("ws@b"), Log::new("long-poll@a")];
    let tasks = [
        sse_subscriber(a.url.clone(), "room", logs[0].clone()),
        ws_subscriber(b.addr.clone(), "room", logs[1].clone()),
        poller(a.url.clone(), "room", true, logs[2].clone()),
    ];
    let acked = Acked::default();
    http_publisher(b.url.clone(), "room", "before", 20, acked.clone()).await.unwrap();
    for log in &logs {
        log.until(|s| s.msgs.len() >= 20).await;
    }
    redis.kill_and_restart(&[]);
    http_publisher(a.url.clone(), "room", "after", 20, acked.clone()).await.unwrap();
    let acked = acked.snapshot();
    let mut ids = HashMap::new();
    for log in &logs {
        log.until(|s| s.has_all(acked.keys())).await;
        check(log, &acked, &mut ids);
        let seen = log.seen.lock().unwrap();
        assert_eq!(seen.gaps.len(), 1, "{}: one gap, from the cursor to the new base: {:?}", log.name, seen.gaps);
        assert_eq!(seen.gaps[0].0, 21, "{}", log.name);
    }
    let after = acked["after-0"].unwrap();
    assert!(after > 1_000_000_000_000, "ids after the loss start from a base past every old id: {after}");
    // A reader from 0 now: everything there is, no gap (the ids below the
    // new base never existed for it).
    let (status, page) = get_json(&b, "/api/channels/room/messages?since=0").await;
    assert_eq!(status, 200);
    assert_eq!(page["gap"], false, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 20);
    assert_eq!(page["messages"][0]["id"], after);
    tasks.into_iter().for_each(|t| t.abort());
}

/// A client that was on one node resumes on another from its cursor, on
/// every transport, with exactly what it missed.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_on_another_node_from_its_cursor() {
    let redis = RedisServer::start(&[]);
    let (a, b, c) = (node(&[&redis]), node(&[&redis]), node(&[&redis]));
    for i in 1..=5 {
        common::publish(&a, "news", &format!("n{i}")).await;
        common::publish(&a, "sport", &format!("s{i}")).await;
    }
    // SSE on b, then Last-Event-ID on c.
    let mut events = sse(&b, "/api/channels/news/events?since=0", &[]).await;
    for i in 1..=3 {
        assert_eq!(next_event(&mut events).await.unwrap().data, format!("n{i}"));
    }
    drop(events);
    common::publish(&c, "news", "n6").await;
    let mut events = sse(&c, "/api/channels/news/events", &[("last-event-id", "3")]).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut events).await.unwrap().data);
    }
    assert_eq!(got, ["n4", "n5", "n6"]);
    // A multi-channel cursor token from one node, resumed on another.
    let mut multi = sse(&a, "/api/events?channel=news&channel=sport&since=0", &[]).await;
    let mut token = String::new();
    let mut seen = Vec::new();
    for _ in 0..8 {
        let e = next_event(&mut multi).await.unwrap();
        token = e.id;
        seen.push(serde_json::from_str::<Value>(&e.data).unwrap()["data"].as_str().unwrap().to_owned());
    }
    drop(multi);
    common::publish(&b, "sport", "s6").await;
    let mut multi = sse(&b, "/api/events?channel=news&channel=sport", &[("last-event-id", &token)]).await;
    // Exactly the rest of the twelve, each once.
    for _ in 0..4 {
        let m: Value = serde_json::from_str(&next_event(&mut multi).await.unwrap().data).unwrap();
        seen.push(m["data"].as_str().unwrap().to_owned());
    }
    seen.sort();
    let all: Vec<String> = (1..=6).map(|i| format!("n{i}")).chain((1..=6).map(|i| format!("s{i}"))).collect();
    assert_eq!(seen, all);
    // WebSocket and long poll: since the last id seen elsewhere.
    let mut ws = clients::Ws::connect(&c).await;
    ws.subscribe("news", Some(json!(4))).await;
    let got: Vec<String> = ws.messages(2).await.iter().map(|m| m["data"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ["n5", "n6"]);
    let (status, page) = get_json(&b, "/api/channels/sport/messages?since=4&wait=5").await;
    assert_eq!(status, 200);
    let got: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["data"].as_str().unwrap()).collect();
    assert_eq!(got, ["s5", "s6"]);
}

/// Reads an SSE stream until its `unread` count is `n` (a count is the
/// latest value: two changes close together may arrive as one); fails after
/// 10 s without an event.
async fn unread_becomes(events: &mut (impl futures_util::Stream<Item = eventsource_stream::Event> + Unpin), n: u64) {
    loop {
        let e = next_event(events).await.unwrap();
        if e.event == "unread" && serde_json::from_str::<Value>(&e.data).unwrap()["count"] == n {
            return;
        }
    }
}

/// The red dot across nodes: a notification, a read mark made on another
/// node, and a group join through a third each reach the user's live count.
#[tokio::test(flavor = "multi_thread")]
async fn unread_counts_follow_changes_made_on_other_nodes() {
    let redis = RedisServer::start(&[]);
    let (a, b, c) = (node(&[&redis]), node(&[&redis]), node(&[&redis]));
    let mut events = sse(&a, "/api/channels/user/ann/events?since=0", &[]).await;
    unread_becomes(&mut events, 0).await;
    let post = |s: &Server, body: Value| {
        let url = format!("{}/api/notifications", s.url);
        async move {
            let r = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    post(&b, json!({"users": ["ann"], "title": "one"})).await;
    post(&b, json!({"users": ["ann"], "title": "two"})).await;
    unread_becomes(&mut events, 2).await;
    // Marked read on node c: the count on node a follows.
    let r = client()
        .post(format!("{}/api/users/ann/read", c.url))
        .json(&json!({"ids": ["user/ann:1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["count"], 1);
    unread_becomes(&mut events, 1).await;
    // A group notification, then ann joins the group through node b: only
    // what comes after the join counts, and it counts on node a.
    post(&c, json!({"group": "staff", "title": "before"})).await;
    let r = client()
        .put(format!("{}/api/groups/staff/members", b.url))
        .json(&json!({"users": ["ann"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    post(&c, json!({"group": "staff", "title": "after"})).await;
    unread_becomes(&mut events, 2).await;
    // Marks made at once on two nodes both count.
    let mark = |s: &Server, id: &'static str| {
        let url = format!("{}/api/users/ann/read", s.url);
        async move { client().post(url).json(&json!({"ids": [id]})).send().await.unwrap().status().as_u16() }
    };
    let (x, y) = tokio::join!(mark(&b, "user/ann:2"), mark(&c, "$group/staff:2"));
    assert_eq!((x, y), (200, 200));
    let (_, count) = get_json(&a, "/api/users/ann/unread").await;
    assert_eq!(count["count"], 0, "neither concurrent mark was lost");
    unread_becomes(&mut events, 0).await;
}

/// Client-side shards: channels spread over two Redis servers; a
/// multi-channel publish spanning both is retried with its Idempotency-Key
/// and applies once.
#[tokio::test(flavor = "multi_thread")]
async fn channels_spread_over_two_redis_shards() {
    let (r1, r2) = (RedisServer::start(&[]), RedisServer::start(&[]));
    let (a, b) = (node(&[&r1, &r2]), node(&[&r1, &r2]));
    let channels: Vec<String> = (0..16).map(|i| format!("spread/{i}")).collect();
    let mut multi = sse(&b, "/api/events?channel=spread%2F%23&since=0", &[]).await;
    let body = json!({"channels": channels, "data": "everywhere"});
    let send =
        || client().post(format!("{}/api/publish", a.url)).header("idempotency-key", "spread-1").json(&body).send();
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(first, again, "a retry is answered with the first answer");
    assert!(first["results"].as_array().unwrap().iter().all(|r| r["id"] == 1));
    let mut got = Vec::new();
    for _ in 0..16 {
        let m: Value = serde_json::from_str(&next_event(&mut multi).await.unwrap().data).unwrap();
        got.push(m["channel"].as_str().unwrap().to_owned());
    }
    got.sort();
    let mut want = channels.clone();
    want.sort();
    assert_eq!(got, want, "every channel's message arrived once");
    // Both Redis servers hold some of the channels.
    let held = |r: &RedisServer| r.cli(&["--scan", "--pattern", "herald:*:s:spread/*"]).lines().count();
    assert!(held(&r1) > 0 && held(&r2) > 0, "r1 {} r2 {}", held(&r1), held(&r2));
    assert_eq!(held(&r1) + held(&r2), 16);
}

/// An MQTT 5 client on a node, its events read through a channel with
/// every wait bounded.
mod mqtt5 {
    use super::*;
    pub(super) use rumqttc::v5::{
        AsyncClient, ConnectionError, Event, MqttOptions,
        mqttbytes::{QoS, v5::Packet},
    };
    use tokio::sync::mpsc;

    pub(super) struct Client {
        pub(super) client: AsyncClient,
        events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        task: JoinHandle<()>,
    }

    pub(super) fn persistent(node: &Server, id: &str) -> MqttOptions {
        let (host, port) = node.mqtt.rsplit_once(':').unwrap();
        let mut o = MqttOptions::new(id, host, port.parse().unwrap());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(300));
        o
    }

    impl Client {
        /// Connects; answers whether the server had a session for it.
        pub(super) async fn connect(opts: MqttOptions) -> (Client, bool) {
            let (client, mut el) = AsyncClient::new(opts, 100);
            let (tx, events) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    let r = el.poll().await;
                    let ended = r.is_err();
                    if tx.send(r).is_err() || ended {
                        return;
                    }
                }
            });
            let mut c = Client { client, events, task };
            let present = c
                .until(|p| match p {
                    Packet::ConnAck(ack) => Some(ack.session_present),
                    _ => None,
                })
                .await;
            (c, present)
        }

        /// The next incoming packet `pick` accepts (others are dropped);
        /// fails after 10 s.
        pub(super) async fn until<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
            loop {
                let e = tokio::time::timeout(clients::PATIENCE, self.events.recv())
                    .await
                    .expect("an MQTT packet within 10s")
                    .expect("the event loop is running")
                    .expect("the MQTT connection is up");
                if let Event::Incoming(p) = e
                    && let Some(t) = pick(&p)
                {
                    return t;
                }
            }
        }

        /// The payload of the next message.
        pub(super) async fn message(&mut self) -> String {
            self.until(|p| match p {
                Packet::Publish(m) => Some(String::from_utf8(m.payload.to_vec()).unwrap()),
                _ => None,
            })
            .await
        }

        pub(super) async fn subscribe(&mut self, filter: &str) {
            self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
            self.until(|p| matches!(p, Packet::SubAck(_)).then_some(())).await;
        }

        /// Whether the server ended the connection (within 10 s).
        pub(super) async fn ended(&mut self) -> bool {
            loop {
                match tokio::time::timeout(clients::PATIENCE, self.events.recv()).await.expect("an end within 10s") {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return true,
                }
            }
        }

        /// Drops the connection without DISCONNECT.
        pub(super) fn kill(self) {
            self.task.abort();
        }
    }
}

/// MQTT across nodes: a client id that connects to another node takes its
/// session over (the old connection is told, the session goes on with its
/// subscriptions, what was published meanwhile arrives); retained messages
/// and topics outside the channel grammar reach subscribers on other nodes;
/// a will published on one node reaches subscribers on another.
#[tokio::test(flavor = "multi_thread")]
async fn mqtt_sessions_retained_messages_and_wills_work_across_nodes() {
    use mqtt5::{Client, Packet, persistent};
    let redis = RedisServer::start(&[]);
    let (a, b, c) = (node(&[&redis]), node(&[&redis]), node(&[&redis]));

    // A persistent session on a, subscribed to a channel and to a topic that
    // is not a channel.
    let (mut on_a, present) = Client::connect(persistent(&a, "roamer")).await;
    assert!(!present);
    on_a.subscribe("fleet/+").await;
    on_a.subscribe("/odd topic").await;
    common::publish(&c, "fleet/1", "one").await;
    assert_eq!(on_a.message().await, "one");

    // The same client id on b: a's connection is taken over.
    let (mut on_b, present) = Client::connect(persistent(&b, "roamer")).await;
    assert!(present, "the session followed the client to node b");
    assert!(on_a.ended().await, "a's connection was closed");
    // What the old connection is told, read off the wire (a raw MQTT 5
    // connection; rumqttc reports a server's DISCONNECT as a closed socket):
    // DISCONNECT with 0x8E, session taken over.
    let mut raw = clients::raw_mqtt::raw_connected(&a, 5, "raw-roamer", 0).await;
    let _taker = Client::connect(persistent(&c, "raw-roamer")).await;
    let told = clients::raw_mqtt::closed_by_server(&mut raw).await;
    assert_eq!(&told[..1], [0xe0], "a DISCONNECT: {told:x?}");
    assert_eq!(told[2], 0x8e, "session taken over: {told:x?}");
    common::publish(&c, "fleet/2", "two").await;
    // "one" may come again first: QoS 1, and its PUBACK may not have reached
    // node a before the takeover (a redelivery, not a loss).
    let mut got = on_b.message().await;
    while got == "one" {
        got = on_b.message().await;
    }
    assert_eq!(got, "two", "the subscription came along");

    // Messages published while the client is away arrive when it comes back
    // on a third node (QoS 1, from the session's stored cursors).
    on_b.kill();
    common::publish(&a, "fleet/3", "three").await;
    let (mut on_c, present) = Client::connect(persistent(&c, "roamer")).await;
    assert!(present);
    assert_eq!(on_c.message().await, "three");

    // A topic outside the channel grammar, published on another node.
    let (mut publisher, _) = Client::connect(persistent(&a, "odd-publisher")).await;
    publisher.client.publish("/odd topic", mqtt5::QoS::AtLeastOnce, false, "odd").await.unwrap();
    publisher.until(|p| matches!(p, Packet::PubAck(_)).then_some(())).await;
    assert_eq!(on_c.message().await, "odd");

    // A retained message set on one node, read by a subscriber on another.
    publisher.client.publish("fleet/status", mqtt5::QoS::AtLeastOnce, true, "retained").await.unwrap();
    publisher.until(|p| matches!(p, Packet::PubAck(_)).then_some(())).await;
    let (mut late, _) = Client::connect(persistent(&b, "late")).await;
    late.subscribe("fleet/status").await;
    assert_eq!(late.message().await, "retained");

    // A will: the client on a is cut off, its will reaches b.
    let mut will_opts = persistent(&a, "mortal");
    will_opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "fleet/obituary",
        "gone",
        mqtt5::QoS::AtLeastOnce,
        false,
        None,
    ));
    late.subscribe("fleet/obituary").await;
    let (mortal, _) = Client::connect(will_opts).await;
    mortal.kill();
    assert_eq!(late.message().await, "gone");
}

/// A node on a Redis Cluster (the seeds of its masters).
fn cluster_node(cluster: &RedisCluster) -> Server {
    let seeds = cluster.seeds().join(",");
    Server::start_with(&[
        ("HERALD_REDIS_URL", &seeds),
        ("HERALD_REDIS_CLUSTER", "true"),
        ("HERALD_REDIS_PARTITIONS", "32"),
        ("HERALD_REDIS_CHECK_EVERY", "200ms"),
    ])
}

/// Nodes on a 3-master Redis Cluster: a publish naming channels in every
/// master's slots reaches a subscriber on another node, once each, and its
/// retry with the same Idempotency-Key applies nothing more.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let (a, b) = (cluster_node(&cluster), cluster_node(&cluster));
    let channels: Vec<String> = (0..24).map(|i| format!("spread/{i}")).collect();
    let mut multi = sse(&b, "/api/events?channel=spread%2F%23&since=0", &[]).await;
    let body = json!({"channels": channels, "data": "everywhere"});
    let send = || client().post(format!("{}/api/publish", a.url)).header("idempotency-key", "c-1").json(&body).send();
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(first, again);
    let mut got = Vec::new();
    for _ in 0..24 {
        let m: Value = serde_json::from_str(&next_event(&mut multi).await.unwrap().data).unwrap();
        got.push(m["channel"].as_str().unwrap().to_owned());
    }
    got.sort();
    let mut want = channels.clone();
    want.sort();
    assert_eq!(got, want);
    for n in &cluster.nodes {
        assert!(n.cli(&["--scan", "--pattern", "herald:*:s:spread/*"]).lines().count() > 0, "master {}", n.port);
    }
    let (_, stats) = get_json(&b, "/api/stats").await;
    assert!(stats["redis"]["shards"][0]["feed_received"].as_u64().unwrap() > 0, "{stats}");
}

/// Node liveness: every node lists the deployment's nodes in `/api/stats`;
/// one that stops cleanly leaves the list, one that dies stays in it, shown
/// as not alive.
#[tokio::test(flavor = "multi_thread")]
async fn every_node_sees_which_nodes_are_alive() {
    let redis = RedisServer::start(&[]);
    let a = named_node(&redis, "a");
    let mut b = named_node(&redis, "b");
    let mut c = named_node(&redis, "c");
    // The nodes as `a` sees them: name -> alive.
    let nodes = || async {
        let (_, stats) = get_json(&a, "/api/stats").await;
        stats["redis"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["node"].as_str().unwrap().to_owned(), n["alive"].as_bool().unwrap()))
            .collect::<HashMap<String, bool>>()
    };
    let until = |want: HashMap<String, bool>| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let now = nodes().await;
            if now == want {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "nodes {now:?}, never {want:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let map = |v: &[(&str, bool)]| v.iter().map(|(n, a)| (n.to_string(), *a)).collect::<HashMap<_, _>>();
    until(map(&[("a", true), ("b", true), ("c", true)])).await;
    assert!(c.stop().success());
    until(map(&[("a", true), ("b", true)])).await;
    b.kill9();
    until(map(&[("a", true), ("b", false)])).await;
    let metrics = client().get(format!("{}/metrics", a.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("herald_redis_nodes_alive 1\n"), "{metrics}");
}
