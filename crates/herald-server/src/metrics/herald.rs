//! The collectors of the core server's series: build, connections, messages,
//! subscribers, inboxes, MQTT. Each copies counts kept elsewhere into the
//! registry at scrape time; README.md ("Operating Herald") lists what each
//! series means.

use herald_core::Hub;

use super::{COMMIT, Scrape, VERSION};
use crate::{
    api::stats::{Audience, CloseReason, Source, Stats, Transport},
    state::AppState,
    transport::mqtt::MqttCounts,
};

pub(super) fn build(out: &Scrape) {
    out.gauge(
        "herald_build_info",
        "Always 1; the labels name the version and commit this server was built from",
        &[("version", VERSION), ("commit", COMMIT)],
        1.0,
    );
}

pub(super) fn connections(s: &Stats, out: &Scrape) {
    out.gauge("herald_uptime_seconds", "Seconds since this server started", &[], s.uptime_s() as f64);
    for t in Transport::CONNECTED {
        let labels = [("transport", t.as_str())];
        out.gauge(
            "herald_connections_open",
            "Open connections (SSE, iframe and MQTT streams, WebSockets, waiting long polls)",
            &labels,
            s.connections(t) as f64,
        );
        out.counter("herald_connections_opened_total", "Connections opened", &labels, s.opened(t));
        for r in CloseReason::ALL {
            out.counter(
                "herald_connections_closed_total",
                "Connections ended, by why (client, shutdown, token_expired, timeout, ...)",
                &[("transport", t.as_str()), ("reason", r.as_str())],
                s.closed(t, r),
            );
        }
    }
}

pub(super) fn messages(state: &AppState, out: &Scrape) {
    let s = &state.stats;
    out.counter(
        "herald_messages_committed_total",
        "Messages committed by the store and handed to subscribers, from every source",
        &[],
        state.hub.published(),
    );
    for src in Source::ALL {
        out.counter(
            "herald_messages_published_total",
            "Messages published, by where they came from (http, ws, mqtt, notification)",
            &[("source", src.as_str())],
            s.published_by(src),
        );
    }
    for t in Transport::ALL {
        out.counter(
            "herald_messages_delivered_total",
            "Messages written to subscribers, by transport (one publish to ten subscribers is ten)",
            &[("transport", t.as_str())],
            s.delivered_by(t),
        );
    }
}

pub(super) fn subscribers(hub: &Hub, out: &Scrape) {
    out.gauge(
        "herald_subscriptions",
        "Live subscriptions: (subscriber, channel or filter) pairs registered with the hub",
        &[],
        hub.registrations() as f64,
    );
    out.counter(
        "herald_subscriber_lags_total",
        "Times a subscriber's mailbox overflowed, so it caught up from the store",
        &[],
        hub.lagged(),
    );
    out.counter(
        "herald_subscriber_catch_ups_total",
        "Times a lagged subscriber finished catching up from the store",
        &[],
        hub.caught_up(),
    );
}

pub(super) fn inbox(s: &Stats, out: &Scrape) {
    for a in Audience::ALL {
        out.counter(
            "herald_inbox_notifications_total",
            "Notifications stored, by audience (users: one per user; group and all: one each)",
            &[("audience", a.as_str())],
            s.notifications(a),
        );
    }
    out.counter("herald_inbox_read_marks_total", "Read marks made (POST /api/users/{user}/read)", &[], s.read_marks());
}

pub(super) fn mqtt(m: &MqttCounts, out: &Scrape) {
    let sessions = "MQTT sessions: live (connected) or parked (persistent, waiting for their client)";
    out.gauge("herald_mqtt_sessions", sessions, &[("state", "live")], m.live as f64);
    out.gauge("herald_mqtt_sessions", sessions, &[("state", "parked")], m.parked as f64);
    out.gauge("herald_mqtt_retained_messages", "MQTT retained messages held", &[], m.retained as f64);
    let inflight =
        "MQTT QoS 1/2 messages in flight: sent and not yet acknowledged (out), or received QoS 2 awaiting PUBREL (in)";
    out.gauge("herald_mqtt_inflight_messages", inflight, &[("direction", "out"), ("qos", "1")], m.inflight[0] as f64);
    out.gauge("herald_mqtt_inflight_messages", inflight, &[("direction", "out"), ("qos", "2")], m.inflight[1] as f64);
    out.gauge("herald_mqtt_inflight_messages", inflight, &[("direction", "in"), ("qos", "2")], m.inflight[2] as f64);
}
