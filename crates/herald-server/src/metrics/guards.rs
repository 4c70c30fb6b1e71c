//! The guards' series (`guard/`): what the limits refused, the connections
//! they closed, and what moderation did. Read from the same figures
//! `/api/stats` shows in its `guards` section, at scrape time.

use serde_json::Value;

use super::Scrape;

/// The moderation checks, as labels (the keys of the stats' `rejected`).
const RULES: [&str; 5] = ["words", "pattern", "links", "length", "webhook"];

pub(super) fn collect(guards: &Value, out: &Scrape) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    out.counter(
        "herald_guard_requests_limited_total",
        "HTTP requests answered 429 for the client's request rate",
        &[],
        n(&guards["requests_limited"]),
    );
    for reason in ["busy", "rate", "per_ip", "per_user"] {
        out.counter(
            "herald_guard_connections_refused_total",
            "Connections refused by a limit: node full (busy), new connections per address (rate), open ones \
             per address or user",
            &[("reason", reason)],
            n(&guards["connections_refused"][reason]),
        );
    }
    for scope in ["per_connection", "per_user"] {
        out.counter(
            "herald_guard_publishes_limited_total",
            "Client publishes refused (or, MQTT 3.1.1, held) for their rate",
            &[("scope", scope)],
            n(&guards["publishes_limited"][scope]),
        );
    }
    for (reason, key) in
        [("flood", "floods_closed"), ("slow_consumer", "slow_consumers_closed"), ("max_lag", "lagging_closed")]
    {
        out.counter(
            "herald_guard_connections_closed_total",
            "Connections and subscriptions the guards closed: a sustained publish flood, a client that stopped \
             reading ([limits] write_timeout), one past [limits] max_lag",
            &[("reason", reason)],
            n(&guards[key]),
        );
    }
    let moderation = &guards["moderation"];
    for rule in RULES {
        out.counter(
            "herald_moderation_rejected_total",
            "Client publishes moderation rejected, by the check that did",
            &[("rule", rule)],
            n(&moderation["rejected"][rule]),
        );
    }
    for rule in &RULES[..4] {
        out.counter(
            "herald_moderation_masked_total",
            "Client publishes stored with what broke a rule masked",
            &[("rule", rule)],
            n(&moderation["masked"][rule]),
        );
    }
    for result in ["accepted", "rejected", "modified", "errors", "failed_open", "failed_closed"] {
        out.counter(
            "herald_moderation_webhook_total",
            "Answers of the moderation webhook; errors are timeouts, refused connections and bad answers, \
             then let through (failed_open) or refused (failed_closed) as [moderation.webhook] on_error says",
            &[("result", result)],
            n(&moderation["webhook"][result]),
        );
    }
}
