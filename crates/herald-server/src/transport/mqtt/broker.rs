//! What MQTT connections share: parked persistent sessions and the live
//! connection of each client id (for takeover), retained messages, the routes
//! for topics that are not channels, and pending wills. Retained messages and
//! persistent sessions are also written to the store (`persist`), and read
//! back at start.
//!
//! Channel topics never pass through here: they are stored and fanned out by
//! the hub like any publish, and each session's Herald subscription picks them
//! up. Topics that are not valid channel names (`/a`, spaces) are routed here,
//! in memory, between MQTT clients only.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use std::time::Duration;

use bytes::Bytes;
use herald_core::Queue;
use herald_core::{Channel, Filter, Meta, Principal, Since, Target};
use tokio::sync::oneshot;

use herald_store::{BrokerStore, BrokerTable, Signal, Store, StoreError};

use super::{
    persist::{self, StoredSession},
    session::Session,
    topic,
};
use crate::{
    signals,
    state::SharedState,
    subscription::{Delivery, Subscription},
};

/// A message on a non-channel topic, a retained one, or one a shared
/// subscription hands to this session.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    pub(crate) meta: Arc<Meta>,
    /// Set when delivered through a shared subscription: its granted QoS and
    /// subscription id, which the session's own filters do not know.
    pub(crate) shared: Option<(u8, Option<u32>)>,
}

/// One session's membership of a shared subscription.
pub(crate) struct Member {
    pub(crate) session: u64,
    pub(crate) tx: Arc<Queue<Routed>>,
    pub(crate) qos: u8,
    pub(crate) sub_id: Option<u32>,
    pub(crate) principal: Arc<Principal>,
}

/// `$share/{group}/{filter}`: each message goes to one member, in turn.
struct SharedGroup {
    members: Vec<Member>,
    next: usize,
    /// The task feeding channel messages to the group, when the filter is a
    /// channel filter.
    feeder: Option<tokio::task::AbortHandle>,
}

struct Route {
    session: u64,
    filter: String,
    tx: Arc<Queue<Routed>>,
}

/// A request from a new connection to the live one holding its client id:
/// hand over the session (or drop it when the newcomer starts clean).
pub(crate) struct Kick {
    pub(crate) reply: oneshot::Sender<Option<Session>>,
    /// The newcomer's Clean Start: whether the session goes on, which
    /// decides the old connection's will (MQTT 5, 3.1.3.2.2).
    pub(crate) clean_start: bool,
}

struct Live {
    conn: u64,
    /// A oneshot: a connection is taken over at most once.
    kick: oneshot::Sender<Kick>,
}

#[derive(Default)]
struct Slot {
    /// Boxed: the map holds a slot per connected client, and a session
    /// inline would make every slot the size of one.
    parked: Option<Box<Session>>,
    /// The connection that parked it: an expiry timer set then ends it only
    /// if it was not resumed and parked again since.
    parked_by: u64,
    live: Option<Live>,
}

/// A delayed will as registered: what fires when it must go at once, and its
/// token (to ask, when the delay is over, whether it is still due).
pub(crate) type RegisteredWill = (Arc<tokio::sync::Notify>, u64);

/// A will waiting out its delay: the disconnect it belongs to, and how to
/// tell its task to publish at once (the session ended early).
struct PendingWill {
    token: u64,
    now: Arc<tokio::sync::Notify>,
}

