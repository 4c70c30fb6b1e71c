//! Configuration: defaults, then `herald.toml`, then `HERALD_*` variables, then
//! command-line flags, each overriding the one before.
//!
//! Every key is documented in `herald.sample.toml` at the repository root; a test
//! checks the sample parses and names every key this module knows. Environment
//! variables are `HERALD_` + section + `_` + key (`[history] size` is
//! `HERALD_HISTORY_SIZE`); lists are comma-separated.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use herald_core::{Filter, Retention, RetentionRules};
use serde::{Deserialize, Serialize};

/// Sections that may be set from the environment. Anything else with the
/// `HERALD_` prefix (such as `HERALD_LOG`) is not configuration.
#[rustfmt::skip] // grouped by concern, one line each
const SECTIONS: &[&str] = &[
    "server", "store", "history", "limits", "sse", "longpoll", "ws", "auth", "mqtt", // the core
    "redis",                                                                         // several nodes
    "fallback", "webhooks", "smtp", "jobs",                                          // outbound delivery
    "moderation",                                                                    // the guards (`guard/`)
    "metrics",                                                                       // operations
];

/// Tables inside a section that the environment may set too, with their keys:
/// `HERALD_LIMITS_REQUESTS_RATE` is `[limits.requests] rate`. Listed key by
/// key, because `HERALD_LIMITS_PUBLISH_CHANNELS` is `[limits] publish_channels`.
const NESTED: &[(&str, &str, &[&str])] = &[
    ("limits", "requests", &["rate", "burst"]),
    ("limits", "connections", &["max", "per_ip", "per_user", "rate_per_ip", "retry_after"]),
    ("limits", "publish", &["per_connection", "per_user", "burst"]),
    ("moderation", "webhook", &["url", "secret", "timeout", "on_error", "channels"]),
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub history: HistoryConfig,
    pub limits: LimitsConfig,
    pub sse: SseConfig,
    pub longpoll: LongPollConfig,
    pub ws: WsConfig,
    pub auth: AuthConfig,
    pub mqtt: MqttConfig,
    pub redis: RedisConfig,
    // Outbound delivery (`outbound/`).
    pub fallback: FallbackConfig,
    pub webhooks: WebhooksConfig,
    pub smtp: SmtpConfig,
    pub jobs: JobsConfig,
    // The guards (`guard/`); their limits are in `limits`.
    pub moderation: ModerationConfig,
    // Operations.
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP listen address (all HTTP transports, the API and the demo pages).
    pub http: SocketAddr,
    /// MQTT listen address (TCP; MQTT over WebSocket is at `/mqtt` on `http`); `off` disables it.
    pub mqtt: String,
    /// Directory of the embedded store.
    pub data: PathBuf,
    /// Keep everything in memory instead (nothing survives a restart).
    pub memory: bool,
    /// How long a graceful shutdown waits for open requests before giving up.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Origins whose pages may call the API from a browser (CORS); `*` is any.
    #[serde(deserialize_with = "list")]
    pub cors_origins: Vec<String>,
    /// This node's name in logs and `/api/stats` ("": the host name and
    /// the HTTP port).
    pub node: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: "127.0.0.1:8080".parse().expect("valid address"),
            mqtt: "127.0.0.1:1883".into(),
            data: "herald-data".into(),
            memory: false,
            shutdown_grace: Duration::from_secs(10),
            cors_origins: vec!["*".into()],
            node: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncSetting {
    #[default]
    Normal,
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `normal`: an acknowledged message survives the process being killed.
    /// `full`: it also survives a power cut (fsync on every commit).
    pub sync: SyncSetting,
    /// Most messages written in one transaction (group commit).
    pub max_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { sync: SyncSetting::Normal, max_batch: 1024 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Messages kept per channel (0 = none, live only).
    pub size: u64,
    /// Age limit of kept messages ("0" = no age limit).
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Per-pattern overrides, first match wins.
    pub rules: Vec<HistoryRule>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { size: 1000, ttl: Duration::from_secs(24 * 3600), rules: Vec::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// A channel filter in MQTT syntax (`chat/room/+`, `news/#`).
    pub pattern: String,
    pub size: Option<u64>,
    #[serde(default, with = "opt_duration")]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest payload accepted by a publish, in bytes ("64KiB" also works).
    #[serde(with = "bytesize")]
    pub max_payload: usize,
    /// Messages queued per subscriber before it is marked lagged and catches up
    /// from the store instead.
    pub subscriber_queue: usize,
    /// Most messages one poll answer carries.
    pub poll_limit: usize,
    /// Most channels one `POST /api/publish` may name.
    pub publish_channels: usize,

    // The guards (`guard/`): rate and connection limits, slow consumers.
    /// A write that makes no progress for this long closes the connection
    /// (a slow consumer); "0" never.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// A lagged subscriber whose oldest undelivered message is older than
    /// this is closed instead of catching up from the store; "0" never.
    #[serde(with = "duration")]
    pub max_lag: Duration,
    /// Addresses (CIDRs) whose `X-Forwarded-For` is believed.
    #[serde(deserialize_with = "list")]
    pub trusted_proxies: Vec<String>,
    /// Client addresses (CIDRs) never rate or connection limited.
    #[serde(deserialize_with = "list")]
    pub exempt: Vec<String>,
    /// Rate and connection limits apply to API-key calls too (keyed by key).
    pub api_keys: bool,
    /// Most clients each keyed limiter tracks; past it, new clients share
    /// one bucket until idle ones are forgotten.
    pub max_tracked: usize,
    pub requests: RequestLimits,
    pub connections: ConnectionLimits,
    pub publish: PublishLimits,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_payload: 64 * 1024,
            subscriber_queue: 1024,
            poll_limit: 1000,
            publish_channels: 100,
            write_timeout: Duration::from_secs(10),
            max_lag: Duration::ZERO,
            trusted_proxies: Vec::new(),
            exempt: vec!["127.0.0.0/8".into(), "::1/128".into()],
            api_keys: false,
            max_tracked: 100_000,
            requests: RequestLimits::default(),
            connections: ConnectionLimits::default(),
            publish: PublishLimits::default(),
        }
    }
}

/// `[limits.requests]`: plain HTTP requests per client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestLimits {
    pub rate: Rate,
    pub burst: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { rate: Rate::per(50, Duration::from_secs(1)), burst: 200 }
    }
}

