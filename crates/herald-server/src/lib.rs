//! Herald's server: configuration, the HTTP application and one module per
//! transport. Each transport is a thin adapter over [`subscription`]: it parses
//! its request, opens a subscription and encodes what comes out.

pub mod app;
pub mod auth;
mod coalesce;
pub mod config;
mod cursors;
pub mod error;
mod front;
mod health;
mod iframe;
pub mod inbox;
mod inbox_api;
pub mod mqtt;
mod pages;
mod poll;
mod publish;
mod query;
pub mod server;
mod sse;
pub mod stats;
mod stream;
pub mod subscription;
mod websocket;
mod ws;

pub use app::{AppState, app};
pub use config::{Config, Overrides};
pub use server::{Server, ServerError};
