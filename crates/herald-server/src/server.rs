//! Starting and stopping a server: open the store, bind the listener, serve until
//! the shutdown token fires, let open streams end, then close the store so every
//! acknowledged message is on disk.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use herald_core::Hub;
use herald_store::{
    BrokerStore, InboxStore, JobStore, MemoryStore, RedisOptions, RedisStore, SqliteOptions, SqliteStore, Store,
    StoreConfig, SyncMode, system_clock,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Auth,
    config::{Config, ConfigError, SyncSetting},
    inbox::Inbox,
    metrics::Metrics,
    outbound::{Outbound, OutboundError},
    signals::Sink,
    state::AppState,
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not open the store: {0}")]
    Store(#[from] herald_store::StoreError),
    #[error("could not listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error(
        "refusing to serve {0} without authentication: configure [auth] (jwt_secret, jwt_public_key or api_keys), \
         listen on a loopback address, or pass --allow-open if an open server on the network is really what you want"
    )]
    OpenOnNetwork(SocketAddr),
}

/// A bound, ready server; [`Server::run`] serves until `shutdown` is cancelled.
pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    mqtt: Option<TcpListener>,
    /// Outbound sends in flight: waited for before the store closes.
    outbound: tokio_util::task::TaskTracker,
    /// `[metrics] listen`, when set.
    metrics: Option<TcpListener>,
}