/// `[limits.connections]`: long-lived connections (SSE, iframe, WebSocket,
/// MQTT, waiting long polls). `0` is no limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// The whole node.
    pub max: usize,
    pub per_ip: usize,
    pub per_user: usize,
    /// New connections per address.
    pub rate_per_ip: Rate,
    /// The wait a client refused for a connection count is told.
    #[serde(with = "duration")]
    pub retry_after: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 0,
            per_ip: 1000,
            per_user: 100,
            rate_per_ip: Rate::per(20, Duration::from_secs(1)),
            retry_after: Duration::from_secs(5),
        }
    }
}

/// `[limits.publish]`: client-originated publishes (JWT users over HTTP,
/// WebSocket and MQTT; API keys when `[limits] api_keys`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishLimits {
    pub per_connection: Rate,
    pub per_user: Rate,
    pub burst: u32,
}

impl Default for PublishLimits {
    fn default() -> Self {
        PublishLimits {
            per_connection: Rate::per(10, Duration::from_secs(1)),
            per_user: Rate::per(20, Duration::from_secs(1)),
            burst: 50,
        }
    }
}

/// A rate: `count` per `period` ("50/s", "20/m", "1/10s"); `0` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    pub const OFF: Rate = Rate { count: 0, period: Duration::ZERO };

    pub const fn per(count: u32, period: Duration) -> Rate {
        Rate { count, period }
    }

    pub fn is_off(&self) -> bool {
        self.count == 0 || self.period.is_zero()
    }

    /// The time one more event's token takes to come back.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }

    /// Parses "50/s", "20/m", "100/h", "1/10s" (any duration after the
    /// slash), or "0".
    pub fn parse(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Rate::OFF);
        }
        let (count, per) =
            s.split_once('/').ok_or_else(|| format!("'{s}' is not a rate like \"50/s\", \"20/m\" or \"0\""))?;
        let count: u32 = count.trim().parse().map_err(|_| format!("'{s}': the count must be a whole number"))?;
        let per = per.trim();
        // "s", "m", "h" alone are one of the unit.
        let period = match per {
            "s" | "m" | "h" | "d" => parse_duration(&format!("1{per}"))?,
            _ => parse_duration(per)?,
        };
        if count > 0 && period.is_zero() {
            return Err(format!("'{s}': the period must be longer than 0"));
        }
        Ok(Rate { count, period })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_off() {
            return f.write_str("0");
        }
        match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.period.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.period.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{}", self.count, format_duration(&self.period)),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => Rate::parse(&s).map_err(serde::de::Error::custom),
            StrOrNum::Int(0) => Ok(Rate::OFF),
            _ => Err(serde::de::Error::custom("a rate is a string like \"50/s\", or 0")),
        }
    }
}

