//! The store's series: whether it can take writes, and over Redis the feed
//! and shard figures `/api/stats` shows in its `redis` section (summed over
//! shards: a shard's URL is no label).

use herald_store::StoreStatus;

use super::Scrape;

pub(super) fn collect(status: &StoreStatus, out: &Scrape) {
    out.gauge(
        "herald_store_available",
        "1 while the store can take writes (always, embedded; Redis reachable, over Redis)",
        &[],
        f64::from(u8::from(status.available)),
    );
    let Some(d) = &status.details else { return };
    let shards = d["shards"].as_array().map(Vec::as_slice).unwrap_or_default();
    let sum = |key: &str| shards.iter().filter_map(|s| s[key].as_u64()).sum::<u64>();
    let up = |key: &str| shards.iter().filter(|s| s[key].as_bool() == Some(true)).count() as f64;
    out.gauge("herald_redis_shards", "Redis shards configured", &[], shards.len() as f64);
    let nodes = d["nodes"].as_array().map(Vec::as_slice).unwrap_or_default();
    let alive = nodes.iter().filter(|n| n["alive"].as_bool() == Some(true)).count();
    out.gauge("herald_redis_nodes", "Nodes of this deployment with a liveness stamp in Redis", &[], nodes.len() as f64);
    out.gauge(
        "herald_redis_nodes_alive",
        "Nodes of this deployment seen in Redis within three check periods",
        &[],
        alive as f64,
    );
    out.gauge("herald_redis_shards_available", "Redis shards answering", &[], up("available"));
    out.gauge(
        "herald_redis_feeds_connected",
        "Redis shards whose feed (pub/sub) is connected",
        &[],
        up("feed_connected"),
    );
    let lag = d["feed_lag_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    out.gauge("herald_redis_feed_lag_seconds", "How far this node's feed from Redis is behind", &[], lag);
    out.counter(
        "herald_redis_feed_received_total",
        "Messages and signals received from the Redis feeds",
        &[],
        sum("feed_received"),
    );
    out.counter(
        "herald_redis_feed_recovered_total",
        "Feed messages read back after a gap in the feed's sequence",
        &[],
        sum("feed_recovered"),
    );
    out.counter("herald_redis_feed_reconnects_total", "Reconnections of the Redis feeds", &[], sum("feed_reconnects"));
    out.counter(
        "herald_redis_lossy_restarts_total",
        "Redis restarts found to have lost acknowledged data (clients got a gap)",
        &[],
        sum("lossy_restarts"),
    );
    out.counter(
        "herald_redis_resyncs_total",
        "Times a feed was cut off longer than Redis keeps it, so channel heads were read again",
        &[],
        d["resyncs"].as_u64().unwrap_or(0),
    );
}
