//! Prometheus metrics: the series Herald exports at `GET /metrics`, in the
//! Prometheus text format rendered by `metrics-exporter-prometheus` (never
//! written by hand here).
//!
//! Two kinds of series, and how to add one of each:
//!
//! - **Counters and gauges are read at scrape time.** The code that does the
//!   work keeps plain atomics (`api/stats.rs`'s `Stats`, the hub's counts,
//!   the MQTT broker's gauges), which `/api/stats` shows too; on each scrape
//!   a collector copies them into the registry ([`Scrape::counter`],
//!   [`Scrape::gauge`]). So the hot paths pay one relaxed atomic add and
//!   nothing else: no registry lookup, no lock, no allocation. To add series
//!   for a new concern (guards, outbound jobs): keep its counters in its own
//!   struct, write `fn collect(.., out: &Scrape)` in a file of this folder
//!   (see `herald.rs`, or `store.rs` for the Redis figures), and call it
//!   from [`collect_all`].
//! - **Histograms are handles made once** ([`Metrics::new`], with their
//!   buckets in [`BUCKETS`]) and recorded where the thing happens. The
//!   exporter keeps each sample until the next scrape or upkeep (a
//!   lock-free bucket that allocates a block now and then), so a histogram
//!   is recorded once per batch (a group commit, a coalesced socket write),
//!   never once per message.
//!
//! Conventions (checked by `promtool check metrics` in the tests): names
//! start with `herald_`; counters end in `_total`; base units (`_seconds`,
//! `_bytes`); labels take values from a fixed list (`&'static str`, so a
//! channel or user name cannot become one).

mod guards;
mod herald;
mod outbound;
pub mod route;
mod store;

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::{api::stats::Transport, state::AppState};

/// The version and commit this binary was built from (`build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("HERALD_COMMIT");

const METADATA: Metadata<'static> = Metadata::new("herald", metrics::Level::INFO, Some(module_path!()));

pub(crate) const DELIVERY_LATENCY: &str = "herald_delivery_latency_seconds";
pub(crate) const COMMIT_SECONDS: &str = "herald_store_commit_seconds";
pub(crate) const COMMIT_BATCH: &str = "herald_store_commit_batch_size";

/// Each histogram's bucket bounds.
pub const BUCKETS: &[(&str, &[f64])] = &[
    // Commit to socket: a quiet connection writes at once (well under a
    // millisecond on loopback), a busy one waits out its 20 ms coalescing
    // window; seconds mean a lagging or stalled client.
    (DELIVERY_LATENCY, &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
    // One group commit: tens of microseconds for a few messages with
    // `sync = normal`, milliseconds with `full` (an fsync each).
    (COMMIT_SECONDS, &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
    // Messages per group commit, up to `[store] max_batch` (1024 by default).
    (COMMIT_BATCH, &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0]),
];

/// The registry and the histogram handles. One per server.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// By transport index (`Transport as usize`).
    delivery_latency: [Histogram; Transport::ALL.len()],
    commit_seconds: Histogram,
    commit_batch: Histogram,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in BUCKETS {
            builder = builder
                .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                .expect("bucket lists are not empty");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let histogram = |name: &'static str, help: &'static str, labels: Vec<Label>| {
            recorder.describe_histogram(KeyName::from_const_str(name), None, SharedString::const_str(help));
            recorder.register_histogram(&Key::from_parts(name, labels), &METADATA)
        };
        let delivery_latency = Transport::ALL.map(|t| {
            histogram(
                DELIVERY_LATENCY,
                "Seconds from a message's commit to its write on a subscriber's socket, one sample per write \
                 (its oldest message committed while the connection was open)",
                vec![Label::from_static_parts("transport", t.as_str())],
            )
        });
        let commit_seconds = histogram(COMMIT_SECONDS, "Seconds one group commit of the store takes", vec![]);
        let commit_batch = histogram(COMMIT_BATCH, "Messages written by one group commit of the store", vec![]);
        Arc::new(Metrics { recorder, handle, delivery_latency, commit_seconds, commit_batch })
    }

    /// The Prometheus text for `state`: every collector runs, then the
    /// registry renders. `outbound` is `/api/stats`'s section of that name,
    /// read from the job store by the (async) caller.
    pub fn render(&self, state: &AppState, outbound: &serde_json::Value) -> String {
        collect_all(state, outbound, &Scrape { recorder: &self.recorder });
        self.handle.render()
    }

    /// Moves recorded histogram samples into their buckets. Run every few
    /// seconds, so samples do not pile up between scrapes (or without any).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// One socket write over `t` whose oldest live message was committed at
    /// `committed_ms` (wall clock, ms since the epoch).
    pub fn delivery(&self, t: Transport, committed_ms: i64) {
        let ms = herald_store::now_ms().saturating_sub(committed_ms).max(0);
        self.delivery_latency[t as usize].record(ms as f64 / 1000.0);
    }
}