/// `[moderation]`: what client-originated publishes may carry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationConfig {
    /// Moderate publishes made with an API key too.
    pub api_keys: bool,
    /// Per channel pattern; the first rule whose channels match applies.
    pub rules: Vec<ModerationRule>,
    pub webhook: ModerationWebhook,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerationRule {
    /// Channel filters (MQTT syntax) the rule covers.
    pub channels: Vec<String>,
    /// Words refused (whole words, any case; a word with CJK characters
    /// matches anywhere, as CJK text has no spaces between words).
    #[serde(default)]
    pub words: Vec<String>,
    /// Regular expressions refused.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Most links a message may carry; 0 is no limit.
    #[serde(default)]
    pub max_links: usize,
    /// Most characters of text a message may carry; 0 is no limit.
    #[serde(default)]
    pub max_chars: usize,
    #[serde(default)]
    pub action: RuleAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Refuse the publish (`422 content_rejected`).
    #[default]
    Reject,
    /// Store it with what broke the rule masked (`*`), links past the limit
    /// masked, and text past the length cut.
    Mask,
}

/// `[moderation.webhook]`: the operator's service, asked after the rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationWebhook {
    /// Empty: no webhook.
    pub url: String,
    /// `whsec_...`: every request is signed (Standard Webhooks).
    pub secret: String,
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// What a failed call (timeout, refused connection, a bad answer) means.
    pub on_error: OnError,
    /// Channel filters whose publishes go to the webhook.
    #[serde(deserialize_with = "list")]
    pub channels: Vec<String>,
}

