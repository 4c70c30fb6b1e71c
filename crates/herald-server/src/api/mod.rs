//! The HTTP APIs that are not subscriptions: publishing, inboxes and groups,
//! outbound delivery (contacts, deliveries, jobs), health, live counters,
//! the OpenAPI description and the demo pages.

pub(crate) mod health;
pub(crate) mod inbox;
pub(crate) mod openapi;
pub(crate) mod outbound;
pub(crate) mod pages;
pub(crate) mod publish;
pub mod stats;
