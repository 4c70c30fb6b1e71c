//! The guards: what keeps one client from slowing down everyone else, and a
//! channel free of what its operators do not allow (DESIGN.md, "Guarding the
//! server"). Transports call in at three points:
//! - each request (the front door's own answers and the router alike):
//!   [`Guards::check_request`], HTTP requests per client;
//! - each long-lived connection (SSE, iframe, waiting long poll, WebSocket,
//!   MQTT): [`Guards::admit`], the node's, the address's and the user's
//!   counts and new connections per address, holding a [`Permit`];
//! - each client-originated publish: [`Guards::check_publish`] (per
//!   connection and per user) and [`Guards::moderate`].
//!
//! Slow consumers are the transports' own: each bounds its writes by
//! [`Guards::write_timeout`]; a lagging subscription is closed past
//! [`Guards::max_lag`] (`subscription`).
//!
//! A client is its API key, else its JWT `sub`, else its address
//! (`address.rs`). Exempt addresses are never rate or connection limited, and
//! API keys are not unless `[limits] api_keys`. Every limit is this node's
//! own (see `rate.rs` for the seam of a cluster-wide one).

pub mod address;
pub mod connections;
pub mod hook;
pub(crate) mod http;
pub mod moderation;
pub mod rate;
pub mod rules;

use std::{
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::http::StatusCode;
use herald_core::{Data, Principal};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use self::{
    address::AddressPolicy,
    connections::{Connections, Full},
    moderation::Moderation,
    rate::{Gcra, Keyed, Limiter},
};
pub use self::{
    address::{AddrKey, Peer},
    connections::Permit,
    moderation::Publish,
};
use crate::{
    config::{Config, ConfigError},
    edge::error::ApiError,
};

/// A request's or connection's client as the limits see it: its address
/// key, `None` when exempt. The default (no front door, as in the router's
/// own tests) is exempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Client {
    pub addr: Option<AddrKey>,
}

/// Who a credential says the client is, as a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// No credential (open development mode), or one that failed: the address.
    Anonymous,
    User(u64),
    ApiKey(u64),
}

/// How often idle clients are forgotten by the keyed limiters.
const SWEEP: Duration = Duration::from_secs(5);

pub struct Guards {
    pub address: AddressPolicy,
    requests: Option<Box<dyn Limiter>>,
    connection_rate: Option<Box<dyn Limiter>>,
    publish_per_user: Option<Box<dyn Limiter>>,
    /// Per connection; each connection keeps its state in a `u64`.
    publish_per_connection: Option<Gcra>,
    /// Publishes refused in a row that make a flood (close `4029`, MQTT `0x96`).
    pub flood_after: u32,
    connections: Arc<Connections>,
    node_max: usize,
    count_retry: Duration,
    limit_api_keys: bool,
    write_timeout: Option<Duration>,
    max_lag: Option<Duration>,
    moderation: Moderation,
    pub stats: GuardStats,
    /// Keys users and API keys (hashed: limiters hold a `u64`, not a string).
    hasher: std::hash::RandomState,
    /// The configured limits, for refusals' messages.
    described: Described,
}

struct Described {
    requests: String,
    connection_rate: String,
    per_connection: String,
    per_user: String,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node is full: `503 server_busy`, MQTT `0x89`.
    Busy(Duration),
    /// Too many new connections from the address: `429 rate_limited`, MQTT `0x9F`.
    Rate(Duration),
    /// Too many open from the address or the user: `429 too_many_connections`, MQTT `0x97`.
    Count(Full, Duration),
}

/// Why a publish was refused by a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// This connection's own rate: `rate_limited`.
    Connection(Duration),
    /// The user's, over all their connections: `quota_exceeded`.
    User(Duration),
}

impl Limited {
    pub fn wait(self) -> Duration {
        match self {
            Limited::Connection(w) | Limited::User(w) => w,
        }
    }
}