impl Default for ModerationWebhook {
    fn default() -> Self {
        ModerationWebhook {
            url: String::new(),
            secret: String::new(),
            timeout: Duration::from_secs(1),
            on_error: OnError::Reject,
            channels: vec!["#".into()],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail closed: the publish is refused (`503 moderation_unavailable`).
    #[default]
    Reject,
    /// Fail open: the publish goes through unchecked by the webhook.
    Accept,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Comment line sent when a stream has been quiet this long.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// The `retry:` the browser waits before reconnecting.
    #[serde(with = "duration")]
    pub retry: Duration,
    /// Close streams after this long so clients reconnect ("0" = never).
    #[serde(with = "duration")]
    pub max_lifetime: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig { heartbeat: Duration::from_secs(15), retry: Duration::from_secs(3), max_lifetime: Duration::ZERO }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LongPollConfig {
    /// Cap on a long poll's `wait` (at most 120 s).
    #[serde(with = "duration")]
    pub max_wait: Duration,
}

impl Default for LongPollConfig {
    fn default() -> Self {
        LongPollConfig { max_wait: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// The server pings this often; a connection silent for two intervals is
    /// considered dead and closed.
    #[serde(with = "duration")]
    pub ping: Duration,
    /// Most channels and filters one connection may subscribe to.
    pub max_subscriptions: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig { ping: Duration::from_secs(30), max_subscriptions: 256 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest keep-alive a client may ask for; longer ones are cut to this
    /// and told so (MQTT 5 server keep-alive). "0" accepts any.
    #[serde(with = "duration")]
    pub max_keepalive: Duration,
    /// QoS 1 and 2 publishes a client may have unacknowledged towards us.
    pub receive_max: u16,
    /// QoS 1 and 2 messages we have in flight towards a client that set no
    /// receive maximum (MQTT 3).
    pub send_max: u16,
    /// Longest a disconnected persistent session is kept.
    #[serde(with = "duration")]
    pub session_expiry_max: Duration,
    /// Messages on non-channel topics queued for one session while it is
    /// offline or slow; beyond it the oldest are dropped.
    pub offline_queue: usize,
    /// Topic aliases a client may use towards us (MQTT 5).
    pub topic_alias_max: u16,
    /// Filters nobody may subscribe to (refused with 0x80/0x87).
    #[serde(deserialize_with = "list")]
    pub deny_subscribe: Vec<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_keepalive: Duration::ZERO,
            receive_max: 100,
            send_max: 100,
            session_expiry_max: Duration::from_secs(7 * 86_400),
            offline_queue: 1000,
            topic_alias_max: 16,
            deny_subscribe: Vec::new(),
        }
    }
}

/// Several nodes sharing Redis (`../shared/DESIGN.md`, "Storage and scale").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`; several (comma-separated) are
    /// client-side shards. Empty: the embedded store.
    #[serde(deserialize_with = "list")]
    pub url: Vec<String>,
    /// Every key starts with it: several deployments may share a Redis.
    pub prefix: String,
    /// Partitions channels are spread over; fixed for the data's life.
    pub partitions: u32,
    /// Longest wait for Redis; past it a publish is answered 503.
    #[serde(with = "duration")]
    pub timeout: std::time::Duration,
    /// Longest wait for a connection to Redis.
    #[serde(with = "duration")]
    pub connect_timeout: std::time::Duration,
    /// How often every partition's feed sequence is checked against what
    /// this node received.
    #[serde(with = "duration")]
    pub check_every: std::time::Duration,
    /// Recent feed messages Redis keeps per partition for nodes that missed some.
    pub feed_log: usize,
    /// `url` lists seed nodes of one Redis Cluster instead of shards.
    pub cluster: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: Vec::new(),
            prefix: "herald".into(),
            partitions: 16,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            check_every: Duration::from_secs(1),
            feed_log: 10_000,
            cluster: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address of its own, without credentials
    /// (keep it to the scraper), instead of on the HTTP address, where it
    /// needs an API key once auth is configured. Empty: the HTTP address.
    pub listen: String,
}

impl MetricsConfig {
    /// The address of its own, when one is set.
    pub fn address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match self.listen.trim() {
            "" => Ok(None),
            a => a
                .parse()
                .map(Some)
                .map_err(|_| ConfigError::Invalid(format!("[metrics] listen: '{a}' is not an address"))),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret that signs users' tokens.
    pub jwt_secret: String,
    /// RS256 or ES256 public key (PEM text, or the path of a PEM file).
    pub jwt_public_key: String,
    /// Keys for backend calls (`Authorization: Bearer KEY`): full access.
    #[serde(deserialize_with = "list")]
    pub api_keys: Vec<String>,
    /// Clock leeway applied to `exp` and `nbf`.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// Run without auth on a non-loopback address (same as `--allow-open`).
    pub allow_open: bool,
    /// When set, a token's `aud` must name it.
    pub audience: String,
    /// When set, a token's `iss` must be it.
    pub issuer: String,
}

impl AuthConfig {
    /// True when nothing is configured: open development mode.
    pub fn is_open(&self) -> bool {
        self.jwt_secret.is_empty() && self.jwt_public_key.is_empty() && self.api_keys.is_empty()
    }
}

// ---- Outbound delivery: unread fallback, webhooks, e-mail, durable jobs ----

/// An outbound channel a notification can be sent through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Webhook,
    Email,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Webhook => "webhook",
            Via::Email => "email",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "webhook" => Some(Via::Webhook),
            "email" => Some(Via::Email),
            _ => None,
        }
    }
}

/// How the fallback channels are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FallbackMethod {
    /// In order; the next only when the one before failed for good or cannot
    /// be used (no address, no endpoint).
    #[default]
    First,
    /// Every channel.
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    /// Send notifications still unread after `delay` through other channels.
    pub enabled: bool,
    /// How long a notification may stay unread before it is sent elsewhere.
    #[serde(with = "duration")]
    pub delay: Duration,
    /// The channels, in order.
    #[serde(deserialize_with = "vias")]
    pub channels: Vec<Via>,
    pub method: FallbackMethod,
    /// At most one send per user per interval; what falls due meanwhile goes
    /// together afterwards, as one digest.
    #[serde(with = "duration")]
    pub min_interval: Duration,
    /// Group and everyone notifications take part (members who have not read
    /// them are sent them).
    pub groups: bool,
    /// Waits between the attempts of every outbound send (webhook or e-mail);
    /// after the last, the job is dead.
    #[serde(with = "durations")]
    pub retry: Vec<Duration>,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            enabled: false,
            delay: Duration::from_secs(600),
            channels: vec![Via::Webhook, Via::Email],
            method: FallbackMethod::First,
            min_interval: Duration::from_secs(3600),
            groups: false,
            retry: [5, 300, 1800, 7200, 18_000, 36_000, 36_000].map(Duration::from_secs).to_vec(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where `notification.unread` events go ("" = no webhook channel).
    pub url: String,
    /// Its signing secret, `whsec_<base64>`.
    pub secret: String,
    /// How long one request may take.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Requests per endpoint ("N/s", "N/m", "N/h"; "0" = no limit).
    pub rate: SendRate,
    /// `message.published` forwarding rules (TOML only).
    pub channels: Vec<WebhookRule>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: String::new(),
            secret: String::new(),
            timeout: Duration::from_secs(10),
            rate: SendRate::per_second(50),
            channels: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRule {
    /// Channels whose messages are forwarded (MQTT filter syntax).
    pub pattern: String,
    pub url: String,
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// `smtp://host:port` (STARTTLS when offered... see the sample), `smtps://`
    /// for TLS from the start; "" = no e-mail channel.
    pub url: String,
    /// The sender.
    pub from: String,
    /// How long one delivery may take.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Mails per period to the relay ("0" = no limit).
    pub rate: SendRate,
    /// Templates of the subject and the plain-text body (`outbound/templates.rs`).
    pub subject: String,
    pub body: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            url: String::new(),
            from: "Herald <herald@localhost>".into(),
            timeout: Duration::from_secs(20),
            rate: SendRate::per_second(10),
            subject: "{{title}}{{#more}} (and {{more}} more){{/more}}".into(),
            body: "You have {{unread}} unread notifications.\n\n{{#notifications}}* {{title}}\n{{#body}}  {{body}}\n{{/body}}{{/notifications}}"
                .into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// How long a claimed job is a worker's; a crashed worker's job runs again
    /// after it (at once after a restart of the embedded store).
    #[serde(with = "duration")]
    pub lease: Duration,
    /// How often the reconciliation sweep rebuilds jobs missing from the store.
    #[serde(with = "duration")]
    pub sweep: Duration,
    /// Jobs run at the same time.
    pub workers: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig { lease: Duration::from_secs(60), sweep: Duration::from_secs(60), workers: 8 }
    }
}

/// A send rate: `count` per `per`; zero `count` = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRate {
    pub count: u32,
    pub per: Duration,
}

