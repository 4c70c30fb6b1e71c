//! One conformance suite, run against every `Store` implementation.

mod redis_server;

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use herald_core::inbox::{ReadMark, ReadState};
use herald_core::{Channel, Data, Filter, Message, Meta, NewMessage, Retention, RetentionRules};
use herald_store::{
    BrokerStore, BrokerTable, CommitSink, Idempotency, InboxStore, MemoryStore, RedisOptions, RedisStore, Signal,
    SqliteOptions, SqliteStore, Store, StoreConfig, StoreError, fingerprint,
};

/// Records what the store handed to its sink.
#[derive(Default)]
struct Recorder {
    msgs: Mutex<Vec<(String, u64)>>,
    signals: Mutex<Vec<Signal>>,
    changed: tokio::sync::Notify,
}

impl CommitSink for Recorder {
    fn committed(&self, msgs: &[Arc<Message>]) {
        self.msgs.lock().unwrap().extend(msgs.iter().map(|m| (m.channel.to_string(), m.id)));
        self.changed.notify_waiters();
    }

    fn signaled(&self, signal: &Signal) {
        self.signals.lock().unwrap().push(signal.clone());
        self.changed.notify_waiters();
    }
}

impl Recorder {
    /// What the sink was handed, once it holds `n` messages: a Redis store
    /// hands commits on from its feed, a moment after the publisher is
    /// answered; the others before.
    async fn messages(&self, n: usize) -> Vec<(String, u64)> {
        self.wait(|| self.msgs.lock().unwrap().len() >= n).await;
        self.msgs.lock().unwrap().clone()
    }

    async fn signals(&self, n: usize) -> Vec<Signal> {
        self.wait(|| self.signals.lock().unwrap().len() >= n).await;
        self.signals.lock().unwrap().clone()
    }

    async fn wait(&self, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.changed.notified();
            if done() {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return; // the caller's assertion shows what is missing
            }
        }
    }
}

struct Fixture {
    store: Arc<dyn Store>,
    inbox: Arc<dyn InboxStore>,
    broker: Arc<dyn BrokerStore>,
    sink: Arc<Recorder>,
    clock: Arc<AtomicI64>,
    _dir: Option<tempfile::TempDir>,
    _redis: Option<redis_server::RedisServer>,
}

type Make = fn(RetentionRules) -> Pin<Box<dyn Future<Output = Fixture> + Send>>;

fn config(retention: RetentionRules) -> (StoreConfig, Arc<Recorder>, Arc<AtomicI64>) {
    let sink = Arc::new(Recorder::default());
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let c = clock.clone();
    let config = StoreConfig { retention, clock: Arc::new(move || c.load(Ordering::SeqCst)), sink: sink.clone() };
    (config, sink, clock)
}

fn memory(retention: RetentionRules) -> Pin<Box<dyn Future<Output = Fixture> + Send>> {
    Box::pin(async move {
        let (config, sink, clock) = config(retention);
        let store = Arc::new(MemoryStore::new(config));
        Fixture { store: store.clone(), inbox: store.clone(), broker: store, sink, clock, _dir: None, _redis: None }
    })
}

fn sqlite(retention: RetentionRules) -> Pin<Box<dyn Future<Output = Fixture> + Send>> {
    Box::pin(async move {
        let dir = tempfile::tempdir().unwrap();
        let (config, sink, clock) = config(retention);
        let store = Arc::new(SqliteStore::open(SqliteOptions::new(dir.path()), config).unwrap());
        Fixture {
            store: store.clone(),
            inbox: store.clone(),
            broker: store,
            sink,
            clock,

            _dir: Some(dir),
            _redis: None,
        }
    })
}

/// A Redis store on a `redis-server` of the test's own.
fn redis(retention: RetentionRules) -> Pin<Box<dyn Future<Output = Fixture> + Send>> {
    Box::pin(async move {
        let (config, sink, clock) = config(retention);
        let server = redis_server::RedisServer::start(&[]);
        let mut options = RedisOptions::new(vec![server.url()]);
        options.partitions = 4;
        options.check_every = Duration::from_millis(100);
        let store = Arc::new(RedisStore::open(options, config).await.unwrap());
        Fixture {
            store: store.clone(),
            inbox: store.clone(),
            broker: store,
            sink,
            clock,
            _dir: None,
            _redis: Some(server),
        }
    })
}

fn ch(s: &str) -> Channel {
    Channel::parse(s).unwrap()
}

