//! Live counters (`GET /api/stats`, the admin page; `/metrics` exports the
//! same numbers): connections per transport with how they ended, messages
//! published by source and delivered by transport, inbox activity, the guards' counters (`guard/`); beside
//! them the hub's (subscriptions, lagged subscribers) and the MQTT broker's
//! (sessions, retained messages, messages in flight).
//!
//! The hot paths only add to plain atomics here (no lock, no allocation, no
//! lookup); `metrics::collect` copies them into Prometheus series when
//! `/metrics` is scraped. A new concern keeps its counters the same way, in
//! its own struct, and adds a section to [`stats`] and a collector to
//! `metrics/`.

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use axum::{Json, extract::State};
use serde_json::{Map, Value, json};

use crate::state::SharedState;

/// Where a delivery went. The first five hold connections; short polls do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    Ws,
    LongPoll,
    Iframe,
    Mqtt,
    /// Short polls: deliveries only, never a connection.
    Poll,
}

impl Transport {
    /// Every transport, in index order.
    pub const ALL: [Transport; 6] =
        [Transport::Sse, Transport::Ws, Transport::LongPoll, Transport::Iframe, Transport::Mqtt, Transport::Poll];
    /// The transports that hold a connection open.
    pub const CONNECTED: [Transport; 5] =
        [Transport::Sse, Transport::Ws, Transport::LongPoll, Transport::Iframe, Transport::Mqtt];

    /// The label value (`/metrics`) and JSON key (`/api/stats`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::LongPoll => "longpoll",
            Transport::Iframe => "iframe",
            Transport::Mqtt => "mqtt",
            Transport::Poll => "poll",
        }
    }
}

/// Why a connection ended: a short, fixed list, so it can be a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The client closed it or went away (also: a failed write to it).
    Client,
    /// The server is shutting down.
    Shutdown,
    /// The credential it connected with expired.
    TokenExpired,
    /// An SSE or iframe stream reached `[sse] max_lifetime`.
    Lifetime,
    /// No answer to pings (WebSocket) or keep-alive exceeded (MQTT).
    Timeout,
    /// The client broke the protocol (bad frames, malformed packets).
    ProtocolError,
    /// Refused while opening (a bad CONNECT or credential).
    Refused,
    /// Another MQTT connection took the client id.
    Takeover,
    /// The store failed; the client resumes from its cursor.
    StoreError,
    /// A long poll answered with messages.
    Answered,
    /// A long poll that waited out `wait` (304).
    NotModified,
    /// Closed for not keeping up (`[limits] write_timeout`, `max_lag`).
    SlowConsumer,
    /// Closed by a limit (a flood of publishes, too many bad frames).
    Limit,
}

impl CloseReason {
    pub const ALL: [CloseReason; 13] = [
        CloseReason::Client,
        CloseReason::Shutdown,
        CloseReason::TokenExpired,
        CloseReason::Lifetime,
        CloseReason::Timeout,
        CloseReason::ProtocolError,
        CloseReason::Refused,
        CloseReason::Takeover,
        CloseReason::StoreError,
        CloseReason::Answered,
        CloseReason::NotModified,
        CloseReason::SlowConsumer,
        CloseReason::Limit,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Lifetime => "lifetime",
            CloseReason::Timeout => "timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Refused => "refused",
            CloseReason::Takeover => "takeover",
            CloseReason::StoreError => "store_error",
            CloseReason::Answered => "answered",
            CloseReason::NotModified => "not_modified",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Limit => "limit",
        }
    }
}

/// Where a published message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Http,
    Ws,
    Mqtt,
    Notification,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Http, Source::Ws, Source::Mqtt, Source::Notification];

    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Ws => "ws",
            Source::Mqtt => "mqtt",
            Source::Notification => "notification",
        }
    }
}

/// Who a notification went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Users,
    Group,
    All,
}

impl Audience {
    pub const ALL: [Audience; 3] = [Audience::Users, Audience::Group, Audience::All];

    pub const fn as_str(self) -> &'static str {
        match self {
            Audience::Users => "users",
            Audience::Group => "group",
            Audience::All => "all",
        }
    }
}

const TRANSPORTS: usize = Transport::ALL.len();
const REASONS: usize = CloseReason::ALL.len();

#[derive(Default)]
pub struct Stats {
    connections: [AtomicI64; TRANSPORTS],
    pub delivered: AtomicU64,
    started: std::sync::OnceLock<std::time::Instant>,
    // Operations (metrics): each hot path adds to one of these.
    opened: [AtomicU64; TRANSPORTS],
    closed: [[AtomicU64; REASONS]; TRANSPORTS],
    delivered_by: [AtomicU64; TRANSPORTS],
    published_by: [AtomicU64; Source::ALL.len()],
    notifications: [AtomicU64; Audience::ALL.len()],
    /// `POST /api/users/{u}/read` calls that changed read state.
    read_marks: AtomicU64,
}

impl Stats {
    pub fn new() -> Arc<Self> {
        let s = Stats::default();
        s.started.get_or_init(std::time::Instant::now);
        Arc::new(s)
    }