/// The store reports each group commit here (the server's commit sink).
impl Metrics {
    pub fn commit(&self, messages: usize, took: std::time::Duration) {
        self.commit_seconds.record(took.as_secs_f64());
        self.commit_batch.record(messages as f64);
    }
}

/// What a collector writes into at scrape time.
pub struct Scrape<'a> {
    recorder: &'a PrometheusRecorder,
}

impl Scrape<'_> {
    /// Sets counter `name{labels}` (it ends in `_total`) to `value`, a
    /// count kept since start by the code that does the work.
    pub fn counter(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)], value: u64) {
        debug_assert!(name.starts_with("herald_") && name.ends_with("_total"), "{name}");
        self.recorder.describe_counter(KeyName::from_const_str(name), None, SharedString::const_str(help));
        let c: Counter = self.recorder.register_counter(&key(name, labels), &METADATA);
        c.absolute(value);
    }

    /// Sets gauge `name{labels}` to `value`.
    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)], value: f64) {
        debug_assert!(name.starts_with("herald_") && !name.ends_with("_total"), "{name}");
        self.recorder.describe_gauge(KeyName::from_const_str(name), None, SharedString::const_str(help));
        let g: Gauge = self.recorder.register_gauge(&key(name, labels), &METADATA);
        g.set(value);
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::from_static_parts(k, v)).collect::<Vec<_>>())
}

/// Every collector. A new concern adds its line here.
fn collect_all(state: &AppState, outbound: &serde_json::Value, out: &Scrape) {
    herald::build(out);
    herald::connections(&state.stats, out);
    herald::messages(state, out);
    herald::subscribers(&state.hub, out);
    herald::inbox(&state.stats, out);
    herald::mqtt(&state.mqtt.counts(), out);
    store::collect(&state.store.status(), out);
    guards::collect(&state.guards.stats, out);
    outbound::collect(outbound, out);
}

/// The latency of one socket write: notes the oldest message in it that was
/// committed while the connection was open (older ones are a replay of
/// history, whose age says nothing about delivery), then records it once.
pub(crate) struct WriteLatency {
    opened_ms: i64,
    oldest: i64,
}

/// Notes nothing (a short poll's answer: all of it history).
impl Default for WriteLatency {
    fn default() -> Self {
        WriteLatency::new(i64::MAX)
    }
}

impl WriteLatency {
    pub(crate) fn new(opened_ms: i64) -> Self {
        WriteLatency { opened_ms, oldest: i64::MAX }
    }

    pub(crate) fn note(&mut self, m: &herald_core::Message) {
        if m.time >= self.opened_ms {
            self.oldest = self.oldest.min(m.time);
        }
    }

    /// Records the write, when it carried a live message.
    pub(crate) fn record(self, metrics: &Metrics, t: Transport) {
        if self.oldest != i64::MAX {
            metrics.delivery(t, self.oldest);
        }
    }
}

#[cfg(test)]
mod tests;