impl SendRate {
    pub const fn per_second(count: u32) -> Self {
        SendRate { count, per: Duration::from_secs(1) }
    }

    /// "10/s", "600/m", "1000/h"; "0" is no limit.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(SendRate { count: 0, per: Duration::from_secs(1) });
        }
        let bad = || format!("'{s}' is not a rate like 10/s, 600/m or 1000/h");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let count = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        Ok(SendRate { count, per: Duration::from_secs(per) })
    }
}

impl std::fmt::Display for SendRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.count, self.per.as_secs()) {
            (0, _) => f.write_str("0"),
            (n, 3600) => write!(f, "{n}/h"),
            (n, 60) => write!(f, "{n}/m"),
            (n, _) => write!(f, "{n}/s"),
        }
    }
}

impl Serialize for SendRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SendRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => SendRate::parse(&s).map_err(serde::de::Error::custom),
            StrOrNum::Int(0) => Ok(SendRate { count: 0, per: Duration::from_secs(1) }),
            _ => Err(serde::de::Error::custom("a rate is a string like \"10/s\"")),
        }
    }
}

/// Fallback channels from a list or a comma-separated string.
fn vias<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Via>, D::Error> {
    list(d)?
        .iter()
        .map(|s| {
            Via::parse(s).ok_or_else(|| serde::de::Error::custom(format!("'{s}' is not a channel (webhook or email)")))
        })
        .collect()
}

/// A list of durations from TOML, or comma-separated from the environment.
mod durations {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(d.iter().map(format_duration))
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        list(d)?.iter().map(|s| parse_duration(s).map_err(serde::de::Error::custom)).collect()
    }
}

