//! What MQTT connections share: parked persistent sessions and the live
//! connection of each client id (for takeover), retained messages, the routes
//! for topics that are not channels, and pending wills.
//!
//! Channel topics never pass through here: they are stored and fanned out by
//! the hub like any publish, and each session's Herald subscription picks them
//! up. Topics that are not valid channel names (`/a`, spaces) are routed here,
//! in memory, between MQTT clients only.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use herald_core::Meta;
use tokio::sync::{mpsc, oneshot};

use super::{session::Session, topic};

/// A message on a non-channel topic, or a retained one.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    pub(crate) meta: Arc<Meta>,
}

struct Route {
    session: u64,
    filter: String,
    tx: mpsc::Sender<Routed>,
}

/// A request from a new connection to the live one holding its client id:
/// hand over the session (or drop it when the newcomer starts clean).
pub(crate) type Kick = oneshot::Sender<Option<Session>>;

struct Live {
    conn: u64,
    kick: mpsc::Sender<Kick>,
}

#[derive(Default)]
struct Slot {
    parked: Option<Session>,
    live: Option<Live>,
}

#[derive(Default)]
pub struct Broker {
    slots: Mutex<HashMap<String, Slot>>,
    retained: Mutex<BTreeMap<Arc<str>, Routed>>,
    routes: RwLock<Vec<Route>>,
    /// Client ids with a will waiting out its delay, and the disconnect it belongs to.
    wills: Mutex<HashMap<String, u64>>,
    next_id: AtomicU64,
}

/// What a connection gets when it claims its client id.
pub(crate) enum Claim {
    /// A parked session, ready to resume.
    Parked(Session),
    /// A live connection holds the id: ask it to hand over.
    Live(mpsc::Sender<Kick>),
    None,
}

impl Broker {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `conn` as the live connection of `client_id` and returns what
    /// held the id before. Cancels a pending will of that client.
    pub(crate) fn claim(&self, client_id: &str, conn: u64, kick: mpsc::Sender<Kick>) -> Claim {
        self.wills.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(client_id.to_owned()).or_default();
        let previous = slot.live.replace(Live { conn, kick });
        match (slot.parked.take(), previous) {
            (Some(s), _) => Claim::Parked(s),
            (None, Some(live)) => Claim::Live(live.kick),
            (None, None) => Claim::None,
        }
    }

    /// The connection `conn` ends; its session is parked (`Some`) or dropped.
    /// Returns false when another connection took the id over meanwhile.
    pub(crate) fn release(&self, client_id: &str, conn: u64, session: Option<Session>) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get_mut(client_id) else { return false };
        if slot.live.as_ref().is_some_and(|l| l.conn == conn) {
            slot.live = None;
            slot.parked = session;
            if slot.parked.is_none() {
                slots.remove(client_id);
            }
            true
        } else {
            false
        }
    }

    /// Drops a parked session whose expiry came, unless it was resumed.
    pub(crate) fn expire(&self, client_id: &str, session_id: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(client_id)
            && slot.live.is_none()
            && slot.parked.as_ref().is_some_and(|s| s.id == session_id)
        {
            slots.remove(client_id);
        }
    }

    pub(crate) fn schedule_will(&self, client_id: &str, token: u64) {
        self.wills.lock().unwrap_or_else(|e| e.into_inner()).insert(client_id.to_owned(), token);
    }

    /// True (once) if the will is still due: nobody reconnected meanwhile.
    pub(crate) fn take_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.wills.lock().unwrap_or_else(|e| e.into_inner());
        if wills.get(client_id) == Some(&token) {
            wills.remove(client_id);
            true
        } else {
            false
        }
    }

    pub(crate) fn add_route(&self, session: u64, filter: &str, tx: mpsc::Sender<Routed>) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if !routes.iter().any(|r| r.session == session && r.filter == filter) {
            routes.push(Route { session, filter: filter.to_owned(), tx });
        }
    }

    pub(crate) fn remove_route(&self, session: u64, filter: &str) {
        self.routes.write().unwrap_or_else(|e| e.into_inner()).retain(|r| !(r.session == session && r.filter == filter));
    }

    pub(crate) fn remove_routes(&self, session: u64) {
        self.routes.write().unwrap_or_else(|e| e.into_inner()).retain(|r| r.session != session);
    }

    /// Delivers a non-channel message to every session with a matching
    /// filter, once per session (the session applies its own options).
    pub(crate) fn route(&self, msg: &Routed) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut sent: Vec<u64> = Vec::new();
        for r in routes.iter() {
            if !sent.contains(&r.session) && topic::matches(&r.filter, &msg.topic) {
                sent.push(r.session);
                // A full queue drops the message for that session only.
                let _ = r.tx.try_send(msg.clone());
            }
        }
    }

    /// Sets (or, with an empty payload, clears) the retained message of a topic.
    pub(crate) fn retain(&self, msg: &Routed) {
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            retained.remove(&msg.topic);
        } else {
            retained.insert(msg.topic.clone(), msg.clone());
        }
    }

    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<Routed> {
        let retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        retained.values().filter(|m| topic::matches(filter, &m.topic)).cloned().collect()
    }
}
