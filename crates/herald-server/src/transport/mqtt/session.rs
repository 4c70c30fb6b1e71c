//! One client's MQTT session: its subscriptions and their options, the
//! messages in flight each way, and its Herald subscription. A session outlives
//! its connection when the client asked for persistence: parked in the broker,
//! its Herald subscription keeps its cursors (and, bounded, its mailbox), so a
//! returning client gets everything it missed on channel topics from the
//! history; non-channel topics wait in a bounded queue.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use bytes::Bytes;
use herald_core::{Message, Meta, Principal, Queue, VecMap};

use super::{broker::Routed, connection::UNREAD_PREFIX};
use crate::subscription::{Delivery, Subscription};

/// Options of one subscription (MQTT 5 names; MQTT 3 uses defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubOpts {
    pub(crate) qos: u8,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    pub(crate) sub_id: Option<u32>,
}

/// A message on its way to the client.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) meta: Option<Arc<Meta>>,
    pub(crate) sub_ids: Vec<u32>,
    /// QoS 2 only: PUBREC received and PUBREL sent; waiting for PUBCOMP.
    pub(crate) released: bool,
    /// The message's id in its channel (channel topics only): a stored
    /// session resumes before the oldest one not yet acknowledged.
    pub(crate) id: Option<u64>,
}

pub(crate) struct Session {
    /// Unique per session: the origin mark for no-local.
    pub(crate) id: u64,
    /// By filter. Most devices hold one or two: a `VecMap`, not a `BTreeMap`
    /// (whose first node is 408 bytes).
    pub(crate) subs: VecMap<String, SubOpts>,
    pub(crate) herald: Subscription,
    /// Messages the broker routes here (bounded by the offline queue length).
    pub(crate) routed: Arc<Queue<Routed>>,
    /// Sent, not yet acknowledged, by packet id.
    pub(crate) inflight: InFlight,
    /// Ready to send when the in-flight window allows.
    pub(crate) queue: VecDeque<Outgoing>,
    /// Inbound QoS 2 packet ids we answered with PUBREC, awaiting PUBREL
    /// (a sorted vector: at most our receive maximum, 24 bytes empty).
    pub(crate) awaiting_rel: AwaitingRelease,
    next_pid: u16,
    /// Seconds the session outlives its connection (0: not at all).
    pub(crate) expiry: u32,
    pub(crate) principal: Arc<Principal>,
    /// The store holds a record of it (see `persist`): forget it when the
    /// session ends.
    pub(crate) stored: bool,
}

impl Session {
    pub(crate) fn new(id: u64, herald: Subscription, queue_len: usize, principal: Arc<Principal>) -> Self {
        Session {
            id,
            subs: VecMap::default(),
            herald,
            routed: Arc::new(Queue::new(queue_len)),
            inflight: InFlight::default(),
            queue: VecDeque::new(),
            awaiting_rel: AwaitingRelease::default(),
            next_pid: 0,
            expiry: 0,
            principal,
            stored: false,
        }
    }

    /// A packet id not in flight.
    pub(crate) fn next_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pid) {
                return self.next_pid;
            }
        }
    }

    /// The subscriptions matching `topic` decide whether and how a message is
    /// sent: once, at the highest QoS granted, with every subscription id.
    pub(crate) fn outgoing(
        &self,
        topic: &str,
        payload: Bytes,
        msg_qos: u8,
        meta: Option<Arc<Meta>>,
        now_ms: i64,
    ) -> Option<Outgoing> {
        if meta.as_ref().and_then(|m| m.expires_at).is_some_and(|at| at <= now_ms) {
            return None;
        }
        let origin = meta.as_ref().and_then(|m| m.origin);
        let mut qos = None::<u8>;
        let mut retain = false;
        let mut sub_ids = Vec::new();
        for (filter, opts) in self.subs.iter() {
            if !super::topic::matches(filter, topic) || (opts.no_local && origin == Some(self.id)) {
                continue;
            }
            qos = Some(qos.map_or(opts.qos, |q| q.max(opts.qos)));
            retain |= opts.retain_as_published && meta.as_ref().is_some_and(|m| m.retain);
            sub_ids.extend(opts.sub_id);
        }
        let qos = qos?.min(msg_qos);
        Some(Outgoing { topic: topic.into(), payload, qos, retain, meta, sub_ids, released: false, id: None })
    }

    /// A routed message (non-channel topic, or handed over by a shared
    /// subscription) as an MQTT message for this session.
    pub(crate) fn routed_outgoing(&self, r: &super::broker::Routed, now_ms: i64) -> Option<Outgoing> {
        match r.shared {
            Some((qos, sub_id)) => {
                if r.meta.expires_at.is_some_and(|at| at <= now_ms) {
                    return None;
                }
                Some(Outgoing {
                    topic: r.topic.clone(),
                    payload: r.payload.clone(),
                    qos: qos.min(r.meta.qos),
                    retain: false,
                    meta: Some(r.meta.clone()),
                    sub_ids: sub_id.into_iter().collect(),
                    released: false,
                    id: None,
                })
            }
            None => self.outgoing(&r.topic, r.payload.clone(), r.meta.qos, Some(r.meta.clone()), now_ms),
        }
    }

    /// A committed Herald message as an MQTT message for this session.
    pub(crate) fn message_outgoing(&self, m: &Message, now_ms: i64) -> Option<Outgoing> {
        let qos = m.meta.as_ref().map_or(1, |meta| meta.qos);
        let o = self.outgoing(m.channel.as_str(), m.data.bytes().clone(), qos, m.meta.clone(), now_ms)?;
        Some(Outgoing { id: Some(m.id), ..o })
    }

    /// Queues what a delivery from the Herald subscription means here: a
    /// message for the filters it matches, an unread count on every
    /// `$herald/unread/{user}` subscription, and nothing for a gap (MQTT has
    /// no way to say one; a resumed session's history read covers it).
    pub(crate) fn queue_delivery(&mut self, d: Delivery, now_ms: i64) {
        match d {
            Delivery::Message(m) => {
                if let Some(o) = self.message_outgoing(&m, now_ms) {
                    self.queue.push_back(o);
                }
            }
            Delivery::Unread(n) => {
                let counts = self.subs.iter().filter(|(f, _)| f.starts_with(UNREAD_PREFIX)).map(|(f, o)| Outgoing {
                    topic: f.as_str().into(),
                    payload: Bytes::from(format!("{{\"count\":{n}}}")),
                    qos: o.qos,
                    retain: false,
                    meta: None,
                    sub_ids: o.sub_id.into_iter().collect(),
                    released: false,
                    id: None,
                });
                self.queue.extend(counts);
            }
            Delivery::Gap(_) => {}
        }
    }
}