    /// Counts a connection for as long as the guard lives; its end is
    /// counted (and logged at debug) with the reason set by
    /// [`ConnectionGuard::end`], `client` when none was.
    pub fn connect(self: &Arc<Self>, t: Transport) -> ConnectionGuard {
        self.connections[t as usize].fetch_add(1, Ordering::Relaxed);
        self.opened[t as usize].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            stats: self.clone(),
            opened_ms: herald_store::now_ms(),
            transport: t,
            reason: CloseReason::Client,
        }
    }

    /// `n` messages written to subscribers over `t`.
    pub fn delivered(&self, t: Transport, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        self.delivered_by[t as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// `n` messages stored from `source`.
    pub fn published(&self, source: Source, n: u64) {
        self.published_by[source as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn notified(&self, audience: Audience, n: u64) {
        self.notifications[audience as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn read_mark(&self) {
        self.read_marks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connections(&self, t: Transport) -> i64 {
        self.connections[t as usize].load(Ordering::Relaxed)
    }

    /// Long-lived connections open on every transport: the node's total
    /// that `[limits.connections] max` caps.
    pub fn open_connections(&self) -> usize {
        self.connections.iter().map(|c| c.load(Ordering::Relaxed).max(0) as usize).sum()
    }

    pub fn opened(&self, t: Transport) -> u64 {
        self.opened[t as usize].load(Ordering::Relaxed)
    }

    pub fn closed(&self, t: Transport, r: CloseReason) -> u64 {
        self.closed[t as usize][r as usize].load(Ordering::Relaxed)
    }

    pub fn delivered_by(&self, t: Transport) -> u64 {
        self.delivered_by[t as usize].load(Ordering::Relaxed)
    }

    pub fn published_by(&self, s: Source) -> u64 {
        self.published_by[s as usize].load(Ordering::Relaxed)
    }

    pub fn notifications(&self, a: Audience) -> u64 {
        self.notifications[a as usize].load(Ordering::Relaxed)
    }

    pub fn read_marks(&self) -> u64 {
        self.read_marks.load(Ordering::Relaxed)
    }

    pub fn uptime_s(&self) -> u64 {
        self.started.get().map_or(0, |t| t.elapsed().as_secs())
    }
}

/// One open connection. Dropping it counts the connection closed, with its
/// reason, and logs its end once (debug): transport, duration, reason.
pub struct ConnectionGuard {
    stats: Arc<Stats>,
    /// Wall clock at open (ms since the epoch): the duration logged at the
    /// end, and what tells a live delivery from a replayed one (committed
    /// before the connection opened) for the delivery latency.
    opened_ms: i64,
    transport: Transport,
    reason: CloseReason,
}

impl ConnectionGuard {
    /// Records why the connection is ending (the last call wins).
    pub fn end(&mut self, reason: CloseReason) {
        self.reason = reason;
    }

    pub fn opened_ms(&self) -> i64 {
        self.opened_ms
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let (t, r) = (self.transport as usize, self.reason as usize);
        self.stats.connections[t].fetch_sub(1, Ordering::Relaxed);
        self.stats.closed[t][r].fetch_add(1, Ordering::Relaxed);
        let duration_ms = herald_store::now_ms().saturating_sub(self.opened_ms).max(0);
        tracing::debug!(
            transport = self.transport.as_str(),
            reason = self.reason.as_str(),
            duration_s = duration_ms as f64 / 1000.0,
            "connection ended"
        );
    }
}

pub(crate) async fn stats(State(state): State<SharedState>) -> Json<Value> {
    let s = &state.stats;
    let connections: Map<String, Value> =
        Transport::CONNECTED.iter().map(|t| (t.as_str().to_owned(), json!(s.connections(*t)))).collect();
    let mut out = json!({
        "node": state.node,
        "uptime_s": s.uptime_s(),
        "connections": connections,
        "published": state.hub.published(),
        "delivered": s.delivered.load(Ordering::Relaxed),
        "guards": state.guards.stats_json(),
        "outbound": state.outbound.stats().await,
    });
    let store = state.store.status();
    if let Some(details) = store.details {
        // Over Redis: its connection state per shard and the feed's lag.
        out["redis"] = details;
        out["redis"]["available"] = store.available.into();
    }
    // Sections beyond the first four: the admin page draws any section it
    // finds (an object of numbers), so a new one needs no change there.
    out["delivered_by_transport"] =
        Transport::ALL.iter().map(|t| (t.as_str().to_owned(), json!(s.delivered_by(*t)))).collect::<Map<_, _>>().into();
    out["published_by_source"] =
        Source::ALL.iter().map(|x| (x.as_str().to_owned(), json!(s.published_by(*x)))).collect::<Map<_, _>>().into();
    out["subscribers"] = json!({
        "registrations": state.hub.registrations(),
        "lagged": state.hub.lagged(),
        "caught_up": state.hub.caught_up(),
        // Messages waiting in mailboxes: memory held for consumers that
        // have not taken them yet.
        "queued": state.hub.queued(),
    });
    let mut inbox: Map<String, Value> =
        Audience::ALL.iter().map(|a| (format!("notifications_{}", a.as_str()), json!(s.notifications(*a)))).collect();
    inbox.insert("read_marks".into(), json!(s.read_marks()));
    out["inbox"] = inbox.into();
    let m = state.mqtt.counts();
    out["mqtt"] = json!({
        "sessions_live": m.live,
        "sessions_parked": m.parked,
        "retained": m.retained,
        "inflight_qos1": m.inflight[0],
        "inflight_qos2": m.inflight[1],
        "awaiting_release": m.inflight[2],
    });
    Json(out)
}