pub struct Broker {
    store: Arc<dyn BrokerStore>,
    /// Persistent sessions read back at start, until their client returns
    /// (or they expire).
    stored: Mutex<HashMap<String, StoredSession>>,
    /// When this process started: a session stored while connected counts
    /// as parked from then.
    started_ms: i64,
    slots: Mutex<HashMap<String, Slot>>,
    /// Retained messages by topic, each with the version of the write that
    /// set it (over Redis, the feed sequence of its announcement; 0 on one
    /// node). Over Redis a cleared topic keeps its version without a
    /// message, so that an older write announced late cannot bring it back.
    retained: Mutex<BTreeMap<Arc<str>, (u64, Option<Routed>)>>,
    /// Topics with a retained write under way, each with its turn: one write
    /// per topic at a time, so memory and the store end on the same message.
    retaining: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    routes: RwLock<Vec<Route>>,
    /// Client ids with a will waiting out its delay, and the disconnect it belongs to.
    wills: Mutex<HashMap<String, PendingWill>>,
    /// Shared subscriptions by (group, filter).
    shared: Mutex<HashMap<(String, String), SharedGroup>>,
    next_id: SessionIds,
    /// Set when other nodes share the MQTT state (Redis).
    cluster: OnceLock<Cluster>,
    /// Client ids this node claimed from another, waiting for it to let go.
    handovers: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
}

/// How this broker reaches the other nodes.
struct Cluster {
    store: Arc<dyn Store>,
    node: String,
}

/// Longest wait for another node to hand over a session it has connected.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// A signal body's leading node name (up to a newline) and the rest.
fn split_node(body: &[u8]) -> (&str, &[u8]) {
    match body.iter().position(|b| *b == b'\n') {
        Some(i) => (std::str::from_utf8(&body[..i]).unwrap_or(""), &body[i + 1..]),
        None => (std::str::from_utf8(body).unwrap_or(""), &[]),
    }
}

/// Session ids, unique across restarts too: a stored message's `Meta::origin`
/// (for no-local) must never match a session of a later process. Seeded with
/// the start time in the high bits, so a later start begins past every id an
/// earlier one handed out unless it gave out a million per millisecond of uptime.
struct SessionIds(AtomicU64);

impl Default for SessionIds {
    fn default() -> Self {
        let now_ms = u64::try_from(herald_store::now_ms()).unwrap_or(0);
        SessionIds(AtomicU64::new(now_ms << 20))
    }
}

/// What [`Broker::counts`] reports.
#[derive(Debug, Clone, Copy)]
pub struct MqttCounts {
    /// Sessions with a connection.
    pub live: usize,
    /// Persistent sessions waiting for their client.
    pub parked: usize,
    pub retained: usize,
    /// Outbound QoS 1, outbound QoS 2, inbound QoS 2 awaiting PUBREL.
    pub inflight: [i64; 3],
}

/// What a connection gets when it claims its client id.
pub(crate) enum Claim {
    /// A parked session, ready to resume.
    Parked(Box<Session>),
    /// A live connection holds the id: ask it to hand over.
    Live(oneshot::Sender<Kick>),
    None,
}

impl Broker {
    pub fn new(store: Arc<dyn BrokerStore>) -> Self {
        Broker {
            store,
            stored: Mutex::default(),
            started_ms: herald_store::now_ms(),
            slots: Mutex::default(),
            retained: Mutex::default(),
            retaining: Mutex::default(),
            routes: RwLock::default(),
            wills: Mutex::default(),
            shared: Mutex::default(),
            next_id: SessionIds::default(),
            cluster: OnceLock::new(),
            handovers: Mutex::default(),
        }
    }