impl Config {
    /// The outbound settings' own checks (values that parse but cannot work).
    fn validate_outbound(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.fallback.enabled && self.fallback.channels.is_empty() {
            return bad("[fallback] channels: name at least one of webhook, email".into());
        }
        let secret = |where_: &str, s: &str| {
            crate::webhook::Secret::parse(s)
                .map(drop)
                .map_err(|e| ConfigError::Invalid(format!("{where_} secret: {e}")))
        };
        if !self.webhooks.url.is_empty() {
            secret("[webhooks]", &self.webhooks.secret)?;
        }
        for rule in &self.webhooks.channels {
            Filter::parse(&rule.pattern)
                .map_err(|e| ConfigError::Invalid(format!("[[webhooks.channels]] pattern '{}': {e}", rule.pattern)))?;
            if rule.url.is_empty() {
                return bad(format!("[[webhooks.channels]] '{}' has no url", rule.pattern));
            }
            secret(&format!("[[webhooks.channels]] '{}'", rule.pattern), &rule.secret)?;
        }
        crate::outbound::email::check_config(&self.smtp).map_err(ConfigError::Invalid)?;
        if self.jobs.workers == 0 || self.jobs.sweep.is_zero() {
            return bad("[jobs] workers and sweep must be more than 0".into());
        }
        // A send must end well within its lease, or another worker could
        // claim the job while it is still being sent.
        let longest = self.webhooks.timeout.max(self.smtp.timeout);
        if self.jobs.lease < longest * 2 {
            return bad(format!(
                "[jobs] lease ({}) must be at least twice the longest send timeout ({})",
                format_duration(&self.jobs.lease),
                format_duration(&longest)
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: [history] rule pattern '{pattern}': {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Command-line overrides, applied last.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub http: Option<SocketAddr>,
    pub mqtt: Option<String>,
    pub data: Option<PathBuf>,
    pub memory: bool,
    pub allow_open: bool,
}

impl Config {
    /// Loads defaults, then `file` (or `./herald.toml` when it exists), then the
    /// environment, then `overrides`.
    pub fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => fig = fig.merge(Toml::file_exact(path)),
            None if std::path::Path::new("herald.toml").exists() => fig = fig.merge(Toml::file_exact("herald.toml")),
            None => {}
        }
        fig = fig.merge(env_provider());
        if let Some(v) = overrides.http {
            fig = fig.merge(Serialized::default("server.http", v));
        }
        if let Some(v) = &overrides.mqtt {
            fig = fig.merge(Serialized::default("server.mqtt", v));
        }
        if let Some(v) = &overrides.data {
            fig = fig.merge(Serialized::default("server.data", v));
        }
        if overrides.memory {
            fig = fig.merge(Serialized::default("server.memory", true));
        }
        if overrides.allow_open {
            fig = fig.merge(Serialized::default("auth.allow_open", true));
        }
        let config: Config = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text alone (no environment), as the sample-config test does.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.retention()?;
        if self.longpoll.max_wait > Duration::from_secs(120) {
            return Err(ConfigError::Invalid("[longpoll] max_wait is at most 120s".into()));
        }
        for (name, v) in [
            ("[limits] subscriber_queue", self.limits.subscriber_queue),
            ("[limits] poll_limit", self.limits.poll_limit),
            ("[ws] max_subscriptions", self.ws.max_subscriptions),
            ("[mqtt] receive_max", usize::from(self.mqtt.receive_max)),
            ("[mqtt] send_max", usize::from(self.mqtt.send_max)),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if !self.redis.url.is_empty() {
            if self.server.memory {
                return Err(ConfigError::Invalid("[server] memory and [redis] url exclude each other".into()));
            }
            if !(1..=16_384).contains(&self.redis.partitions) {
                return Err(ConfigError::Invalid("[redis] partitions is between 1 and 16384".into()));
            }
            if self.redis.timeout.is_zero() || self.redis.check_every.is_zero() || self.redis.feed_log == 0 {
                return Err(ConfigError::Invalid("[redis] timeout, check_every and feed_log must be above 0".into()));
            }
        }
        self.metrics.address()?;
        if self.ws.ping.is_zero() || self.sse.heartbeat.is_zero() {
            return Err(ConfigError::Invalid("[ws] ping and [sse] heartbeat must be longer than 0".into()));
        }
        // The guards' settings (CIDRs, rules, patterns, the webhook) are
        // checked by building them once.
        crate::guard::Guards::check(self)?;
        self.validate_outbound()
    }

    /// The history settings as the core's retention rules.
    pub fn retention(&self) -> Result<RetentionRules, ConfigError> {
        let ttl = |d: Duration| (!d.is_zero()).then_some(d.as_millis() as u64);
        let default = Retention { size: self.history.size, ttl_ms: ttl(self.history.ttl) };
        let mut rules = Vec::new();
        for rule in &self.history.rules {
            let filter = Filter::parse(&rule.pattern)
                .map_err(|e| ConfigError::Pattern { pattern: rule.pattern.clone(), reason: e.to_string() })?;
            let r = Retention { size: rule.size.unwrap_or(default.size), ttl_ms: rule.ttl.map_or(default.ttl_ms, ttl) };
            rules.push((filter, r));
        }
        Ok(RetentionRules { default, rules })
    }
}

/// `HERALD_SECTION_KEY` to `section.key`, for known sections only.
fn env_provider() -> Env {
    Env::prefixed("HERALD_").filter_map(|key| env_key(key.as_str()).map(Into::into))
}

/// The configuration key a variable (without `HERALD_`) sets, if any:
/// `HISTORY_SIZE` is `history.size`, `LIMITS_REQUESTS_RATE` is
/// `limits.requests.rate`.
fn env_key(var: &str) -> Option<String> {
    let key = var.to_ascii_lowercase();
    let (section, rest) = key.split_once('_')?;
    if !SECTIONS.contains(&section) {
        return None;
    }
    for (s, table, keys) in NESTED {
        if let Some(k) = rest.strip_prefix(table).and_then(|r| r.strip_prefix('_'))
            && *s == section
            && keys.contains(&k)
        {
            return Some(format!("{section}.{table}.{k}"));
        }
    }
    Some(format!("{section}.{rest}"))
}

/// Parses "500ms", "15s", "10m", "24h", "7d", "0", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration like 15s, 10m, 24h"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("'{s}' has an unknown unit (use ms, s, m, h or d)")),
    };
    // Checked: a number past what a Duration holds panicked here (found by
    // schemathesis through `GET /api/dev/token?ttl=`).
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is too long a duration"))
}

pub fn format_duration(d: &Duration) -> String {
    if d.subsec_millis() != 0 { format!("{}ms", d.as_millis()) } else { format!("{}s", d.as_secs()) }
}

/// Parses "65536", "64KiB", "64k", "1MiB", "1m".
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("'{s}' is not a size like 65536 or 64KiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("'{s}' has an unknown unit (use KiB or MiB)")),
    };
    Ok(n * mult)
}

/// A string or a number; figment hands environment values over as either.
#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    Str(String),
    Int(u64),
    Float(f64),
}

