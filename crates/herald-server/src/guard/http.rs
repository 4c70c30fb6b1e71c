//! The guards on requests that go through the router (everything the front
//! door does not answer itself): the client behind the request is resolved
//! from the peer the front door attached (and `X-Forwarded-For` from a
//! trusted proxy), kept in the request for the handlers (connection
//! admission, publish limits), and its request counted.
//!
//! A refused SSE request is answered in band (`sse::refusal`): a browser's
//! `EventSource` gives up for good on any answer but 200.

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{Client, Peer, Who};
use crate::{auth, edge::query::Query, state::SharedState, transport::sse};

pub(crate) async fn limit_requests(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let client = match req.extensions().get::<Peer>().copied() {
        Some(peer) => {
            let hops: Vec<&[u8]> = match peer.is_proxy() {
                true => req.headers().get_all("x-forwarded-for").iter().map(|v| v.as_bytes()).collect(),
                false => Vec::new(),
            };
            Client { addr: state.guards.address.client(peer, &hops) }
        }
        // Not from the front door (the router driven directly): nothing to key.
        None => Client::default(),
    };
    req.extensions_mut().insert(client);
    if client.addr.is_some() {
        let query = Query::parse(req.uri().query());
        let credential = auth::credential(req.headers(), &query);
        // A credential that fails is the address's request (and then a 401).
        let who = match state.auth.authenticate(req.headers(), &query) {
            Ok(p) => state.guards.who(&p, credential),
            Err(_) => Who::Anonymous,
        };
        if let Err(e) = state.guards.check_request(client, who) {
            return if is_sse(req.uri().path()) { sse::refusal(e) } else { e.into_response() };
        }
    }
    next.run(req).await
}

/// The SSE routes: `/api/events` and `/api/channels/{channel}/events`.
fn is_sse(path: &str) -> bool {
    path == "/api/events" || (path.starts_with("/api/channels/") && path.ends_with("/events"))
}
