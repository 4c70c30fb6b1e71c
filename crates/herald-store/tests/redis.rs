//! The Redis store's own faults, against a real `redis-server`: several
//! nodes (stores) on one Redis, a feed cut off, a Redis killed and
//! restarted with and without its last writes, a wiped Redis, and the
//! settings a node refuses. What every test checks: every node hears every
//! committed message, in id order per channel, and no id is ever used twice.

mod redis_server;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use herald_core::{Channel, Data, Message, NewMessage, RetentionRules};
use herald_store::{CommitSink, RedisOptions, RedisStore, Signal, Store, StoreConfig, StoreError, system_clock};
use redis_server::{RedisCluster, RedisServer};

/// A node's sink: every message it was handed, per channel, in order.
#[derive(Default)]
struct Node {
    got: Mutex<HashMap<String, Vec<(u64, String)>>>,
    signals: Mutex<Vec<u8>>,
    changed: tokio::sync::Notify,
}

impl CommitSink for Node {
    fn committed(&self, msgs: &[Arc<Message>]) {
        let mut got = self.got.lock().unwrap();
        for m in msgs {
            got.entry(m.channel.to_string()).or_default().push((m.id, m.data.as_str().into_owned()));
        }
        self.changed.notify_waiters();
    }

    fn signaled(&self, signal: &Signal) {
        self.signals.lock().unwrap().push(signal.kind);
        self.changed.notify_waiters();
    }
}

impl Node {
    /// Waits until `channel` has reached id `id` (or 10 s pass), and
    /// returns what it got.
    async fn until(&self, channel: &str, id: u64) -> Vec<(u64, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.changed.notified();
            let got = self.got.lock().unwrap().get(channel).cloned().unwrap_or_default();
            if got.last().is_some_and(|(last, _)| *last >= id) {
                return got;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return got;
            }
        }
    }
}

async fn node(server: &RedisServer) -> (RedisStore, Arc<Node>) {
    let sink = Arc::new(Node::default());
    let config = StoreConfig { retention: RetentionRules::default(), clock: system_clock(), sink: sink.clone() };
    let mut options = RedisOptions::new(vec![server.url()]);
    options.partitions = 4;
    options.check_every = Duration::from_millis(100);
    options.timeout = Duration::from_millis(500);
    options.connect_timeout = Duration::from_millis(500);
    (RedisStore::open(options, config).await.unwrap(), sink)
}

fn msg(channel: &str, text: &str) -> NewMessage {
    NewMessage { channel: Channel::parse(channel).unwrap(), event: None, data: Data::text(text), meta: None }
}

