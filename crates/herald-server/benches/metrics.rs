//! What metrics add to the hot paths, measured alone: a socket write's
//! counters and latency sample, and a connection's open and end.
//!
//! `cargo bench -p herald-server --bench metrics` (BENCHMARKS.md, "What
//! metrics cost", has the figures and how they compare with a delivery).

use criterion::{Criterion, criterion_group, criterion_main};
use herald_server::{api::stats::Stats, api::stats::Transport, metrics::Metrics};

fn write(c: &mut Criterion) {
    let stats = Stats::new();
    let metrics = Metrics::new();
    let committed = herald_store::now_ms();
    c.bench_function("one write: delivered counter + latency sample", |b| {
        b.iter(|| {
            stats.delivered(Transport::Sse, std::hint::black_box(8));
            metrics.delivery(Transport::Sse, std::hint::black_box(committed));
        })
    });
    // Samples pile up between upkeeps; drain them as the server does.
    metrics.upkeep();
    c.bench_function("one write: delivered counter only (before)", |b| {
        b.iter(|| stats.delivered(Transport::Sse, std::hint::black_box(8)))
    });
    c.bench_function("a connection opened and ended", |b| b.iter(|| drop(stats.connect(Transport::Sse))));
}

criterion_group!(benches, write);
criterion_main!(benches);
