//! The guards' series (`guard/`): what the limits refused, the connections
//! they closed, and what moderation did. Copied from the guards' own
//! counters (`GuardStats`, which `/api/stats` shows too) at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Scrape;
use crate::guard::GuardStats;

pub(super) fn collect(g: &GuardStats, out: &Scrape) {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    out.counter(
        "herald_guard_requests_limited_total",
        "HTTP requests answered 429 for the client's request rate",
        &[],
        n(&g.requests_limited),
    );
    for (reason, count) in [
        ("busy", &g.refused_busy),
        ("rate", &g.refused_rate),
        ("per_ip", &g.refused_per_ip),
        ("per_user", &g.refused_per_user),
    ] {
        out.counter(
            "herald_guard_connections_refused_total",
            "Connections refused by a limit: node full (busy), new connections per address (rate), open ones \
             per address or user",
            &[("reason", reason)],
            n(count),
        );
    }
    for (scope, count) in [("per_connection", &g.publishes_limited_connection), ("per_user", &g.publishes_limited_user)]
    {
        out.counter(
            "herald_guard_publishes_limited_total",
            "Client publishes refused (or, MQTT 3.1.1, held) for their rate",
            &[("scope", scope)],
            n(count),
        );
    }
    for (reason, count) in
        [("flood", &g.floods_closed), ("slow_consumer", &g.slow_consumers), ("max_lag", &g.lagging_closed)]
    {
        out.counter(
            "herald_guard_connections_closed_total",
            "Connections and subscriptions the guards closed: a sustained publish flood, a client that stopped \
             reading ([limits] write_timeout), one past [limits] max_lag",
            &[("reason", reason)],
            n(count),
        );
    }
    for (rule, rejected, masked) in g.per_rule() {
        out.counter(
            "herald_moderation_rejected_total",
            "Client publishes moderation rejected, by the check that did",
            &[("rule", rule)],
            rejected,
        );
        if let Some(masked) = masked {
            out.counter(
                "herald_moderation_masked_total",
                "Client publishes stored with what broke a rule masked",
                &[("rule", rule)],
                masked,
            );
        }
    }
    let w = &g.webhook;
    for (result, count) in [
        ("accepted", &w.accepted),
        ("rejected", &w.rejected),
        ("modified", &w.modified),
        ("errors", &w.errors),
        ("failed_open", &w.failed_open),
        ("failed_closed", &w.failed_closed),
    ] {
        out.counter(
            "herald_moderation_webhook_total",
            "Answers of the moderation webhook; errors are timeouts, refused connections and bad answers, \
             then let through (failed_open) or refused (failed_closed) as [moderation.webhook] on_error says",
            &[("result", result)],
            n(count),
        );
    }
}