fn new(channel: &str, text: &str) -> NewMessage {
    NewMessage { channel: ch(channel), event: None, data: Data::text(text), meta: None }
}

fn ids(msgs: &[Arc<Message>]) -> Vec<u64> {
    msgs.iter().map(|m| m.id).collect()
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::memory).await } )* }
        mod sqlite_store { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::sqlite).await } )* }
        mod redis_store { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::redis).await } )* }
    };
}

conformance!(
    ids_are_per_channel_and_sequential,
    read_pages_after_a_cursor,
    count_retention_keeps_the_last_n,
    age_retention_drops_old_messages,
    channels_by_filter,
    concurrent_appends_get_unique_ids_in_sink_order,
    payload_kind_and_event_survive,
    mqtt_properties_survive_a_read_from_history,
    group_membership,
    read_state_round_trips,
    cached_head_is_the_head_when_known,
    broker_records_are_set_replaced_and_deleted,
    idempotency_keys_apply_a_publish_once,
    signals_reach_the_sink,
    concurrent_read_marks_both_count,
);

async fn broker_records_are_set_replaced_and_deleted(make: Make) {
    let f = make(RetentionRules::default()).await;
    let put = |t, k: &str, v: Option<&[u8]>| f.broker.put(t, k.to_owned(), v.map(<[u8]>::to_vec));
    put(BrokerTable::Retained, "a/b", Some(b"one")).await.unwrap();
    put(BrokerTable::Retained, "a/b", Some(b"two")).await.unwrap();
    put(BrokerTable::Retained, "gone", Some(b"x")).await.unwrap();
    put(BrokerTable::Retained, "gone", None).await.unwrap();
    put(BrokerTable::Retained, "never", None).await.unwrap();
    put(BrokerTable::Sessions, "a/b", Some(b"{}")).await.unwrap();
    assert_eq!(f.broker.get(BrokerTable::Retained, "a/b".into()).await.unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(f.broker.get(BrokerTable::Retained, "gone".into()).await.unwrap(), None);
    assert_eq!(f.broker.load(BrokerTable::Retained).await.unwrap(), [("a/b".to_string(), b"two".to_vec())]);
    assert_eq!(
        f.broker.load(BrokerTable::Sessions).await.unwrap(),
        [("a/b".to_string(), b"{}".to_vec())],
        "the tables are apart"
    );
}

async fn idempotency_keys_apply_a_publish_once(make: Make) {
    let f = make(RetentionRules::default()).await;
    let batch = || vec![new("a", "x"), new("b", "x")];
    let key = |k: &str| Idempotency { key: k.into(), fingerprint: fingerprint(&batch()) };
    let first = f.store.append_once(key("k1"), batch()).await.unwrap();
    assert_eq!(first, [(ch("a"), 1), (ch("b"), 1)]);
    let again = f.store.append_once(key("k1"), batch()).await.unwrap();
    assert_eq!(again, first, "a retry gets the first answer");
    assert_eq!(f.store.read(ch("a"), 0, 10).await.unwrap().window.head, 1, "and stores nothing");
    let other = Idempotency { key: "k1".into(), fingerprint: fingerprint(&[new("a", "y")]) };
    assert!(matches!(f.store.append_once(other, vec![new("a", "y")]).await, Err(StoreError::IdempotencyConflict)));
    assert_eq!(f.store.append_once(key("k2"), batch()).await.unwrap(), [(ch("a"), 2), (ch("b"), 2)]);
    assert_eq!(f.sink.messages(4).await.len(), 4, "the sink heard of each message once");
}

async fn signals_reach_the_sink(make: Make) {
    let f = make(RetentionRules::default()).await;
    let s = Signal::new(7, "user/ann", bytes::Bytes::from_static(b"\x00read"));
    f.store.signal(s.clone()).await.unwrap();
    let got = f.sink.signals(1).await;
    let got: Vec<_> = got.iter().filter(|x| x.kind == 7).map(|x| (x.key.clone(), x.body.clone())).collect();
    assert_eq!(got, [(s.key, s.body)]);
}

/// Two devices (or nodes) marking at once: neither mark is lost.
async fn concurrent_read_marks_both_count(make: Make) {
    let f = make(RetentionRules::default()).await;
    let marks: Vec<_> = (1..=40u64)
        .map(|id| {
            let inbox = f.inbox.clone();
            tokio::spawn(
                async move { inbox.mark_read("u".into(), vec![(ch("user/u"), ReadMark::Ids(vec![id]))]).await },
            )
        })
        .collect();
    for m in marks {
        m.await.unwrap().unwrap();
    }
    let state = f.inbox.read_state("u".into()).await.unwrap();
    assert_eq!(state[&ch("user/u")], ReadState { upto: 40, ids: Default::default() });
}

async fn group_membership(make: Make) {
    let f = make(RetentionRules::default()).await;
    let users: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    assert_eq!(f.inbox.add_members("staff".into(), users.clone(), 3).await.unwrap(), 5);
    assert_eq!(f.inbox.add_members("staff".into(), vec!["u1".into(), "u9".into()], 7).await.unwrap(), 1);
    f.inbox.add_members("ops".into(), vec!["u1".into()], 0).await.unwrap();
    assert_eq!(
        f.inbox.groups_of("u1".into()).await.unwrap(),
        [("ops".to_string(), 0), ("staff".to_string(), 3)],
        "a re-add keeps the first join"
    );
    assert_eq!(f.inbox.groups_of("u9".into()).await.unwrap(), [("staff".to_string(), 7)]);
    assert_eq!(f.inbox.members("staff".into(), "u1".into(), 2).await.unwrap(), ["u2", "u3"]);
    assert_eq!(f.inbox.remove_members("staff".into(), vec!["u1".into(), "nobody".into()]).await.unwrap(), 1);
    assert_eq!(f.inbox.groups_of("u1".into()).await.unwrap(), [("ops".to_string(), 0)]);
}

async fn read_state_round_trips(make: Make) {
    let f = make(RetentionRules::default()).await;
    let mut r = ReadState::default();
    r.mark([1, 2, 4]);
    let merged = f.inbox.mark_read("a".into(), vec![(ch("user/a"), ReadMark::Ids(vec![1, 2, 4]))]).await.unwrap();
    assert_eq!(merged.get(&ch("user/a")), Some(&r));
    let got = f.inbox.read_state("a".into()).await.unwrap();
    assert_eq!(got.get(&ch("user/a")), Some(&r));
    // Marks merge: ids fold into `upto`, and "all" keeps what is above it.
    let merged = f.inbox.mark_read("a".into(), vec![(ch("user/a"), ReadMark::Ids(vec![3, 9]))]).await.unwrap();
    assert_eq!(merged[&ch("user/a")], ReadState { upto: 4, ids: [9].into() });
    let merged = f.inbox.mark_read("a".into(), vec![(ch("user/a"), ReadMark::All(6))]).await.unwrap();
    assert_eq!(merged[&ch("user/a")], ReadState { upto: 6, ids: [9].into() });
    assert!(f.inbox.read_state("b".into()).await.unwrap().is_empty(), "one user's state is not another's");
}

async fn ids_are_per_channel_and_sequential(make: Make) {
    let f = make(RetentionRules::default()).await;
    let got = f.store.append(vec![new("a", "1"), new("b", "1"), new("a", "2")]).await.unwrap();
    assert_eq!(ids(&got), [1, 1, 2]);
    let got = f.store.append(vec![new("a", "3")]).await.unwrap();
    assert_eq!(ids(&got), [3]);
    let seen = f.sink.messages(4).await;
    let per = |c: &str| seen.iter().filter(|(x, _)| x == c).map(|(_, id)| *id).collect::<Vec<_>>();
    assert_eq!(seen.len(), 4);
    assert_eq!((per("a"), per("b")), (vec![1, 2, 3], vec![1]), "each channel's ids, in order");
}

/// Readers skip the store when their cursor equals the cached head, so a
/// cached head must never be ahead of or behind the committed one.
async fn cached_head_is_the_head_when_known(make: Make) {
    let f = make(RetentionRules::default()).await;
    // A store that holds everything (memory) knows a new channel's head is 0;
    // one that may not (SQLite, before reading) says it does not know.
    assert!(matches!(f.store.cached_head(&ch("a")), None | Some(0)), "nothing but 0 for a channel never seen");
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = f.store.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    let got = store.append(vec![new("a", &i.to_string())]).await.unwrap();
                    // Committed, so known at least this far; and never past the
                    // head a read started afterwards sees.
                    let cached = store.cached_head(&ch("a"));
                    let head = store.read(ch("a"), 0, 0).await.unwrap().window.head;
                    if let Some(cached) = cached {
                        assert!(
                            cached >= got[0].id && cached <= head,
                            "cached {cached}, own id {}, head {head}",
                            got[0].id
                        );
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let head = f.store.read(ch("a"), 0, 0).await.unwrap().window.head;
    assert_eq!(head, 160);
    f.sink.messages(160).await;
    assert!(matches!(f.store.cached_head(&ch("a")), None | Some(160)));
}

async fn read_pages_after_a_cursor(make: Make) {
    let f = make(RetentionRules::default()).await;
    for i in 0..10 {
        f.store.append(vec![new("c", &i.to_string())]).await.unwrap();
    }
    let page = f.store.read(ch("c"), 3, 4).await.unwrap();
    assert_eq!(ids(&page.messages), [4, 5, 6, 7]);
    // After a cursor with nothing missed, `first` is only known to be at or
    // before the cursor's next id (a read answered from memory); from 0 it
    // is exact.
    assert_eq!(page.window.head, 10);
    assert!(page.window.first <= 4, "{:?}", page.window);
    let whole = f.store.read(ch("c"), 0, 0).await.unwrap();
    assert_eq!((whole.window.first, whole.window.head), (1, 10));
    assert_eq!(page.messages[0].data.as_str(), "3");
    let tail = f.store.read(ch("c"), 10, 4).await.unwrap();
    assert!(tail.messages.is_empty());
    let none = f.store.read(ch("never"), 0, 4).await.unwrap();
    assert!(none.messages.is_empty());
    assert_eq!((none.window.first, none.window.head), (1, 0));
}

async fn count_retention_keeps_the_last_n(make: Make) {
    let rules = RetentionRules {
        default: Retention { size: 3, ttl_ms: None },
        rules: vec![(Filter::parse("live/#").unwrap(), Retention { size: 0, ttl_ms: None })],
    };
    let f = make(rules).await;
    for _ in 0..5 {
        f.store.append(vec![new("c", "x"), new("live/x", "y")]).await.unwrap();
    }
    let page = f.store.read(ch("c"), 0, 100).await.unwrap();
    assert_eq!(ids(&page.messages), [3, 4, 5]);
    assert_eq!(page.window.first, 3);
    let live = f.store.read(ch("live/x"), 0, 100).await.unwrap();
    assert!(live.messages.is_empty());
    assert_eq!((live.window.first, live.window.head), (6, 5), "ids advance even with no history");
}

async fn age_retention_drops_old_messages(make: Make) {
    let f = make(RetentionRules { default: Retention { size: 100, ttl_ms: Some(1000) }, rules: vec![] }).await;
    f.store.append(vec![new("c", "old")]).await.unwrap();
    f.clock.fetch_add(600, Ordering::SeqCst);
    f.store.append(vec![new("c", "new")]).await.unwrap();
    f.clock.fetch_add(600, Ordering::SeqCst);
    let page = f.store.read(ch("c"), 0, 100).await.unwrap();
    assert_eq!(ids(&page.messages), [2]);
    assert_eq!(page.window.first, 2);
    f.clock.fetch_add(1000, Ordering::SeqCst);
    let page = f.store.read(ch("c"), 0, 100).await.unwrap();
    assert!(page.messages.is_empty());
    assert_eq!((page.window.first, page.window.head), (3, 2));
    // Ids continue after everything expired.
    assert_eq!(ids(&f.store.append(vec![new("c", "again")]).await.unwrap()), [3]);
}

async fn channels_by_filter(make: Make) {
    let f = make(RetentionRules::default()).await;
    f.store
        .append(vec![
            new("chat", "x"),
            new("chat/a", "x"),
            new("chat/a", "y"),
            new("chat/b/c", "x"),
            new("chatty", "x"),
        ])
        .await
        .unwrap();
    let names = |v: Vec<(Channel, u64)>| v.into_iter().map(|(c, h)| format!("{c}={h}")).collect::<Vec<_>>();
    assert_eq!(names(f.store.channels(Filter::parse("chat/+").unwrap()).await.unwrap()), ["chat/a=2"]);
    assert_eq!(
        names(f.store.channels(Filter::parse("chat/#").unwrap()).await.unwrap()),
        ["chat=1", "chat/a=2", "chat/b/c=1"]
    );
    assert_eq!(names(f.store.channels(Filter::parse("#").unwrap()).await.unwrap()).len(), 4);
}

async fn concurrent_appends_get_unique_ids_in_sink_order(make: Make) {
    let f = make(RetentionRules::default()).await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..20 {
                got.extend(ids(&store.append(vec![new("c", &format!("{t}/{i}"))]).await.unwrap()));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=320).collect::<Vec<_>>());
    let seen: Vec<u64> = f.sink.messages(320).await.iter().map(|(_, id)| *id).collect();
    assert_eq!(seen, (1..=320).collect::<Vec<_>>(), "the sink sees ids in order");
}

async fn payload_kind_and_event_survive(make: Make) {
    let f = make(RetentionRules::default()).await;
    let json = Data::json(bytes::Bytes::from_static(b"{\"a\": 1}")).unwrap();
    let ev = herald_core::EventName::parse("chat").unwrap();
    f.store
        .append(vec![NewMessage { channel: ch("c"), event: Some(ev.clone()), data: json.clone(), meta: None }])
        .await
        .unwrap();
    let page = f.store.read(ch("c"), 0, 10).await.unwrap();
    assert_eq!(page.messages[0].data, json);
    assert_eq!(page.messages[0].event, Some(ev));
    assert_eq!(page.messages[0].time, 1_000_000);
}

fn mqtt_meta() -> Arc<Meta> {
    Arc::new(Meta {
        qos: 2,
        retain: true,
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        response_topic: Some("reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x01\x02")),
        payload_utf8: Some(true),
        expires_at: Some(2_000_000),
        origin: Some(7),
    })
}