impl Guards {
    /// Checks the guards' settings (addresses, rules, the webhook) without
    /// building anything that lasts: what configuration loading does.
    pub fn check(config: &Config) -> Result<(), ConfigError> {
        AddressPolicy::new(&config.limits.trusted_proxies, &config.limits.exempt).map_err(ConfigError::Invalid)?;
        rules::Rules::new(&config.moderation.rules).map_err(ConfigError::Invalid)?;
        hook::Hook::check(&config.moderation.webhook).map_err(ConfigError::Invalid)?;
        Ok(())
    }

    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let l = &config.limits;
        let cap = l.max_tracked.max(1);
        let keyed = |rate, burst| Keyed::new(rate, burst, cap).map(|k| Box::new(k) as Box<dyn Limiter>);
        let address = AddressPolicy::new(&l.trusted_proxies, &l.exempt).map_err(ConfigError::Invalid)?;
        let moderation = Moderation::new(&config.moderation).map_err(ConfigError::Invalid)?;
        let c = &l.connections;
        let p = &l.publish;
        let describe = |rate: crate::config::Rate, burst: u32| format!("{rate}, burst {burst}");
        Ok(Guards {
            address,
            requests: keyed(l.requests.rate, l.requests.burst),
            // The burst of new connections is the rate's own count ("20/s": 20 at once).
            connection_rate: keyed(c.rate_per_ip, c.rate_per_ip.count),
            publish_per_user: keyed(p.per_user, p.burst),
            publish_per_connection: Gcra::new(p.per_connection, p.burst),
            flood_after: p.burst.max(1),
            connections: Connections::new(c.per_ip, c.per_user),
            node_max: c.max,
            count_retry: c.retry_after.max(Duration::from_millis(1)),
            limit_api_keys: l.api_keys,
            write_timeout: (!l.write_timeout.is_zero()).then_some(l.write_timeout),
            max_lag: (!l.max_lag.is_zero()).then_some(l.max_lag),
            moderation,
            stats: GuardStats::default(),
            hasher: Default::default(),
            described: Described {
                requests: describe(l.requests.rate, l.requests.burst),
                connection_rate: c.rate_per_ip.to_string(),
                per_connection: describe(p.per_connection, p.burst),
                per_user: describe(p.per_user, p.burst),
            },
        })
    }

    /// Forgets idle clients every few seconds, until `shutdown`.
    pub fn spawn_sweeper(self: &Arc<Self>, shutdown: CancellationToken) {
        let guards = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(g) = guards.upgrade() else { return };
                for l in [&g.requests, &g.connection_rate, &g.publish_per_user].into_iter().flatten() {
                    l.forget_idle();
                }
            }
        });
    }

    /// A stalled write closes its connection after this (`None`: never).
    pub fn write_timeout(&self) -> Option<Duration> {
        self.write_timeout
    }

    /// A lagged subscriber this far behind is closed (`None`: never).
    pub fn max_lag(&self) -> Option<Duration> {
        self.max_lag
    }

    /// Who `principal`, authenticated from `credential`, is. An admin with a
    /// credential holds an API key; one without is open mode's anonymous.
    pub fn who(&self, principal: &Principal, credential: Option<&str>) -> Who {
        match (principal.user(), credential) {
            (Some(sub), _) => Who::User(self.hasher.hash_one(("user", sub))),
            (None, Some(key)) => Who::ApiKey(self.hasher.hash_one(("key", key))),
            (None, None) => Who::Anonymous,
        }
    }

    /// The key a rate counts `who` from `client` under; `None`: not limited.
    fn key(&self, client: Client, who: Who) -> Option<u64> {
        let addr = client.addr?;
        match who {
            Who::ApiKey(_) if !self.limit_api_keys => None,
            Who::User(k) | Who::ApiKey(k) => Some(k),
            Who::Anonymous => Some(self.hasher.hash_one(("addr", addr.get()))),
        }
    }

    /// One plain HTTP request.
    pub fn check_request(&self, client: Client, who: Who) -> Result<(), ApiError> {
        let (Some(limiter), Some(key)) = (&self.requests, self.key(client, who)) else { return Ok(()) };
        limiter.check(key).map_err(|wait| {
            self.stats.requests_limited.fetch_add(1, Ordering::Relaxed);
            rate_limited("requests", format!("too many requests (limit {})", self.described.requests), wait)
        })
    }

    /// A long-lived connection, given how many the node has open now.
    /// `new_connection`: it counts against new connections per address (not
    /// a long poll: a poller's next request is not a new connection).
    pub fn admit(&self, client: Client, who: Who, open: usize, new_connection: bool) -> Result<Permit, Refused> {
        let Some(addr) = client.addr else { return Ok(Permit::none()) };
        let user = match who {
            Who::ApiKey(_) if !self.limit_api_keys => return Ok(Permit::none()),
            Who::User(k) | Who::ApiKey(k) => Some(k),
            Who::Anonymous => None,
        };
        let s = &self.stats;
        if self.node_max > 0 && open >= self.node_max {
            let n = s.refused_busy.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Busy(self.jittered(n)));
        }
        if let Some(l) = self.connection_rate.as_ref().filter(|_| new_connection)
            && let Err(wait) = l.check(self.hasher.hash_one(("conn", addr.get())))
        {
            s.refused_rate.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Rate(wait));
        }
        self.connections.acquire(Some(addr.get()), user).map_err(|full| {
            let n = match full {
                Full::Address => s.refused_per_ip.fetch_add(1, Ordering::Relaxed),
                Full::User => s.refused_per_user.fetch_add(1, Ordering::Relaxed),
            };
            Refused::Count(full, self.jittered(n))
        })
    }

    /// `[limits.connections] retry_after`, plus up to half again: a count
    /// has no schedule of its own, and clients refused together (a node
    /// full after a restart) should not all come back at the same moment.
    fn jittered(&self, n: u64) -> Duration {
        let spread = (self.count_retry.as_millis() as u64 / 2).max(1);
        let extra = self.hasher.hash_one(("retry", n, rate::now())) % spread;
        self.count_retry + Duration::from_millis(extra)
    }

    /// What a WebSocket or MQTT connection keeps for the guards, given its
    /// place in the counts.
    pub fn connection_guard<X: Default>(&self, permit: Permit, client: Client, who: Who) -> ConnGuard<X> {
        match self.key(client, who) {
            None if permit.is_none() => ConnGuard(None),
            key => ConnGuard(Some(Box::new(Guarded {
                _permit: permit,
                publishing: PublishState { key, tat: 0, strikes: 0 },
                extra: X::default(),
            }))),
        }
    }

    /// One client-originated publish; `connection`: the connection's own
    /// GCRA state (WebSocket, MQTT), `None` over plain HTTP.
    pub fn check_publish(&self, client: Client, who: Who, connection: Option<&mut u64>) -> Result<(), Limited> {
        match self.key(client, who) {
            Some(key) => self.check_keyed_publish(key, connection),
            None => Ok(()),
        }
    }

    fn check_keyed_publish(&self, key: u64, connection: Option<&mut u64>) -> Result<(), Limited> {
        if let (Some(gcra), Some(tat)) = (&self.publish_per_connection, connection)
            && let Err(wait) = gcra.check(tat, rate::now())
        {
            self.stats.publishes_limited_connection.fetch_add(1, Ordering::Relaxed);
            return Err(Limited::Connection(wait));
        }
        if let Some(l) = &self.publish_per_user
            && let Err(wait) = l.check(key)
        {
            self.stats.publishes_limited_user.fetch_add(1, Ordering::Relaxed);
            return Err(Limited::User(wait));
        }
        Ok(())
    }

    /// A publish refusal as an answer: `429 rate_limited` or `quota_exceeded`.
    pub fn publish_error(&self, limited: Limited) -> ApiError {
        match limited {
            Limited::Connection(wait) => rate_limited(
                "publish_per_connection",
                format!("too many publishes on this connection (limit {})", self.described.per_connection),
                wait,
            ),
            Limited::User(wait) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                format!("too many publishes by this user (limit {})", self.described.per_user),
            )
            .with_field("limit", "publish_per_user")
            .with_retry_after(wait),
        }
    }

    /// A connection refusal as an answer.
    pub fn connection_error(&self, refused: Refused) -> ApiError {
        match refused {
            Refused::Busy(wait) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", "this server is full; try again later")
                    .with_field("limit", "connections")
                    .with_retry_after(wait)
            }
            Refused::Rate(wait) => rate_limited(
                "connection_rate",
                format!("too many new connections from this address (limit {})", self.described.connection_rate),
                wait,
            ),
            Refused::Count(full, wait) => {
                let (limit, whose) = match full {
                    Full::Address => ("connections_per_ip", "this address"),
                    Full::User => ("connections_per_user", "this user"),
                };
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    format!("{whose} has as many connections open as it may; close one or try again later"),
                )
                .with_field("limit", limit)
                .with_retry_after(wait)
            }
        }
    }

    /// Moderates one client publish: the data to store, or why not.
    pub async fn moderate(&self, p: &Publish<'_>, data: Data) -> Result<Data, moderation::Refused> {
        self.moderation.check(&self.stats, p, data).await
    }

    /// The `guards` object of `/api/stats`.
    pub fn stats_json(&self) -> Value {
        let tracked = |l: &Option<Box<dyn Limiter>>| l.as_ref().map_or(0, |l| l.tracked());
        let (addresses, users) = self.connections.tracked();
        let mut v = self.stats.json();
        v["tracked"] = json!({
            "requests": tracked(&self.requests),
            "connection_rate": tracked(&self.connection_rate),
            "publish_per_user": tracked(&self.publish_per_user),
            "connection_addresses": addresses,
            "connection_users": users,
        });
        v
    }
}