/// Messages in flight over every MQTT session of this process, for
/// `/metrics` and `/api/stats`: outbound QoS 1, outbound QoS 2, inbound QoS 2
/// awaiting PUBREL. Kept by [`InFlight`] and [`AwaitingRelease`] as entries
/// come and go (a session's are subtracted when it is dropped), so reading
/// them never walks the sessions, and a session holds nothing more for it.
static IN_FLIGHT: [AtomicI64; 3] = [const { AtomicI64::new(0) }; 3];

/// The gauges above: (outbound QoS 1, outbound QoS 2, inbound QoS 2).
pub(crate) fn in_flight() -> [i64; 3] {
    IN_FLIGHT.each_ref().map(|g| g.load(Ordering::Relaxed))
}

fn in_flight_gauge(qos: u8) -> &'static AtomicI64 {
    &IN_FLIGHT[usize::from(qos >= 2)]
}

/// A session's outbound messages awaiting acknowledgement, by packet id,
/// counted in the process-wide gauges.
#[derive(Default)]
pub(crate) struct InFlight(BTreeMap<u16, Outgoing>);

impl InFlight {
    pub(crate) fn insert(&mut self, pid: u16, o: Outgoing) {
        in_flight_gauge(o.qos).fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.0.insert(pid, o) {
            in_flight_gauge(old.qos).fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn remove(&mut self, pid: &u16) -> Option<Outgoing> {
        let o = self.0.remove(pid)?;
        in_flight_gauge(o.qos).fetch_sub(1, Ordering::Relaxed);
        Some(o)
    }

    pub(crate) fn get_mut(&mut self, pid: &u16) -> Option<&mut Outgoing> {
        self.0.get_mut(pid)
    }

    pub(crate) fn contains_key(&self, pid: &u16) -> bool {
        self.0.contains_key(pid)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u16, &Outgoing)> {
        self.0.iter()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Outgoing> {
        self.0.values()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for o in self.0.values() {
            in_flight_gauge(o.qos).fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Inbound QoS 2 packet ids answered with PUBREC, awaiting PUBREL (a sorted
/// vector: at most our receive maximum, 24 bytes empty), counted in the
/// process-wide gauge.
#[derive(Default)]
pub(crate) struct AwaitingRelease(VecMap<u16, ()>);

impl AwaitingRelease {
    pub(crate) fn insert(&mut self, pid: u16) {
        if self.0.insert(pid, ()).is_none() {
            IN_FLIGHT[2].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `pid` was awaited.
    pub(crate) fn remove(&mut self, pid: &u16) -> bool {
        let known = self.0.remove(pid).is_some();
        if known {
            IN_FLIGHT[2].fetch_sub(1, Ordering::Relaxed);
        }
        known
    }

    pub(crate) fn contains_key(&self, pid: &u16) -> bool {
        self.0.contains_key(pid)
    }
}

impl Drop for AwaitingRelease {
    fn drop(&mut self) {
        IN_FLIGHT[2].fetch_sub(self.0.len() as i64, Ordering::Relaxed);
    }
}
