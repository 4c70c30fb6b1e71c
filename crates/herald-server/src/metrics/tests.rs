//! The registry renders every series the collectors name, in the text
//! format's conventions. (`promtool` and a real Prometheus check the live
//! output in `crates/herald/tests/metrics.rs`.)

use std::{collections::BTreeMap, time::Duration};

use super::*;

/// `# TYPE` lines: series name to type.
fn types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("name and type");
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn every_series_follows_the_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::Config::default();
    config.server.http = "127.0.0.1:0".parse().unwrap();
    config.server.mqtt = "off".into();
    config.server.memory = true;
    config.server.data = dir.path().into();
    let server = crate::Server::bind(config, Default::default()).await.unwrap();
    let state = server.state().clone();
    state.metrics.commit(3, Duration::from_micros(250));
    state.metrics.delivery(Transport::Sse, herald_store::now_ms() - 7);
    state.guards.stats.requests_limited.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    let text = state.metrics.render(&state, &state.outbound.stats().await);
    let types = types(&text);
    for (name, kind) in &types {
        assert!(name.starts_with("herald_"), "{name}");
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "{name}"),
            "gauge" | "histogram" => assert!(!name.ends_with("_total"), "{name}"),
            other => panic!("{name}: unexpected type {other}"),
        }
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
    }
    for (name, kind) in [
        ("herald_build_info", "gauge"),
        ("herald_connections_open", "gauge"),
        ("herald_connections_opened_total", "counter"),
        ("herald_connections_closed_total", "counter"),
        ("herald_messages_published_total", "counter"),
        ("herald_messages_delivered_total", "counter"),
        ("herald_delivery_latency_seconds", "histogram"),
        ("herald_store_commit_seconds", "histogram"),
        ("herald_store_commit_batch_size", "histogram"),
        ("herald_subscriber_lags_total", "counter"),
        ("herald_subscriber_catch_ups_total", "counter"),
        ("herald_mqtt_sessions", "gauge"),
        ("herald_mqtt_retained_messages", "gauge"),
        ("herald_mqtt_inflight_messages", "gauge"),
        ("herald_inbox_notifications_total", "counter"),
        ("herald_inbox_read_marks_total", "counter"),
        ("herald_store_available", "gauge"),
        ("herald_guard_requests_limited_total", "counter"),
        ("herald_guard_connections_refused_total", "counter"),
        ("herald_guard_publishes_limited_total", "counter"),
        ("herald_guard_connections_closed_total", "counter"),
        ("herald_moderation_rejected_total", "counter"),
        ("herald_moderation_masked_total", "counter"),
        ("herald_moderation_webhook_total", "counter"),
        ("herald_outbound_jobs", "gauge"),
        ("herald_outbound_oldest_due_late_seconds", "gauge"),
        ("herald_outbound_sends_total", "counter"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name} in:\n{text}");
    }
    assert!(text.contains(&format!("herald_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1")), "{text}");
    // The counters bumped above, copied at the scrape.
    assert!(text.contains("herald_guard_requests_limited_total 2"), "{text}");
    assert!(text.contains("herald_outbound_jobs{state=\"dead\"} 0"), "{text}");
    // The samples recorded above, in their buckets.
    assert!(text.contains("herald_store_commit_batch_size_bucket{le=\"4\"} 1"), "{text}");
    assert!(text.contains("herald_store_commit_seconds_bucket{le=\"0.00025\"} 1"), "{text}");
    assert!(text.contains("herald_delivery_latency_seconds_bucket{transport=\"sse\",le=\"0.005\"} 0"), "{text}");
    assert!(text.contains("herald_delivery_latency_seconds_count{transport=\"sse\"} 1"), "{text}");
}

#[test]
fn a_write_records_its_oldest_live_message_only() {
    use herald_core::{Channel, Data, Message};
    let msg = |time| Message::new(Channel::parse("c").unwrap(), 1, None, Data::text("x"), time);
    let mut l = WriteLatency::new(1_000);
    l.note(&msg(900)); // history: committed before the connection opened
    assert_eq!(l.oldest, i64::MAX);
    l.note(&msg(1_500));
    l.note(&msg(1_200));
    assert_eq!(l.oldest, 1_200);
    let mut short_poll = WriteLatency::default();
    short_poll.note(&msg(1_500));
    assert_eq!(short_poll.oldest, i64::MAX, "a short poll's answer is never a live delivery");
}