/// What a WebSocket or MQTT connection keeps for the guards, in one
/// pointer: its place in the connection counts, its publishes' rate state,
/// and `X`, the transport's own (MQTT: a publish held, a pause). For a
/// client no limit applies to (an exempt address, an API key) it is `None`:
/// nothing at all, so the connections of a load test or a local proxy cost
/// what they did before the guards.
#[derive(Debug, Default)]
pub struct ConnGuard<X = ()>(Option<Box<Guarded<X>>>);

#[derive(Debug)]
struct Guarded<X> {
    _permit: Permit,
    publishing: PublishState,
    extra: X,
}

#[derive(Debug)]
struct PublishState {
    /// The client's key; `None`: publishes not limited.
    key: Option<u64>,
    /// This connection's GCRA state (`rate::Gcra`).
    tat: u64,
    /// Signs of a flood in a row (refusals on WebSocket, reads paused with
    /// more waiting on MQTT).
    strikes: u32,
}

impl<X> ConnGuard<X> {
    /// One publish on the connection: its own rate, then its user's.
    pub fn check_publish(&mut self, guards: &Guards) -> Result<(), Limited> {
        match self.0.as_deref_mut() {
            Some(Guarded { publishing: PublishState { key: Some(key), tat, .. }, .. }) => {
                guards.check_keyed_publish(*key, Some(tat))
            }
            _ => Ok(()),
        }
    }

