//! Herald's server: configuration, the HTTP application and one module per
//! transport. Each transport is a thin adapter over [`subscription`]: it parses
//! its request, opens a subscription and encodes what comes out.
//!
//! The folders are the architecture:
//! - `edge/`: plumbing every transport uses: the front door, WebSocket framing,
//!   streamed bodies, write coalescing, query strings and the one conversion of
//!   errors into answers;
//! - `transport/`: poll, SSE, iframe, Herald's WebSocket protocol, MQTT;
//! - `api/`: the HTTP APIs that are not subscriptions: publish, inboxes,
//!   outbound (contacts, deliveries, jobs), health, stats, the demo pages;
//! - `outbound/`: what Herald sends elsewhere, durably: unread fallback,
//!   outbound webhooks, e-mail, the job worker and its sweep;
//! - `guard/`: rate and connection limits, client addresses behind proxies,
//!   content moderation (rules and the moderation webhook);
//! - `metrics/`: the Prometheus series at `/metrics` and how to add one;
//! - at the top: the shared state, the route table, auth, subscriptions,
//!   live inboxes, configuration, the server's start and stop, the store's
//!   sink (`signals.rs`: what other nodes tell this one), and
//!   `webhook.rs`: the signature and HTTP client of every outbound request;
//! - `fuzz.rs`: hidden entry points into the private parsers, for `fuzz/`.

pub mod api;
pub mod auth;
pub mod config;
pub mod edge;
#[doc(hidden)]
pub mod fuzz;
pub mod guard;
pub mod inbox;
pub mod metrics;
pub mod outbound;
pub mod routes;
pub mod server;
pub mod signals;
pub mod state;
pub mod subscription;
pub mod transport;
pub mod webhook;

pub use config::{Config, Overrides};
pub use routes::app;
pub use server::{Server, ServerError};
pub use state::AppState;