/// A message read back from history (past the store's in-memory tail) keeps
/// the QoS and properties it was published with, as one delivered live does.
async fn mqtt_properties_survive_a_read_from_history(make: Make) {
    let f = make(RetentionRules::default()).await;
    let with_meta = NewMessage { meta: Some(mqtt_meta()), ..new("m", "first") };
    f.store.append(vec![with_meta]).await.unwrap();
    f.store.append((0..100).map(|i| new("m", &i.to_string())).collect()).await.unwrap();
    let page = f.store.read(ch("m"), 0, 2).await.unwrap();
    assert_eq!(page.messages[0].meta, Some(mqtt_meta()));
    assert_eq!(page.messages[1].meta, None, "an HTTP publish has none");
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_reopens_with_history_and_continues_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = config(RetentionRules::default());
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), config.clone()).unwrap();
    store.append(vec![new("c", "1"), NewMessage { meta: Some(mqtt_meta()), ..new("c", "2") }]).await.unwrap();
    store.close().await;
    assert!(store.append(vec![new("c", "refused")]).await.is_err(), "a closed store refuses writes");
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), config).unwrap();
    let page = store.read(ch("c"), 0, 10).await.unwrap();
    assert_eq!(ids(&page.messages), [1, 2]);
    assert_eq!(page.messages[1].meta, Some(mqtt_meta()), "MQTT properties survive a restart");
    assert_eq!(ids(&store.append(vec![new("c", "3")]).await.unwrap()), [3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_keeps_broker_records_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = config(RetentionRules::default());
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), config.clone()).unwrap();
    store.put(BrokerTable::Sessions, "client".into(), Some(b"state".to_vec())).await.unwrap();
    store.close().await;
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), config).unwrap();
    assert_eq!(store.load(BrokerTable::Sessions).await.unwrap(), [("client".to_string(), b"state".to_vec())]);
}