    /// Counts one more sign of a flood: `true` once there have been
    /// `flood_after` in a row.
    pub fn strike(&mut self, flood_after: u32) -> bool {
        self.0.as_deref_mut().is_some_and(|g| {
            g.publishing.strikes += 1;
            g.publishing.strikes >= flood_after
        })
    }

    /// The client is within its limits again.
    pub fn calm(&mut self) {
        if let Some(g) = self.0.as_deref_mut() {
            g.publishing.strikes = 0;
        }
    }

    /// The transport's own state; there whenever a limit applies.
    pub fn extra(&mut self) -> Option<&mut X> {
        self.0.as_deref_mut().map(|g| &mut g.extra)
    }
}

fn rate_limited(limit: &'static str, message: String, wait: Duration) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        .with_field("limit", limit)
        .with_retry_after(wait)
}

/// The guards' counters, for `/api/stats` (and `/metrics` once it exists).
#[derive(Default)]
pub struct GuardStats {
    pub requests_limited: AtomicU64,
    pub refused_busy: AtomicU64,
    pub refused_rate: AtomicU64,
    pub refused_per_ip: AtomicU64,
    pub refused_per_user: AtomicU64,
    pub publishes_limited_connection: AtomicU64,
    pub publishes_limited_user: AtomicU64,
    /// Connections closed for a sustained publish flood.
    pub floods_closed: AtomicU64,
    /// Connections closed by the write timeout.
    pub slow_consumers: AtomicU64,
    /// Subscriptions closed past `max_lag`.
    pub lagging_closed: AtomicU64,
    rejected: [AtomicU64; RULES.len()],
    masked: [AtomicU64; RULES.len()],
    pub webhook: WebhookStats,
}

