//! The transports: each parses its request into targets and a cursor, opens a
//! [`Subscription`](crate::subscription::Subscription) and encodes what comes
//! out. None of them touches the store or the hub directly.

pub(crate) mod iframe;
pub mod mqtt;
pub(crate) mod poll;
pub(crate) mod sse;
pub(crate) mod ws;