/// Ids 1..=n in order, each with the payload published under it.
fn in_order(got: &[(u64, String)], published: &HashMap<u64, String>) {
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "ids arrive once each, in order");
    for (id, text) in got {
        assert_eq!(published.get(id), Some(text), "id {id} carries what was published under it");
    }
    assert_eq!(ids.len(), published.len(), "every acknowledged message arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_agree_on_ids_and_each_hears_every_message_in_order() {
    let server = RedisServer::start(&[]);
    let (a, sink_a) = node(&server).await;
    let (b, sink_b) = node(&server).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut tasks = Vec::new();
    for (n, store) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..50 {
                let text = format!("{n}/{i}");
                let m = store.append(vec![msg("room", &text)]).await.unwrap();
                out.push((m[0].id, text));
            }
            out
        }));
    }
    let mut published = HashMap::new();
    for t in tasks {
        for (id, text) in t.await.unwrap() {
            assert!(published.insert(id, text).is_none(), "id {id} given twice");
        }
    }
    assert_eq!(published.keys().max(), Some(&200));
    in_order(&sink_a.until("room", 200).await, &published);
    in_order(&sink_b.until("room", 200).await, &published);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_cut_off_is_made_up_for_from_the_log() {
    let server = RedisServer::start(&[]);
    let (a, _) = node(&server).await;
    let (_b, sink_b) = node(&server).await;
    let mut published = HashMap::new();
    for i in 0..300u64 {
        if i % 50 == 25 {
            // Cut every node's pub/sub connection; publishes go on meanwhile.
            server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
        let text = i.to_string();
        let m = a.append(vec![msg("c", &text)]).await.unwrap();
        published.insert(m[0].id, text);
    }
    in_order(&sink_b.until("c", 300).await, &published);
    let status = _b.status().details.unwrap();
    assert!(status["shards"][0]["feed_reconnects"].as_u64().unwrap() >= 1, "{status}");
}

/// The last message before a cut, on a channel that then goes quiet, is not
/// stranded: the periodic sequence check reads it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_channel_s_last_message_is_not_stranded() {
    let server = RedisServer::start(&[]);
    let (a, _) = node(&server).await;
    let (b, sink_b) = node(&server).await;
    a.append(vec![msg("quiet", "1")]).await.unwrap();
    sink_b.until("quiet", 1).await;
    // Make b deaf without it noticing: pause its feed's delivery by having
    // Redis drop pub/sub messages for b (its output buffer limit is tiny),
    // then publish the last message.
    server.cli(&["CONFIG", "SET", "client-output-buffer-limit", "pubsub 1 1 0"]);
    a.append(vec![msg("quiet", &"x".repeat(4096))]).await.unwrap();
    server.cli(&["CONFIG", "SET", "client-output-buffer-limit", "pubsub 32mb 8mb 60"]);
    let got = sink_b.until("quiet", 2).await;
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2]);
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_while_redis_is_down_are_refused_and_nothing_acknowledged_is_lost() {
    let mut server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let (a, _) = node(&server).await;
    let (_b, sink_b) = node(&server).await;
    let mut published = HashMap::new();
    for i in 0..20 {
        let m = a.append(vec![msg("c", &format!("before {i}"))]).await.unwrap();
        published.insert(m[0].id, format!("before {i}"));
    }
    server.kill();
    let refused = a.append(vec![msg("c", "while down")]).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    assert!(!a.status().available, "the store says so");
    server.kill_and_restart(&["--appendonly", "yes", "--appendfsync", "always"]);
    // The connection comes back by itself; the first tries may still fail.
    let mut i = 0;
    while published.len() < 40 {
        let text = format!("after {i}");
        if let Ok(m) = a.append(vec![msg("c", &text)]).await {
            published.insert(m[0].id, text);
        }
        i += 1;
    }
    // With appendfsync always nothing acknowledged was lost: ids go on from
    // 21 with no gap, and every node hears every message.
    assert_eq!(published.keys().max(), Some(&40));
    in_order(&sink_b.until("c", 40).await.into_iter().filter(|(id, _)| *id <= 40).collect::<Vec<_>>(), &published);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_that_may_have_lost_writes_never_reuses_an_id() {
    // No persistence at all: a restart loses everything, as a wipe does.
    let mut server = RedisServer::start(&[]);
    let (a, _) = node(&server).await;
    let before = a.append(vec![msg("c", "1"), msg("c", "2")]).await.unwrap();
    assert_eq!((before[0].id, before[1].id), (1, 2));
    server.kill_and_restart(&[]);
    let after = loop {
        match a.append(vec![msg("c", "3")]).await {
            Ok(m) => break m,
            Err(StoreError::Unavailable(_)) => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(after[0].id > 1_000_000_000_000, "ids go on from a floor, not from 1: {}", after[0].id);
    let page = a.read(Channel::parse("c").unwrap(), 0, 10).await.unwrap();
    assert_eq!(page.window.origin + 1, after[0].id, "a reader from 0 starts at the origin: no false gap");
    let page = a.read(Channel::parse("c").unwrap(), 2, 10).await.unwrap();
    let plan = herald_core::cursor::plan(&Channel::parse("c").unwrap(), 2, page.window);
    assert!(plan.gap.is_some(), "a reader who had id 2 is told of a gap");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_redis_never_reuses_an_id() {
    let server = RedisServer::start(&[]);
    let (a, _) = node(&server).await;
    assert_eq!(a.append(vec![msg("c", "1")]).await.unwrap()[0].id, 1);
    server.cli(&["FLUSHALL"]);
    let after = a.append(vec![msg("c", "2")]).await.unwrap();
    assert!(after[0].id > 1_000_000_000_000, "{}", after[0].id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_a_redis_that_evicts_keys() {
    let server = RedisServer::start(&["--maxmemory-policy", "allkeys-lru"]);
    let config =
        StoreConfig { retention: RetentionRules::default(), clock: system_clock(), sink: Arc::new(Node::default()) };
    let err = RedisStore::open(RedisOptions::new(vec![server.url()]), config).await.err().expect("refused");
    assert!(err.to_string().contains("noeviction"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_another_number_of_partitions() {
    let server = RedisServer::start(&[]);
    let _first = node(&server).await; // 4 partitions
    let config =
        StoreConfig { retention: RetentionRules::default(), clock: system_clock(), sink: Arc::new(Node::default()) };
    let mut options = RedisOptions::new(vec![server.url()]);
    options.partitions = 8;
    let err = RedisStore::open(options, config).await.err().expect("refused");
    assert!(err.to_string().contains("partitions = 4"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_reach_every_node() {
    let server = RedisServer::start(&[]);
    let (a, sink_a) = node(&server).await;
    let (_b, sink_b) = node(&server).await;
    a.signal(Signal::new(9, "user/ann", bytes::Bytes::from_static(b"x"))).await.unwrap();
    for sink in [&sink_a, &sink_b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !sink.signals.lock().unwrap().contains(&9) && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), sink.changed.notified()).await;
        }
        assert!(sink.signals.lock().unwrap().contains(&9));
    }
}

/// A signal creates its partition's record before any message does: the
/// first message there still gets id 1 (only a partition that gave out ids
/// and lost its record goes on from a floor).
#[tokio::test(flavor = "multi_thread")]
async fn signals_before_the_first_message_do_not_move_ids() {
    let server = RedisServer::start(&[]);
    let (a, _) = node(&server).await;
    for i in 0..32 {
        a.signal(Signal::new(9, format!("user/{i}"), bytes::Bytes::new())).await.unwrap();
    }
    let (_b, _) = node(&server).await; // a node that reads every partition's record at start
    for ch in ["c", "d", "e", "f", "g", "h"] {
        assert_eq!(a.append(vec![msg(ch, "first")]).await.unwrap()[0].id, 1, "{ch}");
    }
}

/// A 3-master Redis Cluster: partitions spread over every master, each
/// publish one script in its partition's slot, the feeds sharded pub/sub;
/// two nodes agree on ids and hear every message in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_spreads_partitions_over_its_masters() {
    let cluster = RedisCluster::start(3);
    let open = || async {
        let sink = Arc::new(Node::default());
        let config = StoreConfig { retention: RetentionRules::default(), clock: system_clock(), sink: sink.clone() };
        let mut options = RedisOptions::new(cluster.seeds());
        options.cluster = true;
        options.partitions = 32;
        options.check_every = Duration::from_millis(100);
        (RedisStore::open(options, config).await.unwrap(), sink)
    };
    let (a, _) = open().await;
    let (b, sink_b) = open().await;
    let channels: Vec<String> = (0..48).map(|i| format!("spread/{i}")).collect();
    let mut published: HashMap<String, HashMap<u64, String>> = HashMap::new();
    for round in 0..3 {
        // One publish naming every channel: a script per partition.
        let batch: Vec<NewMessage> = channels.iter().map(|c| msg(c, &format!("{c}#{round}"))).collect();
        for m in a.append(batch).await.unwrap() {
            assert_eq!(m.id, round + 1, "{}", m.channel);
            published.entry(m.channel.to_string()).or_default().insert(m.id, m.data.as_str().into_owned());
        }
    }
    for c in &channels {
        in_order(&sink_b.until(c, 3).await, &published[c]);
    }
    let status = b.status().details.unwrap();
    assert!(status["shards"][0]["feed_received"].as_u64().unwrap() > 0, "sharded pub/sub delivered: {status}");
    // Every master holds some of the channels' histories.
    for n in &cluster.nodes {
        let held = n.cli(&["--scan", "--pattern", "herald:*:s:spread/*"]).lines().count();
        assert!(held > 0, "master {} holds none", n.port);
    }
    // Reads, signals and idempotent publishes work across slots too.
    let page = b.read(Channel::parse("spread/7").unwrap(), 0, 10).await.unwrap();
    assert_eq!(page.messages.len(), 3);
    b.signal(Signal::new(9, "user/x", bytes::Bytes::new())).await.unwrap();
    let key = herald_store::Idempotency { key: "k".into(), fingerprint: 1 };
    let twice = [
        a.append_once(key.clone(), vec![msg("x/1", "a"), msg("y/2", "b")]).await.unwrap(),
        a.append_once(key, vec![msg("x/1", "a"), msg("y/2", "b")]).await.unwrap(),
    ];
    assert_eq!(twice[0], twice[1]);
    assert_eq!(b.read(Channel::parse("x/1").unwrap(), 0, 10).await.unwrap().messages.len(), 1, "applied once");
}
