//! Outbound delivery's series (`outbound/`): the job queue (shared by every
//! node on Redis, so each node reports the same queue) and this node's
//! sends by channel and outcome. Read from `/api/stats`'s `outbound`
//! section, which the scrape handler fetches from the job store first.

use serde_json::Value;

use super::Scrape;

pub(super) fn collect(outbound: &Value, out: &Scrape) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    for state in ["pending", "running", "dead"] {
        out.gauge(
            "herald_outbound_jobs",
            "Outbound jobs (fallback e-mails and webhooks, webhook deliveries) by state; dead ones wait in \
             /api/outbound/dead",
            &[("state", state)],
            n(&outbound["jobs"][state]) as f64,
        );
    }
    out.gauge(
        "herald_outbound_oldest_due_late_seconds",
        "How late the oldest due job is: grows when workers cannot keep up or a receiver is down",
        &[],
        n(&outbound["oldest_due_late_ms"]) as f64 / 1000.0,
    );
    for via in ["webhook", "email"] {
        for outcome in crate::outbound::OUTCOMES {
            out.counter(
                "herald_outbound_sends_total",
                "Outbound sends by this node, by channel and outcome",
                &[("via", via), ("outcome", outcome)],
                n(&outbound["sends"][via][outcome]),
            );
        }
    }
}