#[derive(Default)]
pub struct WebhookStats {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub modified: AtomicU64,
    /// No usable answer (timeout, unreachable, a bad answer).
    pub errors: AtomicU64,
    /// ... then let through (`on_error = "accept"`).
    pub failed_open: AtomicU64,
    /// ... then refused (`on_error = "reject"`).
    pub failed_closed: AtomicU64,
}

/// The checks a rejection or a mask is counted under (the webhook masks
/// nothing: it modifies).
const RULES: [&str; 5] = ["words", "pattern", "links", "length", "webhook"];

impl GuardStats {
    /// Per moderation check: its name, publishes it rejected, and those it
    /// masked (`None` for the webhook).
    pub fn per_rule(&self) -> impl Iterator<Item = (&'static str, u64, Option<u64>)> + '_ {
        RULES.iter().enumerate().map(|(i, rule)| {
            let masked = (*rule != "webhook").then(|| self.masked[i].load(Ordering::Relaxed));
            (*rule, self.rejected[i].load(Ordering::Relaxed), masked)
        })
    }

    fn rejected(&self, rule: &str) {
        if let Some(i) = RULES.iter().position(|r| *r == rule) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn masked(&self, rule: &str) {
        if let Some(i) = RULES.iter().position(|r| *r == rule) {
            self.masked[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn json(&self) -> Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rejected: serde_json::Map<String, Value> =
            self.per_rule().map(|(rule, count, _)| (rule.to_owned(), json!(count))).collect();
        let masked: serde_json::Map<String, Value> =
            self.per_rule().filter_map(|(rule, _, count)| Some((rule.to_owned(), json!(count?)))).collect();
        let w = &self.webhook;
        json!({
            "requests_limited": n(&self.requests_limited),
            "connections_refused": {
                "busy": n(&self.refused_busy),
                "rate": n(&self.refused_rate),
                "per_ip": n(&self.refused_per_ip),
                "per_user": n(&self.refused_per_user),
            },
            "publishes_limited": {
                "per_connection": n(&self.publishes_limited_connection),
                "per_user": n(&self.publishes_limited_user),
            },
            "floods_closed": n(&self.floods_closed),
            "slow_consumers_closed": n(&self.slow_consumers),
            "lagging_closed": n(&self.lagging_closed),
            "moderation": {
                "rejected": rejected,
                "masked": masked,
                "webhook": {
                    "accepted": n(&w.accepted),
                    "rejected": n(&w.rejected),
                    "modified": n(&w.modified),
                    "errors": n(&w.errors),
                    "failed_open": n(&w.failed_open),
                    "failed_closed": n(&w.failed_closed),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn guards(toml: &str) -> Guards {
        Guards::new(&Config::from_toml(toml).unwrap()).unwrap()
    }

    fn client(ip: &str) -> Client {
        Client { addr: Some(AddrKey::of(ip.parse::<IpAddr>().unwrap())) }
    }

    #[test]
    fn requests_are_limited_per_client_and_never_for_exempt_or_api_keys() {
        let g = guards("[limits.requests]\nrate = \"1/m\"\nburst = 2\n");
        let a = client("192.0.2.1");
        for _ in 0..2 {
            g.check_request(a, Who::Anonymous).unwrap();
        }
        let e = g.check_request(a, Who::Anonymous).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (429, "rate_limited"));
        assert!(e.retry_after().unwrap() > Duration::from_secs(29), "{:?}", e.retry_after());
        assert_eq!(e.json()["limit"], "requests");
        g.check_request(client("192.0.2.2"), Who::Anonymous).expect("another address");
        // A user is keyed by user, whatever address it comes from.
        let alice = Who::User(7);
        g.check_request(a, alice).unwrap();
        g.check_request(client("198.51.100.1"), alice).unwrap();
        assert!(g.check_request(client("203.0.113.1"), alice).is_err());
        for _ in 0..10 {
            g.check_request(Client::default(), Who::Anonymous).expect("exempt");
            g.check_request(a, Who::ApiKey(1)).expect("API keys are not limited by default");
        }
        assert_eq!(g.stats.requests_limited.load(Ordering::Relaxed), 2);
        let g = guards("[limits]\napi_keys = true\n[limits.requests]\nrate = \"1/m\"\nburst = 1\n");
        g.check_request(a, Who::ApiKey(1)).unwrap();
        assert!(g.check_request(a, Who::ApiKey(1)).is_err(), "unless configured");
    }

    #[test]
    fn connections_are_admitted_by_node_rate_address_and_user() {
        let g = guards(
            "[limits.connections]\nmax = 10\nper_ip = 2\nper_user = 1\nrate_per_ip = \"3/m\"\nretry_after = \"7s\"\n",
        );
        let a = client("192.0.2.1");
        let waits = |r: Refused| match r {
            Refused::Busy(w) | Refused::Count(_, w) => {
                (Duration::from_secs(7)..Duration::from_millis(10_500)).contains(&w)
            }
            Refused::Rate(_) => false,
        };
        assert!(matches!(g.admit(a, Who::Anonymous, 10, true), Err(r @ Refused::Busy(_)) if waits(r)));
        let p1 = g.admit(a, Who::Anonymous, 0, true).unwrap();
        let _p2 = g.admit(a, Who::Anonymous, 0, true).unwrap();
        let e = g.admit(a, Who::Anonymous, 0, true).unwrap_err();
        assert!(matches!(e, Refused::Count(Full::Address, _)) && waits(e), "{e:?}");
        assert_eq!(g.connection_error(e).code, "too_many_connections");
        drop(p1);
        assert!(matches!(g.admit(a, Who::Anonymous, 0, true), Err(Refused::Rate(_))), "the fourth in a minute");
        let b = client("192.0.2.2");
        let _u = g.admit(b, Who::User(1), 0, true).unwrap();
        assert_eq!(
            g.admit(client("192.0.2.3"), Who::User(1), 0, false)
                .err()
                .map(|r| matches!(r, Refused::Count(Full::User, _))),
            Some(true)
        );
        assert!(g.admit(Client::default(), Who::User(1), 100, true).is_ok(), "exempt addresses are never refused");
        let stats = g.stats_json();
        assert_eq!(stats["connections_refused"], json!({"busy":1,"rate":1,"per_ip":1,"per_user":1}));
    }

    #[test]
    fn publishes_are_limited_per_connection_then_per_user() {
        let g = guards("[limits.publish]\nper_connection = \"1/m\"\nper_user = \"1/m\"\nburst = 2\n");
        let a = client("192.0.2.1");
        let (mut c1, mut c2, mut c3) = (0, 0, 0);
        let mut exempt: ConnGuard = g.connection_guard(Permit::none(), Client::default(), Who::User(1));
        assert!(exempt.0.is_none(), "an exempt connection keeps nothing");
        assert!(exempt.check_publish(&g).is_ok());
        let mut on_a: ConnGuard = g.connection_guard(Permit::none(), a, Who::User(9));
        for _ in 0..2 {
            on_a.check_publish(&g).unwrap();
        }
        assert!(matches!(on_a.check_publish(&g), Err(Limited::Connection(_))));
        assert!(!on_a.strike(2) && on_a.strike(2), "the second strike in a row is a flood");
        g.check_publish(a, Who::User(1), Some(&mut c1)).unwrap();
        g.check_publish(a, Who::User(1), Some(&mut c1)).unwrap();
        assert!(matches!(g.check_publish(a, Who::User(1), Some(&mut c1)), Err(Limited::Connection(_))));
        assert!(matches!(g.check_publish(a, Who::User(1), Some(&mut c2)), Err(Limited::User(_))));
        assert_eq!(g.publish_error(Limited::User(Duration::from_secs(1))).code, "quota_exceeded");
        g.check_publish(a, Who::User(2), Some(&mut c3)).expect("another user");
        g.check_publish(a, Who::ApiKey(3), Some(&mut c1)).expect("API keys are not limited by default");
        g.check_publish(Client::default(), Who::User(1), Some(&mut c1)).expect("exempt");
    }
}