/// A data directory written before messages had a `meta` column opens, keeps
/// its history, and stores properties from then on.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_opens_a_database_from_before_stored_properties() {
    let dir = tempfile::tempdir().unwrap();
    let old = rusqlite::Connection::open(dir.path().join("herald.db")).unwrap();
    old.execute_batch(
        "CREATE TABLE channels (cid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, head INTEGER NOT NULL);
         CREATE TABLE messages (cid INTEGER NOT NULL, id INTEGER NOT NULL, event TEXT, kind INTEGER NOT NULL,
             data BLOB NOT NULL, time INTEGER NOT NULL, PRIMARY KEY (cid, id)) WITHOUT ROWID;
         INSERT INTO channels (cid, name, head) VALUES (1, 'c', 1);
         INSERT INTO messages VALUES (1, 1, NULL, 2, CAST('old' AS BLOB), 5);",
    )
    .unwrap();
    drop(old);
    let (cfg, _, _) = config(RetentionRules::default());
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), cfg.clone()).unwrap();
    store.append(vec![NewMessage { meta: Some(mqtt_meta()), ..new("c", "new") }]).await.unwrap();
    store.close().await;
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), cfg).unwrap();
    let page = store.read(ch("c"), 0, 10).await.unwrap();
    assert_eq!(ids(&page.messages), [1, 2]);
    assert_eq!(page.messages[0].data, Data::text("old"));
    assert_eq!((page.messages[0].meta.clone(), page.messages[1].meta.clone()), (None, Some(mqtt_meta())));
}
