//! The state every handler shares: configuration, the store, the hub, auth,
//! inboxes, the MQTT broker, counters, metrics and the shutdown token. Handlers depend
//! on this, not on the route table (`routes.rs`).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use herald_core::{CursorToken, Hub, Principal, Since, Target};
use herald_store::Store;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Auth, forbidden},
    config::Config,
    edge::error::ApiError,
    guard::{Client, Permit, Who},
    inbox::Inbox,
    subscription::{Context, Subscription},
};

/// What every handler shares.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// Cancelled on shutdown; every long-lived response listens to it.
    pub shutdown: CancellationToken,
    /// Set once the store is open and the listener bound.
    pub ready: AtomicBool,
    pub stats: Arc<crate::api::stats::Stats>,
    pub auth: Auth,
    pub inbox: Arc<Inbox>,
    pub mqtt: Arc<crate::transport::mqtt::Broker>,
    /// This node's name (`[server] node`), in logs and stats.
    pub node: String,
    /// Unread fallback, outbound webhooks, e-mail and their jobs.
    pub outbound: Arc<crate::outbound::Outbound>,
    /// Rate and connection limits, moderation (`guard/`).
    pub guards: Arc<crate::guard::Guards>,
    /// Prometheus: the registry and the histogram handles (`metrics/`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl AppState {
    /// Opens a subscription for `principal` after checking it may subscribe to
    /// every target. `live` registers it with the hub (everything but short polls).
    pub(crate) async fn subscribe(
        &self,
        principal: Arc<Principal>,
        targets: Vec<Target>,
        since: Since,
        token: &CursorToken,
        live: bool,
    ) -> Result<Subscription, ApiError> {
        for t in &targets {
            if !principal.may_subscribe(t) {
                let name = match t {
                    Target::Channel(c) => c.to_string(),
                    Target::Filter(f) => f.to_string(),
                };
                return Err(forbidden(format!("not allowed to subscribe to '{name}'")));
            }
        }
        Ok(Subscription::open(self.context(principal, live), targets, since, token).await?)
    }

    pub(crate) fn context(&self, principal: Arc<Principal>, live: bool) -> Context {
        Context {
            store: self.store.clone(),
            hub: live.then(|| self.hub.clone()),
            // Live subscriptions carry the unread count of an inbox they
            // include; a one-shot read has no use for a live count.
            inbox: live.then(|| self.inbox.clone()),
            principal,
            max_lag: self.guards.max_lag(),
        }
    }

    /// Admits a long-lived connection (SSE, iframe, waiting long poll,
    /// WebSocket, MQTT) from `client` as `who`: the permit it holds while
    /// open, or the answer refusing it. `new_connection`: see `Guards::admit`.
    pub(crate) fn admit(&self, client: Client, who: Who, new_connection: bool) -> Result<Permit, ApiError> {
        if client.addr.is_none() {
            return Ok(Permit::none()); // exempt: nothing to count
        }
        let open = self.stats.open_connections();
        self.guards.admit(client, who, open, new_connection).map_err(|r| self.guards.connection_error(r))
    }

    /// Ready for traffic: started, not stopping, and the store can take
    /// writes (over Redis: every Redis answers and every feed is up).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutdown.is_cancelled() && self.store.status().available
    }
}

pub type SharedState = Arc<AppState>;
