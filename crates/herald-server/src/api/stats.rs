//! Live counters for the admin page (`GET /api/stats`): open connections per
//! transport, messages published and deliveries made, messages waiting in
//! subscribers' mailboxes, and the guards' counters (`guard/`). Plain atomics; the
//! Prometheus endpoint will read the same numbers when metrics arrive.

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use axum::{Json, extract::State};
use serde_json::{Value, json};

use crate::state::SharedState;

#[derive(Debug, Clone, Copy)]
pub enum Transport {
    Sse,
    Ws,
    LongPoll,
    Iframe,
    Mqtt,
}

const TRANSPORTS: [(Transport, &str); 5] = [
    (Transport::Sse, "sse"),
    (Transport::Ws, "ws"),
    (Transport::LongPoll, "longpoll"),
    (Transport::Iframe, "iframe"),
    (Transport::Mqtt, "mqtt"),
];

#[derive(Default)]
pub struct Stats {
    connections: [AtomicI64; 5],
    pub delivered: AtomicU64,
    started: std::sync::OnceLock<std::time::Instant>,
}

impl Stats {
    pub fn new() -> Arc<Self> {
        let s = Stats::default();
        s.started.get_or_init(std::time::Instant::now);
        Arc::new(s)
    }

    /// Counts a connection for as long as the guard lives.
    pub fn connect(self: &Arc<Self>, t: Transport) -> ConnectionGuard {
        self.connections[t as usize].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { stats: self.clone(), transport: t }
    }

    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    pub fn connections(&self, t: Transport) -> i64 {
        self.connections[t as usize].load(Ordering::Relaxed)
    }

    /// Long-lived connections open on every transport: the node's total
    /// that `[limits.connections] max` caps.
    pub fn open_connections(&self) -> usize {
        self.connections.iter().map(|c| c.load(Ordering::Relaxed).max(0) as usize).sum()
    }
}

pub struct ConnectionGuard {
    stats: Arc<Stats>,
    transport: Transport,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.connections[self.transport as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn stats(State(state): State<SharedState>) -> Json<Value> {
    let s = &state.stats;
    let connections: serde_json::Map<String, Value> =
        TRANSPORTS.iter().map(|(t, name)| ((*name).to_owned(), json!(s.connections(*t)))).collect();
    let mut out = json!({
        "node": state.node,
        "uptime_s": s.started.get().map_or(0, |t| t.elapsed().as_secs()),
        "connections": connections,
        "published": state.hub.published(),
        "delivered": s.delivered.load(Ordering::Relaxed),
        "queued": state.hub.queued(),
        "guards": state.guards.stats_json(),
        "outbound": state.outbound.stats().await,
    });
    let store = state.store.status();
    if let Some(details) = store.details {
        // Over Redis: its connection state per shard and the feed's lag.
        out["redis"] = details;
        out["redis"]["available"] = store.available.into();
    }
    Json(out)
}