    /// Reads back the retained messages and persistent sessions of earlier
    /// runs. Records this version cannot read, and expired sessions, are
    /// dropped (and logged). A session that was connected when the process
    /// stopped counts as parked from this start (its record says so from
    /// now on), and each waits for its client until it expires.
    pub async fn restore(self: &Arc<Self>) -> Result<(), StoreError> {
        let retained = self.load_retained().await?;
        if self.store.is_shared() {
            // Sessions are read when their client connects (`take_stored`).
            self.retained.lock().unwrap_or_else(|e| e.into_inner()).extend(retained);
            return Ok(());
        }
        let now = herald_store::now_ms();
        let mut sessions = HashMap::new();
        let mut expired = Vec::new();
        for (client_id, bytes) in self.store.load(BrokerTable::Sessions).await? {
            match StoredSession::decode(&bytes) {
                Some(mut s) if !s.expired(now, self.started_ms) => {
                    if s.parked_at.is_none() {
                        s.parked_at = Some(self.started_ms);
                        self.store.put(BrokerTable::Sessions, client_id.clone(), Some(s.encode())).await?;
                    }
                    sessions.insert(client_id, s);
                }
                _ => expired.push(client_id),
            }
        }
        for client_id in expired {
            self.store.put(BrokerTable::Sessions, client_id, None).await?;
        }
        for (client_id, s) in &sessions {
            let Some(due) = s.expires_at(self.started_ms) else { continue };
            let wait = Duration::from_millis(due.saturating_sub(now).max(0) as u64);
            let (broker, client_id, id) = (self.clone(), client_id.clone(), s.id);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                // Still waiting for its client (not taken by a connection)?
                let gone = {
                    let mut stored = broker.stored.lock().unwrap_or_else(|e| e.into_inner());
                    let waiting = stored.get(&client_id).is_some_and(|s| s.id == id);
                    waiting && stored.remove(&client_id).is_some()
                };
                if gone {
                    let _ = broker.forget_session(&client_id).await;
                }
            });
        }
        tracing::debug!(retained = retained.len(), sessions = sessions.len(), "MQTT state restored");
        self.retained.lock().unwrap_or_else(|e| e.into_inner()).extend(retained);
        *self.stored.lock().unwrap_or_else(|e| e.into_inner()) = sessions;
        Ok(())
    }

    async fn load_retained(&self) -> Result<BTreeMap<Arc<str>, (u64, Option<Routed>)>, StoreError> {
        let mut retained = BTreeMap::new();
        for (topic, bytes) in self.store.load(BrokerTable::Retained).await? {
            match persist::decode_retained(&topic, &bytes) {
                Some(r) => drop(retained.insert(r.topic.clone(), (0, Some(r)))),
                None => tracing::warn!(topic, "a retained message in an unknown format was skipped"),
            }
        }
        Ok(retained)
    }

    /// Sets a topic's retained message in memory, unless a later write (a
    /// higher version) is already there.
    fn set_retained(&self, topic: Arc<str>, version: u64, msg: Option<Routed>) {
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if retained.get(&topic).is_some_and(|(v, _)| *v > version) {
            return;
        }
        if msg.is_none() && !self.store.is_shared() {
            retained.remove(&topic);
        } else {
            retained.insert(topic, (version, msg));
        }
    }

    /// A broker record written by this node or another (over Redis every
    /// node hears of each): retained messages are kept in memory here.
    pub(crate) fn record_changed(&self, key: &str, body: &[u8], version: u64) {
        let Some(topic) = key.strip_prefix("r/") else { return };
        let msg = if body.is_empty() { None } else { persist::decode_retained(topic, body) };
        self.set_retained(topic.into(), version, msg);
    }

    /// Shares this broker's MQTT state with other nodes (Redis): claims of
    /// client ids and messages on non-channel topics go out as signals.
    pub(crate) fn join_cluster(&self, store: Arc<dyn Store>, node: String) {
        let _ = self.cluster.set(Cluster { store, node });
    }

    /// Sends a signal to the other nodes, in the background (a signal that
    /// does not get out is logged; what it was about is stored).
    fn tell(&self, kind: u8, key: &str, body: Vec<u8>) {
        let Some(c) = self.cluster.get() else { return };
        let (store, signal) = (c.store.clone(), Signal::new(kind, key, Bytes::from(body)));
        tokio::spawn(async move {
            if let Err(e) = store.signal(signal).await {
                tracing::warn!(error = %e, "could not tell the other nodes of an MQTT change");
            }
        });
    }

    /// A signal about MQTT from this node or another (see `signals.rs`).
    pub(crate) fn signaled(self: &Arc<Self>, signal: &Signal) {
        let Some(c) = self.cluster.get() else { return };
        let (node, rest) = split_node(&signal.body);
        match signal.kind {
            signals::MQTT_CLAIM if node != c.node => self.remote_claim(&signal.key, node, rest == b"1"),
            signals::MQTT_RELEASED if node == c.node => {
                let waiting = self.handovers.lock().unwrap_or_else(|e| e.into_inner()).remove(&signal.key);
                for tx in waiting.into_iter().flatten() {
                    let _ = tx.send(());
                }
            }
            signals::MQTT_ROUTED if node != c.node => {
                if let Some(msg) = persist::decode_retained(&signal.key, rest) {
                    self.route_here(&msg);
                }
            }
            _ => {}
        }
    }

    /// Another node's connection claimed `client_id`: whatever holds it
    /// here lets it go. A live connection is taken over (told so, its will
    /// handled as for a takeover here) and its session's record written
    /// with its last cursors; a parked session is dropped (its record was
    /// written as it parked); a delayed will is cancelled, or sent at once
    /// if the newcomer starts clean. Then the claiming node is told.
    fn remote_claim(self: &Arc<Self>, client_id: &str, claimer: &str, clean_start: bool) {
        let (live, parked) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let pending = self.wills.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
            if clean_start && let Some(w) = pending {
                w.now.notify_one();
            }
            match slots.remove(client_id) {
                Some(slot) => (slot.live, slot.parked),
                None => (None, None),
            }
        };
        tracing::debug!(
            client_id,
            claimer,
            live = live.is_some(),
            parked = parked.is_some(),
            "client id claimed on another node"
        );
        let (broker, client_id, claimer) = (self.clone(), client_id.to_owned(), claimer.to_owned());
        tokio::spawn(async move {
            let session = match live {
                Some(live) => {
                    let (tx, rx) = oneshot::channel();
                    let _ = live.kick.send(Kick { reply: tx, clean_start });
                    tokio::time::timeout(Duration::from_secs(2), rx).await.ok().and_then(Result::ok).flatten()
                }
                None => parked.map(|s| *s),
            };
            if let Some(session) = session {
                if session.expiry > 0 && !clean_start {
                    let saved = broker.save_session(&client_id, &session, Some(herald_store::now_ms())).await;
                    if let Err(e) = saved {
                        tracing::warn!(error = %e, client_id, "could not store a session taken over by another node");
                    }
                }
                broker.end_session(session.id);
            }
            broker.tell(signals::MQTT_RELEASED, &client_id, claimer.into_bytes());
        });
    }

    /// Over Redis, a connection claiming `client_id` that this node did not
    /// hold: tells every node, and when the stored record says another node
    /// has it connected, waits (a moment at most: that node may be gone)
    /// until it has handed it over and written its last cursors.
    async fn claim_elsewhere(&self, client_id: &str, clean_start: bool) -> Result<(), StoreError> {
        let Some(c) = self.cluster.get() else { return Ok(()) };
        let before = self.store.get(BrokerTable::Sessions, client_id.to_owned()).await?;
        let connected = before.as_deref().and_then(StoredSession::decode).is_some_and(|s| s.parked_at.is_none());
        let (tx, rx) = oneshot::channel();
        if connected {
            self.handovers.lock().unwrap_or_else(|e| e.into_inner()).entry(client_id.to_owned()).or_default().push(tx);
        }
        let mut body = format!("{}\n", c.node).into_bytes();
        body.push(if clean_start { b'1' } else { b'0' });
        c.store.signal(Signal::new(signals::MQTT_CLAIM, client_id, Bytes::from(body))).await?;
        if connected && tokio::time::timeout(HANDOVER_WAIT, rx).await.is_err() {
            tracing::debug!(client_id, "no node handed the session over; resuming from its record");
            self.handovers.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
        }
        Ok(())
    }

    /// Signals may have been lost: reads the retained messages back.
    pub(crate) fn resync(self: &Arc<Self>) {
        let broker = self.clone();
        tokio::spawn(async move {
            match broker.load_retained().await {
                Ok(loaded) => {
                    for (topic, (_, msg)) in loaded {
                        let version =
                            broker.retained.lock().unwrap_or_else(|e| e.into_inner()).get(&topic).map_or(0, |e| e.0);
                        broker.set_retained(topic, version, msg);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read retained messages back after a feed resync"),
            }
        });
    }

    /// Sessions, retained messages and messages in flight right now, for
    /// `/metrics` and `/api/stats` (read when asked: a lock or two per scrape,
    /// nothing on any MQTT path).
    pub fn counts(&self) -> MqttCounts {
        let (live, mut parked) = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .values()
                .fold((0, 0), |(l, p), s| (l + usize::from(s.live.is_some()), p + usize::from(s.parked.is_some())))
        };
        // Sessions of an earlier run wait for their client, parked too.
        parked += self.stored.lock().unwrap_or_else(|e| e.into_inner()).len();
        // A deleted one stays as a tombstone (its version) when shared.
        let retained =
            self.retained.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|(_, m)| m.is_some()).count();
        MqttCounts { live, parked, retained, inflight: super::session::in_flight() }
    }

    /// The stored session of `client_id` from an earlier run; taken, as the
    /// connection that asks resumes or replaces it. One that expired is
    /// deleted (a timer does that too, within the moment).
    pub(crate) async fn take_stored(
        &self,
        client_id: &str,
        clean_start: bool,
    ) -> Result<Option<StoredSession>, StoreError> {
        if self.store.is_shared() {
            // Over Redis, sessions are not held from the start: the record
            // is read now, once any node that holds the id has let it go.
            self.claim_elsewhere(client_id, clean_start).await?;
            let record = self.store.get(BrokerTable::Sessions, client_id.to_owned()).await?;
            return match record.as_deref().and_then(StoredSession::decode) {
                Some(s) if s.expired(herald_store::now_ms(), self.started_ms) => {
                    self.forget_session(client_id).await?;
                    Ok(None)
                }
                other => Ok(other),
            };
        }
        let taken = self.stored.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
        match taken {
            Some(s) if s.expired(herald_store::now_ms(), self.started_ms) => {
                self.forget_session(client_id).await?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// Puts back a stored session a connection took and could not resume
    /// (a store error): the next attempt finds it again.
    pub(crate) fn put_back_stored(&self, client_id: &str, s: StoredSession) {
        if self.store.is_shared() {
            return; // the record is still in the store
        }
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).insert(client_id.to_owned(), s);
    }

    /// Writes a persistent session's record (its connection ended at
    /// `parked_at`, or it is connected: `None`).
    pub(crate) async fn save_session(
        &self,
        client_id: &str,
        session: &Session,
        parked_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let record = StoredSession::of(session, parked_at).encode();
        self.store.put(BrokerTable::Sessions, client_id.to_owned(), Some(record)).await.map(drop)
    }

    /// Deletes a session's record.
    pub(crate) async fn forget_session(&self, client_id: &str) -> Result<(), StoreError> {
        self.store.put(BrokerTable::Sessions, client_id.to_owned(), None).await.map(drop)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `conn` as the live connection of `client_id` and returns what
    /// held the id before. Cancels a pending will of that client.
    pub(crate) fn claim(&self, client_id: &str, conn: u64, kick: oneshot::Sender<Kick>, clean_start: bool) -> Claim {
        // A client that comes back before its will's delay ran out cancels
        // the will, unless it starts clean: its old session ends now, and
        // the will goes at once (MQTT 5, 3.1.3.2.2; its task publishes when
        // told, without asking again). Either way it is no longer pending.
        // Slots, then wills, as in `release`: a will registered as its
        // session parks is seen here whole, or not yet parked at all.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        {
            let pending = self.wills.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
            if clean_start && let Some(w) = pending {
                w.now.notify_one();
            }
        }
        let slot = slots.entry(client_id.to_owned()).or_default();
        let previous = slot.live.replace(Live { conn, kick });
        match (slot.parked.take(), previous) {
            (Some(s), _) => Claim::Parked(s),
            (None, Some(live)) => Claim::Live(live.kick),
            (None, None) => Claim::None,
        }
    }

    /// The connection `conn` ends; its session is parked (`Some`) or dropped.
    /// When another connection claimed the id meanwhile, the session comes
    /// back: that connection waits for it (a kick is on its way).
    ///
    /// `will`: the token of a will that waits out a delay, registered in the
    /// same step and returned with what fires when it must go at once, so a
    /// client that reconnects at once either finds it and cancels it, or
    /// claims before this release, which then fails.
    pub(crate) fn release(
        &self,
        client_id: &str,
        conn: u64,
        session: Option<Box<Session>>,
        will: Option<u64>,
    ) -> Result<Option<RegisteredWill>, Option<Box<Session>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get_mut(client_id) else { return Err(session) };
        if slot.live.as_ref().is_some_and(|l| l.conn == conn) {
            slot.live = None;
            slot.parked = session;
            slot.parked_by = conn;
            if slot.parked.is_none() {
                slots.remove(client_id);
            }
            Ok(will.map(|token| (self.schedule_will(client_id, token), token)))
        } else {
            Err(session)
        }
    }

    /// Drops the session connection `conn` parked, when its expiry came,
    /// unless it was resumed (and perhaps parked again) since; true if it
    /// was dropped.
    pub(crate) fn expire(&self, client_id: &str, conn: u64) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(client_id)
            && slot.live.is_none()
            && slot.parked.is_some()
            && slot.parked_by == conn
        {
            slots.remove(client_id);
            return true;
        }
        false
    }

    /// Registers a will that waits `token`'s delay; what is returned fires
    /// when it must go at once.
    pub(crate) fn schedule_will(&self, client_id: &str, token: u64) -> Arc<tokio::sync::Notify> {
        let now = Arc::new(tokio::sync::Notify::new());
        let will = PendingWill { token, now: now.clone() };
        self.wills.lock().unwrap_or_else(|e| e.into_inner()).insert(client_id.to_owned(), will);
        now
    }

    /// True (once) if the will is still due: nobody reconnected meanwhile.
    pub(crate) fn take_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.wills.lock().unwrap_or_else(|e| e.into_inner());
        if wills.get(client_id).is_some_and(|w| w.token == token) {
            wills.remove(client_id);
            true
        } else {
            false
        }
    }

    pub(crate) fn add_route(&self, session: u64, filter: &str, tx: Arc<Queue<Routed>>) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if !routes.iter().any(|r| r.session == session && r.filter == filter) {
            routes.push(Route { session, filter: filter.to_owned(), tx });
        }
    }

    pub(crate) fn remove_route(&self, session: u64, filter: &str) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| !(r.session == session && r.filter == filter));
    }

    /// A session ends: its routes and its places in shared groups go.
    pub(crate) fn end_session(&self, session: u64) {
        self.routes.write().unwrap_or_else(|e| e.into_inner()).retain(|r| r.session != session);
        self.leave_all_shared(session);
    }

    /// Adds a member to a shared subscription; the first member starts the
    /// feeder that takes the filter's channel messages from the hub.
    pub(crate) fn join_shared(&self, state: &SharedState, group: &str, filter: &str, member: Member) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let key = (group.to_owned(), filter.to_owned());
        let g = shared.entry(key.clone()).or_insert_with(|| SharedGroup { members: Vec::new(), next: 0, feeder: None });
        g.members.retain(|m| m.session != member.session);
        g.members.push(member);
        if g.feeder.is_none()
            && let Ok(f) = Filter::parse(filter)
        {
            let state = state.clone();
            let task = tokio::spawn(async move {
                let cx = state.context(Arc::new(Principal::Admin), true);
                let Ok(mut sub) =
                    Subscription::open(cx, vec![Target::from_filter(f)], Since::Now, &Default::default()).await
                else {
                    return;
                };
                loop {
                    let d = tokio::select! {
                        _ = state.shutdown.cancelled() => return,
                        d = sub.next() => d,
                    };
                    match d {
                        Ok(Delivery::Message(m)) => {
                            let meta =
                                m.meta.clone().unwrap_or_else(|| Arc::new(Meta { qos: 1, ..Default::default() }));
                            let routed = Routed {
                                topic: m.channel.as_str().into(),
                                payload: m.data.bytes().clone(),
                                meta,
                                shared: None,
                            };
                            state.mqtt.deliver_shared(&key, &routed, Some(&m.channel));
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            g.feeder = Some(task.abort_handle());
        }
    }

    pub(crate) fn leave_shared(&self, group: &str, filter: &str, session: u64) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let key = (group.to_owned(), filter.to_owned());
        if let Some(g) = shared.get_mut(&key) {
            g.members.retain(|m| m.session != session);
            if g.members.is_empty() {
                if let Some(f) = g.feeder.take() {
                    f.abort();
                }
                shared.remove(&key);
            }
        }
    }

    fn leave_all_shared(&self, session: u64) {
        let keys: Vec<(String, String)> = {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared
                .iter()
                .filter(|(_, g)| g.members.iter().any(|m| m.session == session))
                .map(|(k, _)| k.clone())
                .collect()
        };
        for (g, f) in keys {
            self.leave_shared(&g, &f, session);
        }
    }

    /// Hands a message to the next member of a shared group who may read it.
    fn deliver_shared(&self, key: &(String, String), msg: &Routed, channel: Option<&Channel>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = shared.get_mut(key) else { return };
        let n = g.members.len();
        for i in 0..n {
            let idx = (g.next + i) % n;
            let m = &g.members[idx];
            if channel.is_some_and(|c| !m.principal.may_read(c)) {
                continue;
            }
            let mut routed = msg.clone();
            routed.shared = Some((m.qos, m.sub_id));
            if m.tx.push(routed).is_ok() {
                g.next = idx + 1;
                return;
            }
        }
    }

    /// Delivers a non-channel message to every session with a matching
    /// filter, once per session (the session applies its own options), and
    /// to one member of each matching shared subscription.
    pub(crate) fn route(&self, msg: &Routed) {
        if let Some(c) = self.cluster.get() {
            // The other nodes' sessions too (they hear this node's own
            // signal and skip it).
            let mut body = format!("{}\n", c.node).into_bytes();
            body.extend(persist::encode_retained(msg));
            self.tell(signals::MQTT_ROUTED, &msg.topic, body);
        }
        self.route_here(msg);
    }

    /// [`Self::route`] to this node's sessions alone.
    fn route_here(&self, msg: &Routed) {
        let groups: Vec<(String, String)> = {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.keys().filter(|(_, f)| topic::matches(f, &msg.topic)).cloned().collect()
        };
        for key in groups {
            self.deliver_shared(&key, msg, None);
        }
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut sent: Vec<u64> = Vec::new();
        for r in routes.iter() {
            if !sent.contains(&r.session) && topic::matches(&r.filter, &msg.topic) {
                sent.push(r.session);
                // A full queue drops the message for that session only.
                let _ = r.tx.push(msg.clone());
            }
        }
    }

    /// Sets (or, with an empty payload, clears) the retained message of a
    /// topic, in the store first: it resolves once the change is durable.
    /// Writes to one topic take turns: two at once could otherwise reach the
    /// store in one order and memory in the other. The write runs on a task
    /// of its own that holds the topic's turn to the end, so a caller that
    /// stops waiting cannot let the next write overtake it.
    pub(crate) async fn retain(self: &Arc<Self>, msg: &Routed) -> Result<(), StoreError> {
        let turn =
            self.retaining.lock().unwrap_or_else(|e| e.into_inner()).entry(msg.topic.clone()).or_default().clone();
        let (broker, msg) = (self.clone(), msg.clone());
        let write = tokio::spawn(async move {
            let written = {
                let _turn = turn.clone().lock_owned().await;
                let record = (!msg.payload.is_empty()).then(|| persist::encode_retained(&msg));
                let written = broker.store.put(BrokerTable::Retained, msg.topic.to_string(), record).await;
                if let Ok(version) = written {
                    let kept = (!msg.payload.is_empty()).then(|| msg.clone());
                    broker.set_retained(msg.topic.clone(), version, kept);
                }
                written.map(drop)
            };
            // The last one out forgets the topic's turn: held by the map and
            // by this task alone, nobody else waits for it.
            let mut retaining = broker.retaining.lock().unwrap_or_else(|e| e.into_inner());
            if Arc::strong_count(&turn) == 2 {
                retaining.remove(&msg.topic);
            }
            written
        });
        write.await.map_err(|e| StoreError::Backend(e.to_string()))?
    }

    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<Routed> {
        let retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        retained
            .values()
            .filter_map(|(_, m)| m.as_ref())
            .filter(|m| topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use herald_core::hub::Hub;
    use herald_store::{MemoryStore, SqliteOptions, SqliteStore, StoreConfig};

    use super::*;

    fn broker() -> Broker {
        let config = StoreConfig { retention: Default::default(), clock: Arc::new(|| 0), sink: Hub::new(8) };
        Broker::new(Arc::new(MemoryStore::new(config)))
    }

    fn claim(b: &Broker, conn: u64, clean_start: bool) -> Claim {
        b.claim("c", conn, oneshot::channel().0, clean_start)
    }

    #[test]
    fn a_client_back_after_its_connection_parked_cancels_the_delayed_will() {
        let b = broker();
        claim(&b, 1, false);
        let registered = b.release("c", 1, None, Some(7));
        assert!(matches!(registered, Ok(Some(_))), "the will is registered as the connection lets go");
        claim(&b, 2, false);
        assert!(!b.take_will("c", 7), "the reconnect cancelled it");
    }

    #[test]
    fn a_client_back_before_its_connection_parked_leaves_no_will_behind() {
        let b = broker();
        claim(&b, 1, false);
        claim(&b, 2, false);
        assert!(b.release("c", 1, None, Some(7)).is_err(), "the id is the newcomer's");
        assert!(!b.take_will("c", 7), "nothing was registered");
    }

    #[tokio::test]
    async fn a_clean_start_sends_the_delayed_will_at_once() {
        let b = broker();
        claim(&b, 1, false);
        let Ok(Some((now, 7))) = b.release("c", 1, None, Some(7)) else { panic!("its own id: released") };
        claim(&b, 2, true);
        now.notified().await;
        // No longer pending: nothing the newcomer does next (ending with a
        // delayed will of its own, a reconnect) can take it back.
        assert!(b.release("c", 2, None, Some(8)).is_ok());
        claim(&b, 3, false);
        assert!(!b.take_will("c", 7), "told to go, not pending");
    }

    /// Retained publishes to one topic at the same moment: whichever ends
    /// last is the retained message, in memory and in the store alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_retained_publishes_leave_memory_and_store_agreeing() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { retention: Default::default(), clock: Arc::new(|| 0), sink: Hub::new(8) };
        let b = Arc::new(Broker::new(Arc::new(SqliteStore::open(SqliteOptions::new(dir.path()), config).unwrap())));
        for round in 0..20 {
            let writers: Vec<_> = (0..16)
                .map(|i| {
                    let b = b.clone();
                    tokio::spawn(async move {
                        let payload = Bytes::from(format!("{round}-{i}"));
                        let msg = Routed { topic: "t".into(), payload, meta: Default::default(), shared: None };
                        b.retain(&msg).await.unwrap();
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            let in_memory = b.retained_matching("t").pop().unwrap().payload;
            let stored = b.store.load(BrokerTable::Retained).await.unwrap();
            let stored = persist::decode_retained(&stored[0].0, &stored[0].1).unwrap().payload;
            assert_eq!(in_memory, stored, "round {round}");
        }
    }
}