/// A list from TOML, or a comma-separated string from the environment.
fn list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
    })
}

mod duration {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(d))
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
            StrOrNum::Int(n) => Ok(Duration::from_secs(n)),
            StrOrNum::Float(f) if f >= 0.0 => Ok(Duration::from_secs_f64(f)),
            StrOrNum::Float(f) => Err(serde::de::Error::custom(format!("negative duration {f}"))),
        }
    }
}

mod opt_duration {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(d)),
            None => s.serialize_none(),
        }
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

mod bytesize {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(n: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n as u64)
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
            StrOrNum::Int(n) => Ok(n as usize),
            StrOrNum::Float(_) => Err(serde::de::Error::custom("a size must be a whole number of bytes")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999999d").is_err(), "too long for a Duration: an error, not a panic");
        assert_eq!(parse_bytes("64KiB").unwrap(), 65_536);
        assert_eq!(parse_bytes("1m").unwrap(), 1 << 20);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn rules_become_retention() {
        let c = Config::from_toml(
            "[history]\nsize = 50\nttl = \"1h\"\n[[history.rules]]\npattern = \"chat/room/+\"\nsize = 100\nttl = \"0\"\n",
        )
        .unwrap();
        let r = c.retention().unwrap();
        assert_eq!(r.default, Retention { size: 50, ttl_ms: Some(3_600_000) });
        assert_eq!(r.rules[0].1, Retention { size: 100, ttl_ms: None });
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let err = Config::from_toml("[history]\nsise = 5\n").unwrap_err().to_string();
        assert!(err.contains("sise"), "{err}");
        let err = Config::from_toml("[[history.rules]]\npattern = \"a/#/b\"\n").unwrap_err().to_string();
        assert!(err.contains("a/#/b"), "{err}");
        assert!(Config::from_toml("[longpoll]\nmax_wait = \"10m\"\n").is_err());
        // A receive maximum of 0 is a protocol error in MQTT 5 (3.2.2.3.3).
        let err = Config::from_toml("[mqtt]\nreceive_max = 0\n").unwrap_err().to_string();
        assert!(err.contains("receive_max"), "{err}");
        let err = Config::from_toml("[redis]\nurl = \"redis://x\"\npartitions = 0\n").unwrap_err().to_string();
        assert!(err.contains("partitions"), "{err}");
    }

    #[test]
    fn outbound_settings_and_their_checks() {
        let c = Config::from_toml(
            "[fallback]\nenabled = true\nchannels = \"email\"\nretry = \"200ms, 400ms\"\nmethod = \"all\"\n\
             [webhooks]\nrate = \"600/m\"\n[[webhooks.channels]]\npattern = \"chat/#\"\nurl = \"http://127.0.0.1:9/x\"\n\
             secret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\n[smtp]\nurl = \"smtp://127.0.0.1:2525\"\n",
        )
        .unwrap();
        assert_eq!(c.fallback.channels, [Via::Email]);
        assert_eq!(c.fallback.retry, [Duration::from_millis(200), Duration::from_millis(400)]);
        assert_eq!(c.fallback.method, FallbackMethod::All);
        assert_eq!(c.webhooks.rate, SendRate { count: 600, per: Duration::from_secs(60) });
        let refused = |toml: &str, needle: &str| {
            let err = Config::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(needle), "{toml}: {err}");
        };
        refused("[fallback]\nchannels = [\"sms\"]\n", "sms");
        refused("[fallback]\nenabled = true\nchannels = []\n", "at least one");
        refused("[webhooks]\nurl = \"http://x\"\nsecret = \"plain\"\n", "whsec_");
        refused("[[webhooks.channels]]\npattern = \"a/#/b\"\nurl = \"http://x\"\nsecret = \"\"\n", "a/#/b");
        refused("[webhooks]\nrate = \"fast\"\n", "fast");
        refused("[smtp]\nurl = \"http://mail\"\n", "[smtp] url");
        refused("[smtp]\nfrom = \"not an address\"\n", "[smtp] from");
        refused("[smtp]\nbody = \"{{#notifications}}\"\n", "[smtp] body");
        refused("[jobs]\nlease = \"15s\"\n", "lease");
        refused("[jobs]\nworkers = 0\n", "workers");
    }