impl Server {
    /// Opens the store and binds the HTTP listener.
    pub async fn bind(config: Config, shutdown: CancellationToken) -> Result<Self, ServerError> {
        let hub = Hub::new(config.limits.subscriber_queue);
        let metrics = Metrics::new();
        let sink = Sink::new(hub.clone(), metrics.clone());
        // Bound first: the node's default name carries the port it got.
        let addr = config.server.http;
        let listener = listen(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let node = node_name(&config, listener.local_addr()?.port());
        // For the log lines (the binary's formatter adds it to each); the
        // first server of a process names it.
        let _ = NODE.set(node.clone());
        let store_config = StoreConfig { retention: config.retention()?, clock: system_clock(), sink: sink.clone() };
        let metrics_listener = match config.metrics.address()? {
            Some(addr) => Some(listen(addr).map_err(|source| ServerError::Bind { addr, source })?),
            None => None,
        };
        let (store, inbox_store, broker_store, job_store): Stores = if !config.redis.url.is_empty() {
            let r = &config.redis;
            let mut options = RedisOptions::new(r.url.clone());
            options.prefix = r.prefix.clone();
            options.partitions = r.partitions;
            options.timeout = r.timeout;
            options.connect_timeout = r.connect_timeout;
            options.check_every = r.check_every;
            options.log_len = r.feed_log;
            options.node = node.clone();
            options.cluster = r.cluster;
            let s = Arc::new(RedisStore::open(options, store_config).await?);
            tracing::info!(node, redis = r.url.len(), "sharing channels with other nodes over Redis");
            (s.clone(), s.clone(), s.clone(), s)
        } else if config.server.memory {
            let s = Arc::new(MemoryStore::new(store_config));
            (s.clone(), s.clone(), s.clone(), s)
        } else {
            let mut options = SqliteOptions::new(&config.server.data);
            options.sync = match config.store.sync {
                SyncSetting::Normal => SyncMode::Normal,
                SyncSetting::Full => SyncMode::Full,
            };
            options.max_batch = config.store.max_batch.max(1);
            let s = Arc::new(SqliteStore::open(options, store_config)?);
            (s.clone(), s.clone(), s.clone(), s)
        };
        let shared = broker_store.is_shared();
        let mqtt = Arc::new(crate::transport::mqtt::Broker::new(broker_store));
        if shared {
            mqtt.join_cluster(store.clone(), node.clone());
        }
        mqtt.restore().await?;
        let auth = Auth::from_config(&config.auth)?;
        if auth.is_open() && !config.server.http.ip().is_loopback() && !config.auth.allow_open {
            return Err(ServerError::OpenOnNetwork(config.server.http));
        }
        let guards = Arc::new(crate::guard::Guards::new(&config)?);
        guards.spawn_sweeper(shutdown.clone());
        let inbox = Inbox::new(store.clone(), inbox_store.clone());
        inbox.spawn_listener(&hub, shutdown.clone());
        sink.attach(inbox.clone(), mqtt.clone());
        let tracker = tokio_util::task::TaskTracker::new();
        let outbound = Outbound::start(
            &config,
            job_store,
            store.clone(),
            inbox_store,
            inbox.clone(),
            &hub,
            shutdown.clone(),
            tracker.clone(),
        )
        .await?;
        let state = Arc::new(AppState {
            config,
            store,
            hub,
            shutdown,
            ready: Default::default(),
            stats: crate::api::stats::Stats::new(),
            auth,
            inbox,
            mqtt,
            node,
            outbound,
            guards,
            metrics,
        });
        let mqtt = match state.config.server.mqtt.trim() {
            "" | "off" => None,
            addr => {
                let parsed: SocketAddr = addr
                    .parse()
                    .map_err(|_| ConfigError::Invalid(format!("[server] mqtt: '{addr}' is not an address")))?;
                if state.auth.is_open() && !parsed.ip().is_loopback() && !state.config.auth.allow_open {
                    return Err(ServerError::OpenOnNetwork(parsed));
                }
                Some(listen(parsed).map_err(|source| ServerError::Bind { addr: parsed, source })?)
            }
        };
        Ok(Server { state, listener, mqtt, outbound: tracker, metrics: metrics_listener })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// True when no credentials are configured (open development mode).
    pub fn is_open(&self) -> bool {
        self.state.auth.is_open()
    }

    /// The MQTT listener's address, when it is on.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The metrics listener's address, when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until shutdown, then waits (up to the grace period) for open
    /// requests to finish and closes the store.
    pub async fn run(self) -> Result<(), ServerError> {
        let Server { state, listener, mqtt, outbound, metrics } = self;
        // Every connection is tracked, so that shutdown waits for each to end
        // (an MQTT session stores its state then) before the store closes.
        let tracker = tokio_util::task::TaskTracker::new();
        if let Some(l) = mqtt {
            crate::transport::mqtt::spawn_tcp(state.clone(), l, tracker.clone());
        }
        if let Some(l) = metrics {
            tracker.spawn(crate::metrics::route::serve(l, state.clone()));
        }
        tracker.spawn(upkeep(state.clone()));
        let shutdown = state.shutdown.clone();
        let grace = state.config.server.shutdown_grace;
        state.ready.store(true, Ordering::Release);
        let front = crate::edge::front::serve(listener, state.clone(), shutdown.clone(), tracker.clone());
        front.await;
        // Shutdown: streams end by themselves (they listen to the token, and
        // idle ones wait on their mailbox, which closing the hub ends);
        // requests in flight get the grace period to finish.
        state.hub.close();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(?grace, "requests still open after the grace period; closing anyway");
        }
        // Outbound sends in flight end within their timeouts; one cut short
        // runs again after the restart (same delivery id).
        outbound.close();
        if tokio::time::timeout(grace, outbound.wait()).await.is_err() {
            tracing::warn!(
                ?grace,
                "outbound sends still running after the grace period; they run again at the next start"
            );
        }
        state.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// This node's name: `[server] node`, else the host name and HTTP port.
/// This process's node name once its server is bound: what every log line
/// after that names (see the binary's log formatter).
pub static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn node_name(config: &Config, port: u16) -> String {
    if !config.server.node.is_empty() {
        return config.server.node.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host = if host.is_empty() { "herald".to_owned() } else { host };
    format!("{host}:{port}")
}

type Stores = (Arc<dyn Store>, Arc<dyn InboxStore>, Arc<dyn BrokerStore>, Arc<dyn JobStore>);

/// Moves histogram samples into their buckets every few seconds, so they do
/// not pile up in memory when nobody scrapes.
async fn upkeep(state: Arc<AppState>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = every.tick() => state.metrics.upkeep(),
        }
    }
}

/// A listener with a deep accept backlog: thousands of clients reconnecting at
/// once (after a restart, or a load test) would overflow the default of 128
/// and wait a second per dropped SYN. The kernel caps it at `somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
