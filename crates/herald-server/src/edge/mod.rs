//! Plumbing every transport shares: the HTTP front door, WebSocket framing,
//! the streamed body behind SSE and iframe responses, adaptive write
//! coalescing, query strings, and the one conversion of errors into answers.

pub(crate) mod coalesce;
pub mod error;
pub(crate) mod front;
pub(crate) mod query;
pub(crate) mod stream;
pub(crate) mod websocket;