    /// The sample configuration parses and documents every key there is.
    #[test]
    fn sample_config_documents_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../herald.sample.toml");
        let text = std::fs::read_to_string(path).expect("herald.sample.toml at the repository root");
        Config::from_toml(&text).expect("the sample parses");
        let sample: figment::value::Dict = Figment::from(Toml::string(&text)).extract().unwrap();
        let defaults: figment::value::Dict = Figment::from(Serialized::defaults(Config::default())).extract().unwrap();
        for (section, value) in &defaults {
            let keys = value.as_dict().expect("sections are tables");
            let documented = sample.get(section).and_then(|v| v.as_dict());
            for (key, default) in keys {
                let set = documented.and_then(|d| d.get(key));
                assert!(set.is_some(), "herald.sample.toml does not set [{section}] {key}");
                // Tables within a section ([limits.requests]): every key of theirs too.
                if let (Some(table), Some(set)) = (default.as_dict(), set.and_then(|v| v.as_dict())) {
                    for k in table.keys() {
                        assert!(set.contains_key(k), "herald.sample.toml does not set [{section}.{key}] {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("50/s").unwrap(), Rate::per(50, Duration::from_secs(1)));
        assert_eq!(Rate::parse("20/m").unwrap(), Rate::per(20, Duration::from_secs(60)));
        assert_eq!(Rate::parse("1/10s").unwrap(), Rate::per(1, Duration::from_secs(10)));
        assert_eq!(Rate::parse("3/500ms").unwrap().interval(), Duration::from_nanos(166_666_666));
        assert!(Rate::parse("0").unwrap().is_off());
        assert!(Rate::parse("0/s").unwrap().is_off());
        for bad in ["50", "fast/s", "5/y", "5/0"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        for r in ["50/s", "20/m", "100/h", "1/10s", "0"] {
            assert_eq!(Rate::parse(r).unwrap().to_string(), r);
        }
        let c = Config::from_toml("[limits.requests]\nrate = \"5/m\"\nburst = 2\n[limits.publish]\nper_user = 0\n")
            .unwrap();
        assert_eq!(c.limits.requests.rate, Rate::per(5, Duration::from_secs(60)));
        assert!(c.limits.publish.per_user.is_off());
        let err = Config::from_toml("[limits.connections]\nrate_per_ip = \"lots\"\n").unwrap_err().to_string();
        assert!(err.contains("lots"), "{err}");
    }

    /// Variables name tables within sections key by key; the rest as before.
    #[test]
    fn environment_names() {
        assert_eq!(env_key("HISTORY_SIZE").as_deref(), Some("history.size"));
        assert_eq!(env_key("LIMITS_REQUESTS_RATE").as_deref(), Some("limits.requests.rate"));
        assert_eq!(env_key("LIMITS_CONNECTIONS_RATE_PER_IP").as_deref(), Some("limits.connections.rate_per_ip"));
        assert_eq!(env_key("LIMITS_PUBLISH_PER_USER").as_deref(), Some("limits.publish.per_user"));
        assert_eq!(env_key("LIMITS_PUBLISH_CHANNELS").as_deref(), Some("limits.publish_channels"));
        assert_eq!(env_key("LIMITS_WRITE_TIMEOUT").as_deref(), Some("limits.write_timeout"));
        assert_eq!(env_key("MODERATION_WEBHOOK_ON_ERROR").as_deref(), Some("moderation.webhook.on_error"));
        assert_eq!(env_key("AUTH_AUDIENCE").as_deref(), Some("auth.audience"));
        assert_eq!(env_key("LOG"), None);
    }
}
