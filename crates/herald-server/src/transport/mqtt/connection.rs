//! One MQTT connection: CONNECT and session set-up, then one loop (one task)
//! that reads packets (framed cancel-safely, so reading waits in the same
//! `select!` as everything else), writes what the session has to send within
//! the client's in-flight window,
//! enforces keep-alive, and ends with the will and the session parked or gone.
//!
//! The guards: a CONNECT over a connection limit is refused (MQTT 5 CONNACK
//! `0x89` node full, `0x9F` connection rate, `0x97` quota; 3.1.1's "server
//! unavailable"). A publish over the connection's or the user's rate is
//! refused (MQTT 5: PUBACK / PUBREC `0x97`; QoS 0 dropped) or held (3.1.1,
//! which has no way to refuse one), and reading pauses for the wait; a client
//! that has sent more by the time reading resumes, again and again, is
//! flooding and is disconnected (`0x96`). A publish moderation rejects gets
//! `0x83` with the reason (MQTT 5). A flush that stalls for `[limits]
//! write_timeout`, or a subscription past `max_lag`, ends the connection
//! (`0x97` "slow_consumer", if it can still be written); the session parks
//! and resumes from its cursors.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::FutureExt;
use herald_core::{Channel, CursorToken, Data, Filter, Meta, NewMessage, Principal, Since, Target};
use mqtt_proto::{
    Pid, QoS, QosPid, TopicName,
    v5::{
        self, ConnackProperties, ConnectReasonCode, DisconnectReasonCode, PubackReasonCode, PubcompReasonCode,
        PublishProperties, PubrecReasonCode, RetainHandling, SubscribeReasonCode, UnsubscribeReasonCode, UserProperty,
        VarByteInt,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf},
    sync::oneshot,
    time::Instant,
};

use super::{
    broker::{Claim, Kick, RegisteredWill, Routed},
    codec::{self, Framer, ReadError, Version},
    outbox::Outbox,
    persist::StoredSession,
    session::{Outgoing, Session, SubOpts},
};
use herald_store::{StoreError, now_ms};

use crate::{
    api::stats::{CloseReason, Source, Transport},
    edge::coalesce::Coalescer,
    guard::{Client, ConnGuard, Refused as Admission, moderation::Refused as Moderated},
    metrics::WriteLatency,
    state::SharedState,
    subscription::{Delivery, Subscription},
};

/// Bytes a packet may have beyond the payload limit (topic, properties).
pub(crate) const PACKET_OVERHEAD: usize = 16 * 1024;

/// How long a new connection's CONNACK (and what it resends) may take to
/// write.
const FIRST_FLUSH: Duration = Duration::from_secs(10);

/// How long the last words to a client (DISCONNECT, the socket's close) may
/// take: one that no longer reads gets no longer.
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// The longest reads pause after a publish over its rate: long enough for
/// TCP to push back on a flood, short enough that a connection whose quota
/// is out for a while still answers pings and reads its acknowledgements.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Why a connection ends.
enum End {
    /// The client said DISCONNECT (normally: no will).
    Clean { with_will: bool },
    /// The socket closed or failed.
    Lost,
    /// We close it, telling an MQTT 5 client why.
    Close(DisconnectReasonCode),
    /// Another connection took the client id; the session went with it.
    TakenOver,
    /// The token the client connected with expired: an MQTT 5 client is told
    /// so (0x87 with the reason `token_expired`), and reconnects with a new
    /// one; a 3.1.1 client sees the connection close, and a reconnect with
    /// the old token is refused at CONNECT.
    TokenExpired,
    /// The client stopped reading (a flush stalled past the write timeout)
    /// or fell past `max_lag` behind: `0x97` with the reason `slow_consumer`.
    SlowConsumer,
    /// Publishes kept coming while reads were paused for the rate: `0x96`.
    Flood,
}

impl End {
    /// The reason counted and logged for the connection's end.
    fn reason(&self) -> CloseReason {
        match self {
            End::Clean { .. } | End::Lost => CloseReason::Client,
            End::TakenOver => CloseReason::Takeover,
            End::TokenExpired => CloseReason::TokenExpired,
            End::SlowConsumer => CloseReason::SlowConsumer,
            End::Flood => CloseReason::Limit,
            End::Close(DisconnectReasonCode::ServerShuttingDown) => CloseReason::Shutdown,
            End::Close(DisconnectReasonCode::KeepAliveTimeout) => CloseReason::Timeout,
            End::Close(DisconnectReasonCode::UnspecifiedError) => CloseReason::StoreError,
            End::Close(
                DisconnectReasonCode::MessageRateTooHigh
                | DisconnectReasonCode::QuotaExceeded
                | DisconnectReasonCode::ReceiveMaximumExceeded,
            ) => CloseReason::Limit,
            End::Close(_) => CloseReason::ProtocolError,
        }
    }
}

/// A block, not an `async fn`, with the handshake's future made before it:
/// an async fn's arguments keep their room in its future after moving on,
/// and this future is every MQTT connection's task.
#[allow(clippy::manual_async_fn)] // the block is the point
pub(crate) fn serve<S>(state: SharedState, stream: S, client: Client) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = state.stats.connect(Transport::Mqtt);
    // Boxed, as are `handle` and `finish`: big futures that live only for a
    // moment would otherwise size the task every idle connection keeps
    // (the handshake's CONNECT and refusal were laid out beside the
    // connection for its whole life: 1.9 KB a task, -Zprint-type-sizes).
    let handshake = Box::pin(handshake(state, stream, client, connection.opened_ms()));
    async move {
        let Some((mut conn, mut framer)) = handshake.await else {
            connection.end(CloseReason::Refused);
            return;
        };
        let end = conn.run(&mut framer).await;
        connection.end(end.reason());
        let closing = matches!(end, End::Close(_) | End::TokenExpired | End::SlowConsumer | End::Flood);
        Box::pin(conn.finish(end)).await;
        if closing {
            // Keep reading (and dropping) until the client closes: closing a socket
            // with unread data resets it, and the client would lose the DISCONNECT
            // telling it why.
            let mut rd = framer.into_inner();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), tokio::io::copy(&mut rd, &mut tokio::io::sink())).await;
        }
        // Counted as connected until here (or until an early return drops it
        // with this future).
        drop(connection);
    }
}

type Halves<S> = (Connection<WriteHalf<S>>, Framer<ReadHalf<S>>);

/// What woke a connection's packet loop.
enum Event {
    Kick(Kick),
    Packet(Result<Bytes, ReadError>),
    Delivery(Delivery),
}

/// A connection's MQTT 5 topic aliases.
#[derive(Default)]
struct Aliases {
    /// Set by the client for topics it sends.
    inbound: HashMap<u16, TopicName>,
    /// Assigned by us for topics we send, up to the client's topic alias maximum.
    outbound: HashMap<Arc<str>, u16>,
}

/// Reads the CONNECT and opens the connection, or refuses it.
async fn handshake<S>(state: SharedState, stream: S, client: Client, opened_ms: i64) -> Option<Halves<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_in = state.config.limits.max_payload + PACKET_OVERHEAD;
    let (rd, wr) = tokio::io::split(stream);
    let mut wr = Outbox::new(wr);
    let mut framer = Framer::new(rd, max_in);
    let first = match tokio::time::timeout(Duration::from_secs(10), framer.next()).await {
        Ok(Ok(p)) => p,
        _ => return None,
    };
    let Some(version) = codec::connect_version(&first) else {
        // Not a CONNECT we understand: MQTT 3.1.1 answers an unknown level with code 1.
        let refuse = v5::Packet::Connack(v5::Connack {
            session_present: false,
            reason_code: ConnectReasonCode::UnsupportedProtocolVersion,
            properties: Default::default(),
        });
        if let Some(bytes) = codec::encode(Version::V3, &refuse) {
            wr.push(&bytes);
            let _ = wr.flush().await;
        }
        return None;
    };
    let connect = match codec::decode(version, &first) {
        Ok(v5::Packet::Connect(c)) if codec::supported(c.protocol) => c,
        _ => return None,
    };
    let conn = Box::pin(Connection::open(state, version, connect, wr, client, opened_ms)).await?;
    Some((conn, framer))
}

struct Connection<W> {
    state: SharedState,
    version: Version,
    wr: Outbox<W>,
    session: Option<Session>,
    client_id: String,
    conn_id: u64,
    keep_alive: Duration,
    /// Boxed: most clients have none, and it is 168 bytes inline.
    will: Option<Box<v5::LastWill>>,
    /// The client's receive maximum: our in-flight window towards it.
    window: usize,
    /// The client's maximum packet size.
    max_out: usize,
    /// Topic aliases both ways (MQTT 5); boxed on first use, as most clients
    /// use none (two empty maps inline were 96 bytes of every connection).
    aliases: Option<Box<Aliases>>,
    out_alias_max: u16,
    /// Inbound QoS 1/2 publishes not yet acknowledged (our receive window):
    /// at most `[mqtt] receive_max`, a u16, so four bytes of what was padding.
    unacked: u32,
    kick: oneshot::Receiver<Kick>,
    /// The kick has come (or can no longer come): `kick` must not be polled again.
    kicked: bool,
    coalesce: Coalescer,
    /// When the connection opened (wall clock, ms): messages committed
    /// since are live, for the delivery latency.
    opened_ms: i64,
    /// Its place in the connection counts, its publishes' rate, and what
    /// pacing them takes: one pointer, `None` for an exempt client.
    guard: ConnGuard<Paced>,
}

/// What pacing a client's publishes takes (only for clients a limit applies to).
#[derive(Debug, Default)]
struct Paced {
    /// Reads pause this long (ms) once the packet being handled is done
    /// (`pace`): a publish was over its rate.
    pause_ms: u32,
    /// How long reads were paused while handling the last event, for the
    /// keep-alive.
    paused_ms: u32,
    /// MQTT 3.1.1: a publish over the rate, held until reads resume (3.1.1
    /// cannot refuse one, and acknowledging one not kept would lose it).
    /// Boxed: a publish is some 150 bytes, and most connections hold none.
    held: Option<Box<v5::Publish>>,
}

impl<W: AsyncWrite + Unpin + Send> Connection<W> {
    async fn open(
        state: SharedState,
        version: Version,
        c: v5::Connect,
        mut wr: Outbox<W>,
        client: Client,
        opened_ms: i64,
    ) -> Option<Self> {
        // Refusals are answered with a CONNACK and nothing else (MQTT 5: with
        // a reason string when there is more to say than the code).
        macro_rules! refuse {
            ($code:expr) => {
                refuse!($code, None::<&str>)
            };
            ($code:expr, $why:expr) => {{
                let p = v5::Packet::Connack(v5::Connack {
                    session_present: false,
                    reason_code: $code,
                    properties: ConnackProperties { reason_string: $why.map(Arc::from), ..Default::default() },
                });
                if let Some(b) = codec::encode(version, &p) {
                    wr.push(&b);
                    let _ = tokio::time::timeout(FIRST_FLUSH, wr.flush()).await;
                }
                return None;
            }};
        }
        let password = c.password.as_ref().map(|p| String::from_utf8_lossy(p).into_owned());
        let credential = password.as_deref().filter(|p| !p.is_empty());
        let principal = match state.auth.principal(credential) {
            Ok(p) => Arc::new(p),
            Err(_) => refuse!(ConnectReasonCode::BadUserNameOrPassword),
        };
        let who = state.guards.who(&principal, credential);
        // This connection is counted already (`serve`): the node's others are one fewer.
        let others = state.stats.open_connections().saturating_sub(1);
        let permit = match state.guards.admit(client, who, others, true) {
            Ok(p) => p,
            Err(refused) => {
                let why = state.guards.connection_error(refused).message;
                let code = match refused {
                    Admission::Busy(_) => ConnectReasonCode::ServerBusy,
                    Admission::Rate(_) => ConnectReasonCode::ConnectionRateExceeded,
                    Admission::Count(..) => ConnectReasonCode::QuotaExceeded,
                };
                refuse!(code, Some(why.as_str()))
            }
        };
        let broker = state.mqtt.clone();
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if version == Version::V3 && !c.clean_start {
                refuse!(ConnectReasonCode::ClientIdentifierNotValid);
            }
            let id = format!("herald-{}", broker.next_id());
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.to_string()
        };
        let conn_id = broker.next_id();
        // Past the claim, a refusal gives the client id back first (parking
        // the session when there is one to keep).
        macro_rules! unavailable {
            ($parked:expr) => {{
                let _ = broker.release(&client_id, conn_id, $parked, None);
                refuse!(ConnectReasonCode::ServerUnavailable);
            }};
        }
        let (kick_tx, kick) = oneshot::channel();
        let previous = match broker.claim(&client_id, conn_id, kick_tx, c.clean_start) {
            Claim::Parked(s) => Some(*s),
            Claim::Live(other) => {
                let (tx, rx) = oneshot::channel();
                let _ = other.send(Kick { reply: tx, clean_start: c.clean_start });
                tokio::time::timeout(Duration::from_secs(5), rx).await.ok().and_then(Result::ok).flatten()
            }
            Claim::None => None,
        };
        let cfg = &state.config.mqtt;
        let max_expiry = cfg.session_expiry_max.as_secs().min(u64::from(u32::MAX)) as u32;
        let expiry = match version {
            Version::V5 => c.properties.session_expiry_interval.unwrap_or(0),
            Version::V3 if c.clean_start => 0,
            Version::V3 => u32::MAX,
        }
        .min(max_expiry);
        // A session resumes for the same identity only: the same user, or
        // an admin (API key, open mode: no user) for an admin's.
        let resumable = |s: &Session| s.principal.user() == principal.user();
        // A session stored by an earlier run of the server, if this one has none.
        let stored = match previous {
            Some(_) => None,
            None => match broker.take_stored(&client_id, c.clean_start).await {
                Ok(s) => s,
                Err(_) => {
                    unavailable!(None);
                }
            },
        };
        let (mut session, present) = match previous {
            // A session with no expiry ended with its connection, even one
            // taken over (MQTT 5, 3.1.2.11.2).
            Some(mut s) if !c.clean_start && s.expiry > 0 && resumable(&s) => {
                // The same identity, with this connection's credential (and
                // the expiry it brings): what it no longer grants goes.
                revalidate(&state, &mut s, principal.clone());
                (s, true)
            }
            old => {
                let had_record = old.as_ref().is_some_and(|s| s.stored) || stored.is_some();
                if let Some(old) = old {
                    broker.end_session(old.id);
                }
                let resumed = match stored {
                    Some(rec) if !c.clean_start && rec.belongs_to(&principal) => {
                        match Box::pin(restore(&state, rec.clone(), principal.clone())).await {
                            Some(s) => Some(s),
                            None => {
                                // A store error: the record stays for the next try.
                                broker.put_back_stored(&client_id, rec);
                                unavailable!(None);
                            }
                        }
                    }
                    _ => None,
                };
                if let Some(s) = resumed {
                    (s, true)
                } else {
                    if had_record && broker.forget_session(&client_id).await.is_err() {
                        unavailable!(None);
                    }
                    let cx = state.context(principal.clone(), true);
                    let herald = match crate::subscription::Subscription::open(
                        cx,
                        Vec::new(),
                        Since::Now,
                        &CursorToken::default(),
                    )
                    .await
                    {
                        Ok(h) => h,
                        Err(_) => {
                            unavailable!(None);
                        }
                    };
                    (Session::new(broker.next_id(), herald, cfg.offline_queue, principal.clone()), false)
                }
            }
        };
        session.expiry = expiry;
        // A persistent session's record says it is connected, with this
        // connection's expiry: a crash from here on counts from the restart.
        if expiry > 0 {
            match broker.save_session(&client_id, &session, None).await {
                Ok(()) => session.stored = true,
                Err(_) => {
                    unavailable!(Some(Box::new(session)));
                }
            }
        }
        let mut keep_alive = c.keep_alive;
        let cap = cfg.max_keepalive.as_secs().min(u64::from(u16::MAX)) as u16;
        let server_keep_alive = (cap > 0 && (keep_alive == 0 || keep_alive > cap)).then(|| {
            keep_alive = cap;
            cap
        });
        let max_in = state.config.limits.max_payload + PACKET_OVERHEAD;
        let properties = ConnackProperties {
            receive_max: Some(cfg.receive_max),
            topic_alias_max: Some(cfg.topic_alias_max),
            max_packet_size: Some(max_in as u32),
            retain_available: Some(true),
            wildcard_subscription_available: Some(true),
            subscription_id_available: Some(true),
            shared_subscription_available: Some(true),
            assigned_client_id: assigned.map(Into::into),
            server_keep_alive,
            ..Default::default()
        };
        let connack = v5::Packet::Connack(v5::Connack {
            session_present: present,
            reason_code: ConnectReasonCode::Success,
            properties,
        });
        let window = match version {
            Version::V5 => usize::from(c.properties.receive_max.unwrap_or(u16::MAX)),
            Version::V3 => usize::from(cfg.send_max),
        }
        .max(1);
        let max_out = c.properties.max_packet_size.map_or(usize::MAX, |m| m as usize);
        let mut conn = Connection {
            state: state.clone(),
            version,
            wr,
            session: Some(session),
            client_id,
            conn_id,
            keep_alive: Duration::from_secs(u64::from(keep_alive)),
            will: c.last_will.map(Box::new),
            window,
            max_out,
            aliases: None,
            out_alias_max: if version == Version::V5 { c.properties.topic_alias_max.unwrap_or(0) } else { 0 },
            unacked: 0,
            kick,
            kicked: false,
            coalesce: Coalescer::default(),
            guard: state.guards.connection_guard(permit, client, who),
            opened_ms,
        };
        conn.send(&connack);
        // A resumed session first repeats what was in flight.
        let resend: Vec<(u16, Outgoing)> = conn
            .session
            .as_ref()
            .map(|s| s.inflight.iter().map(|(p, o)| (*p, o.clone())).collect())
            .unwrap_or_default();
        for (pid, o) in resend {
            let p = if o.released { codec::pubrel(pid_of(pid)) } else { conn.publish_packet(&o, Some(pid), true) };
            let more = if o.released { &[][..] } else { o.sub_ids.get(1..).unwrap_or_default() };
            conn.send_with_ids(&p, more);
        }
        // Bounded like every other write: a client that does not read its
        // CONNACK ends as a lost connection (its session parks or ends).
        if !matches!(tokio::time::timeout(FIRST_FLUSH, conn.wr.flush()).await, Ok(Ok(()))) {
            Box::pin(conn.finish(End::Lost)).await;
            return None;
        }
        Some(conn)
    }

    /// Queues a packet for the loop's next flush (see `Outbox`): nothing here
    /// waits on the socket or fails.
    fn send(&mut self, p: &v5::Packet) {
        self.send_with_ids(p, &[]);
    }

    /// Queues a packet; `more_ids` are subscription identifiers beyond the
    /// one the PUBLISH carries (MQTT 5).
    fn send_with_ids(&mut self, p: &v5::Packet, more_ids: &[u32]) {
        let encoded = codec::encode(self.version, p);
        let encoded = match (self.version, more_ids.is_empty()) {
            (Version::V5, false) => encoded.and_then(|b| codec::add_subscription_ids(b, more_ids)),
            _ => encoded,
        };
        if let Some(bytes) = encoded {
            if bytes.len() > self.max_out {
                // MQTT 5: a packet over the client's maximum is not sent.
                return;
            }
            self.wr.push(&bytes);
        }
    }

    /// Authenticated with an API key (an admin that is not open mode's
    /// anonymous): publishes moderated only if configured.
    fn api_key(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.principal.is_admin()) && !self.state.auth.is_open()
    }

    fn session(&mut self) -> &mut Session {
        self.session.as_mut().expect("a running connection has its session")
    }

    /// The connection's life after CONNECT. The loop's wait is what every idle
    /// connection holds, so each handler runs boxed (they last a moment, and
    /// inline they would size the task for their largest state: measured
    /// 2.3 KB a task before) and the keep-alive timer is allocated once. For
    /// the same reason it is a block, not an `async fn`: an async fn keeps a
    /// second copy of its arguments.
    #[allow(clippy::manual_async_fn)] // the block is the point
    fn run<'a, R: AsyncRead + Unpin>(&'a mut self, framer: &'a mut Framer<R>) -> impl Future<Output = End> + 'a {
        async move {
            let shutdown = self.state.shutdown.clone();
            let mut last_heard = Instant::now();
            let mut keep_alive = (!self.keep_alive.is_zero())
                .then(|| Box::pin(tokio::time::sleep_until(last_heard + self.keep_alive * 3 / 2)));
            // Only a connection whose token expires holds this timer.
            let mut expiry = self
                .session()
                .principal
                .expires_at()
                .map(|at| Box::pin(tokio::time::sleep_until(crate::edge::stream::instant_of(at))));
            loop {
                if self.has_sendable() {
                    self.drain_queue();
                }
                if let Some(timer) = keep_alive.as_mut() {
                    let deadline = last_heard + self.keep_alive * 3 / 2;
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                }
                if self.wr.has_pending() {
                    // A client that stops reading blocks this write: a takeover,
                    // shutdown, its keep-alive or its token's expiry must still
                    // get through (the session goes on without this socket).
                    let flushed = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return End::Close(DisconnectReasonCode::ServerShuttingDown),
                        kick = &mut self.kick, if !self.kicked => {
                            self.kicked = true;
                            match kick {
                                Ok(kick) => return Box::pin(self.taken_over(kick)).await,
                                Err(_) => continue,
                            }
                        }
                        _ = crate::edge::stream::fired(&mut keep_alive) => return End::Close(DisconnectReasonCode::KeepAliveTimeout),
                        _ = crate::edge::stream::fired(&mut expiry) => return End::TokenExpired,
                        r = Box::pin(flush_within(&mut self.wr, &self.state.guards)) => r,
                    };
                    if let Some(end) = flushed {
                        return end;
                    }
                    if self.has_sendable() {
                        // The drain stopped at the outbox's high-water mark: go on.
                        continue;
                    }
                }
                let open = {
                    let s = self.session.as_ref().expect("session");
                    s.inflight.len() < self.window && s.queue.is_empty()
                };
                let session = self.session.as_mut().expect("session");
                // The wait only names what happened; one boxed call handles it, so
                // an idle connection's task is sized for the wait alone (a packet
                // or a delivery kept beside each handler's state was 72 bytes of
                // every task, -Zprint-type-sizes).
                let event = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return End::Close(DisconnectReasonCode::ServerShuttingDown),
                    kick = &mut self.kick, if !self.kicked => {
                        self.kicked = true;
                        match kick {
                            Ok(kick) => Event::Kick(kick),
                            Err(_) => continue,
                        }
                    }
                    r = framer.next() => {
                        last_heard = Instant::now();
                        Event::Packet(r)
                    }
                    _ = crate::edge::stream::fired(&mut keep_alive) => {
                        return End::Close(DisconnectReasonCode::KeepAliveTimeout);
                    }
                    _ = crate::edge::stream::fired(&mut expiry) => return End::TokenExpired,
                    d = session.herald.next(), if open => match d {
                        Ok(d) => Event::Delivery(d),
                        Err(e) if e.is_lagging() => {
                            self.state.guards.stats.lagging_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return End::SlowConsumer;
                        }
                        Err(_) => return End::Close(DisconnectReasonCode::UnspecifiedError),
                    },
                    r = session.routed.recv(), if open => {
                        if let Some(r) = r {
                            let s = self.session();
                            if let Some(o) = s.routed_outgoing(&r, now_ms()) {
                                s.queue.push_back(o);
                            }
                        }
                        continue;
                    }
                };
                if let Some(end) = Box::pin(self.on_event(event, framer)).await {
                    return end;
                }
                if let Some(p) = self.guard.extra().filter(|p| p.paused_ms > 0) {
                    // A pause for the publish rate (`pace`) is this side's
                    // silence, not the client's.
                    last_heard += Duration::from_millis(u64::from(std::mem::take(&mut p.paused_ms)));
                }
            }
        }
    }

    /// Handles what the wait in `run` returned; `Some` ends the connection.
    async fn on_event<R: AsyncRead + Unpin>(&mut self, event: Event, framer: &mut Framer<R>) -> Option<End> {
        let end = match event {
            Event::Kick(kick) => Some(self.taken_over(kick).await),
            Event::Packet(r) => self.on_frame(r).await,
            Event::Delivery(d) => {
                self.on_delivery(d).await;
                None
            }
        };
        match end {
            Some(end) => Some(end),
            None => self.pace(framer).await,
        }
    }

    /// After a publish over its rate, reads pause for the wait (at most
    /// `MAX_PAUSE`), here, in the handler: an idle connection's task keeps no
    /// room for it, and while paused the connection answers nothing else
    /// either (its deliveries wait in its mailbox). Then MQTT 3.1.1's held
    /// publish goes (or is held again); for MQTT 5, a publish already waiting
    /// was sent while reads were paused: a client that keeps that up, though
    /// told 0x97 each time, floods. (An MQTT 3.1.1 client is only paced: its
    /// publishes are held, not refused.)
    async fn pace<R: AsyncRead + Unpin>(&mut self, framer: &mut Framer<R>) -> Option<End> {
        loop {
            let wait = match self.guard.extra() {
                Some(p) if p.pause_ms > 0 => {
                    p.paused_ms = p.paused_ms.saturating_add(p.pause_ms);
                    Duration::from_millis(u64::from(std::mem::take(&mut p.pause_ms)))
                }
                _ => return None,
            };
            // The refusal (PUBACK 0x97) goes out before the pause.
            if let Some(end) = flush_within(&mut self.wr, &self.state.guards).await {
                return Some(end);
            }
            tokio::time::sleep(wait).await;
            if let Some(p) = self.guard.extra().and_then(|p| p.held.take()) {
                if let Some(end) = self.on_publish(*p).await {
                    return Some(end);
                }
                continue;
            }
            if self.version != Version::V5 {
                return None;
            }
            match framer.next().now_or_never() {
                Some(r) => {
                    if r.as_ref().is_ok_and(|b| codec::is_publish(b))
                        && self.guard.strike(self.state.guards.flood_after)
                    {
                        self.state.guards.stats.floods_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Some(End::Flood);
                    }
                    if let Some(end) = Box::pin(self.on_frame(r)).await {
                        return Some(end);
                    }
                }
                None => self.guard.calm(),
            }
        }
    }

    /// Whether queued messages wait and the in-flight window has room.
    fn has_sendable(&self) -> bool {
        let s = self.session.as_ref().expect("session");
        !s.queue.is_empty() && s.inflight.len() < self.window
    }

    /// Another connection took the client id: the session goes to it, and
    /// this connection's will is published unless the session goes on and
    /// the will is delayed (MQTT 5, 3.1.3.2.2: the new connection came before
    /// the delay ran out).
    /// A new connection claimed the client id: the session goes to it at
    /// once, then this client is told (as far as a socket it may no longer
    /// read allows: a moment).
    async fn taken_over(&mut self, kick: Kick) -> End {
        let session = self.session.take().expect("a running connection has its session");
        self.hand_over(kick, session);
        self.send(&disconnect(DisconnectReasonCode::SessionTakenOver));
        let _ = tokio::time::timeout(WRITE_GRACE, self.wr.flush()).await;
        End::TakenOver
    }

    fn hand_over(&mut self, kick: Kick, session: Session) {
        let goes_on = !kick.clean_start && session.expiry > 0;
        let delayed = self.will.as_ref().is_some_and(|w| w.properties.delay_interval.unwrap_or(0) > 0);
        if !(goes_on && delayed) {
            self.publish_will(session.principal.clone(), session.id, 0, None);
        }
        if let Err(Some(session)) = kick.reply.send(Some(session)) {
            // The newcomer gave up waiting: the session ends here.
            self.state.mqtt.end_session(session.id);
        }
    }

    /// Queues a delivery from the Herald subscription, with whatever else is
    /// already here, so a burst is written with one flush.
    async fn on_delivery(&mut self, d: Delivery) {
        if matches!(d, Delivery::Message(_)) {
            // A busy connection gathers what comes within the window into one write.
            self.coalesce.ready().await;
            self.coalesce.wrote();
        }
        let window = self.window;
        let mut latency = WriteLatency::new(self.opened_ms);
        let s = self.session.as_mut().expect("session");
        if let Delivery::Message(m) = &d {
            latency.note(m);
        }
        s.queue_delivery(d, now_ms());
        while s.queue.len() < window.max(64) {
            // Every kind: an unread count that changes while messages are
            // drained here must go out too (dropping it lost the red dot's
            // update when a notification and its count came together).
            match s.herald.try_next() {
                Some(d) => {
                    if let Delivery::Message(m) = &d {
                        latency.note(m);
                    }
                    s.queue_delivery(d, now_ms())
                }
                None => break,
            }
        }
        // Queued for the loop's next flush, which follows at once: that
        // is when the write goes (a client's full in-flight window holds
        // QoS 1/2 messages back, which counts as delivered later).
        latency.record(&self.state.metrics, Transport::Mqtt);
    }

    /// Decodes and handles one framed packet; `Some` ends the connection.
    async fn on_frame(&mut self, framed: Result<bytes::Bytes, ReadError>) -> Option<End> {
        match self.inbound(framed) {
            Ok(p) => self.handle(p).await,
            Err(end) => Some(end),
        }
    }

    /// A framed packet, decoded; or why the connection ends. Inbound QoS 1/2
    /// publishes are counted until acknowledged, so a client exceeding our
    /// receive maximum is caught.
    fn inbound(&mut self, framed: Result<bytes::Bytes, ReadError>) -> Result<v5::Packet, End> {
        let bytes = match framed {
            Ok(b) => b,
            Err(ReadError::TooLarge(_)) => return Err(End::Close(DisconnectReasonCode::PacketTooLarge)),
            Err(ReadError::BadLength) => return Err(End::Close(DisconnectReasonCode::MalformedPacket)),
            Err(_) => return Err(End::Lost),
        };
        let p = codec::decode(self.version, &bytes).map_err(|_| End::Close(DisconnectReasonCode::MalformedPacket))?;
        let receive_max = u32::from(self.state.config.mqtt.receive_max);
        if let v5::Packet::Publish(publish) = &p
            && publish.qos_pid.qos() != QoS::Level0
        {
            if self.unacked >= receive_max {
                return Err(End::Close(DisconnectReasonCode::ReceiveMaximumExceeded));
            }
            self.unacked += 1;
        }
        Ok(p)
    }

    /// Sends queued messages while the in-flight window has room.
    fn drain_queue(&mut self) {
        loop {
            if self.wr.is_full() {
                // The loop writes it out, watching for a takeover meanwhile.
                return;
            }
            let window = self.window;
            let s = self.session();
            if s.inflight.len() >= window {
                return;
            }
            let Some(o) = s.queue.pop_front() else { return };
            let pid = (o.qos > 0).then(|| s.next_pid());
            let mut p = self.publish_packet(&o, pid, false);
            if self.too_big(&p, &o.sub_ids) {
                // MQTT 5 (3.1.2.25): not sent, and handled as if it had been
                // (no packet id held, no topic alias assigned that the
                // client would never learn).
                continue;
            }
            if let Some(pid) = pid {
                self.session().inflight.insert(pid, o.clone());
            }
            self.alias(&mut p);
            self.send_with_ids(&p, o.sub_ids.get(1..).unwrap_or_default());
            self.state.stats.delivered(Transport::Mqtt, 1);
        }
    }

    /// Whether a publish is over the client's maximum packet size (checked
    /// only for clients that set one). Measured with its full topic: one
    /// that would fit only once its topic is replaced by an alias is dropped
    /// too.
    fn too_big(&self, p: &v5::Packet, sub_ids: &[u32]) -> bool {
        if self.max_out == usize::MAX {
            return false;
        }
        let encoded = codec::encode(self.version, p);
        let encoded = match (self.version, sub_ids.len() > 1) {
            (Version::V5, true) => encoded.and_then(|b| codec::add_subscription_ids(b, &sub_ids[1..])),
            _ => encoded,
        };
        encoded.is_none_or(|b| b.len() > self.max_out)
    }

    /// Replaces the topic with an alias the client already knows, or assigns
    /// one while there is room (MQTT 5 clients that accept aliases).
    fn alias(&mut self, p: &mut v5::Packet) {
        let v5::Packet::Publish(p) = p else { return };
        if self.out_alias_max == 0 {
            return;
        }
        let topic: Arc<str> = (&*p.topic_name).into();
        let out = &mut self.aliases.get_or_insert_default().outbound;
        match out.get(&topic) {
            Some(a) => {
                p.properties.topic_alias = Some(*a);
                p.topic_name = TopicName::try_from("").expect("empty topic");
            }
            None if out.len() < usize::from(self.out_alias_max) => {
                let a = out.len() as u16 + 1;
                out.insert(topic, a);
                p.properties.topic_alias = Some(a);
            }
            None => {}
        }
    }

    fn publish_packet(&self, o: &Outgoing, pid: Option<u16>, dup: bool) -> v5::Packet {
        let qos_pid = match (o.qos, pid) {
            (1, Some(p)) => QosPid::Level1(pid_of(p)),
            (2, Some(p)) => QosPid::Level2(pid_of(p)),
            _ => QosPid::Level0,
        };
        let mut properties = PublishProperties::default();
        if let Some(m) = &o.meta {
            properties.payload_is_utf8 = m.payload_utf8;
            properties.content_type = m.content_type.as_deref().map(Into::into);
            properties.response_topic = m.response_topic.as_deref().and_then(|t| TopicName::try_from(t).ok());
            properties.correlation_data = m.correlation_data.clone();
            properties.user_properties = m
                .user_properties
                .iter()
                .map(|(k, v)| UserProperty { name: k.as_str().into(), value: v.as_str().into() })
                .collect();
            properties.message_expiry_interval =
                m.expires_at.map(|at| ((at - now_ms()).max(0) as u64).div_ceil(1000).max(1) as u32);
        }
        // mqtt-proto carries one subscription identifier; the others are
        // added to the encoded packet (`send_with_ids`).
        properties.subscription_id = o.sub_ids.first().and_then(|id| VarByteInt::try_from(*id).ok());
        let topic = TopicName::try_from(&*o.topic).unwrap_or_else(|_| TopicName::try_from("invalid").expect("valid"));
        v5::Packet::Publish(v5::Publish {
            dup,
            retain: o.retain,
            qos_pid,
            topic_name: topic,
            payload: o.payload.clone(),
            properties,
        })
    }

    /// Handles one inbound packet; `Some` ends the connection.
    async fn handle(&mut self, p: v5::Packet) -> Option<End> {
        match p {
            v5::Packet::Publish(p) => return self.on_publish(p).await,
            v5::Packet::Puback(a) => {
                self.session().inflight.remove(&a.pid.value());
            }
            v5::Packet::Pubrec(a) => {
                let pid = a.pid.value();
                let failed = (a.reason_code as u8) >= 0x80;
                let s = self.session();
                if failed {
                    s.inflight.remove(&pid);
                } else {
                    if let Some(o) = s.inflight.get_mut(&pid) {
                        o.released = true;
                    }
                    self.send(&codec::pubrel(a.pid));
                }
            }
            v5::Packet::Pubrel(a) => {
                let known = self.session().awaiting_rel.remove(&a.pid.value());
                if known {
                    self.unacked = self.unacked.saturating_sub(1);
                }
                let code = if known { PubcompReasonCode::Success } else { PubcompReasonCode::PacketIdentifierNotFound };
                self.send(&codec::pubcomp(a.pid, code));
            }
            v5::Packet::Pubcomp(a) => {
                self.session().inflight.remove(&a.pid.value());
            }
            v5::Packet::Subscribe(s) => return self.on_subscribe(s).await,
            v5::Packet::Unsubscribe(u) => {
                let mut codes = Vec::with_capacity(u.topics.len());
                for f in &u.topics {
                    let filter: &str = f;
                    let s = self.session.as_mut().expect("session");
                    let existed = s.subs.remove(filter).is_some();
                    if let Some((group, inner)) = super::topic::shared(filter) {
                        self.state.mqtt.leave_shared(group, inner, s.id);
                    } else {
                        self.state.mqtt.remove_route(s.id, filter);
                        if let Ok(parsed) = Filter::parse(filter) {
                            s.herald.remove(&Target::from_filter(parsed));
                        }
                    }
                    codes.push(if existed {
                        UnsubscribeReasonCode::Success
                    } else {
                        UnsubscribeReasonCode::NoSubscriptionExisted
                    });
                }
                if self.save_if_persistent().await.is_err() {
                    codes.iter_mut().for_each(|c| *c = UnsubscribeReasonCode::UnspecifiedError);
                }
                let ack =
                    v5::Packet::Unsuback(v5::Unsuback { pid: u.pid, properties: Default::default(), topics: codes });
                self.send(&ack);
            }
            v5::Packet::Pingreq => self.send(&v5::Packet::Pingresp),
            v5::Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    if self.session().expiry == 0 && expiry > 0 {
                        return Some(End::Close(DisconnectReasonCode::ProtocolError));
                    }
                    let max = self.state.config.mqtt.session_expiry_max.as_secs().min(u64::from(u32::MAX)) as u32;
                    self.session().expiry = expiry.min(max);
                }
                let with_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                return Some(End::Clean { with_will });
            }
            // A second CONNECT, AUTH, or a server-side packet from a client.
            // A second CONNECT: a protocol error, and the connection is closed
            // at once without a DISCONNECT (as Mosquitto does). A client that
            // sent it is waiting for a CONNACK; a stray DISCONNECT would be read
            // as one, and the Paho test client, reading the socket from two
            // threads, could hang on half of it.
            v5::Packet::Connect(_) => return Some(End::Lost),
            _ => return Some(End::Close(DisconnectReasonCode::ProtocolError)),
        }
        None
    }

    async fn on_publish(&mut self, mut p: v5::Publish) -> Option<End> {
        // Topic aliases (MQTT 5): set one, or use one.
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.state.config.mqtt.topic_alias_max {
                return Some(End::Close(DisconnectReasonCode::TopicAliasInvalid));
            }
            let inbound = &mut self.aliases.get_or_insert_default().inbound;
            if p.topic_name.is_empty() {
                match inbound.get(&alias) {
                    Some(t) => p.topic_name = t.clone(),
                    None => return Some(End::Close(DisconnectReasonCode::ProtocolError)),
                }
            } else {
                inbound.insert(alias, p.topic_name.clone());
            }
        } else if p.topic_name.is_empty() {
            return Some(End::Close(DisconnectReasonCode::ProtocolError));
        }
        let qos = p.qos_pid.qos();
        let pid = p.qos_pid.pid();
        if let (QoS::Level2, Some(pid)) = (qos, pid)
            && self.session().awaiting_rel.contains_key(&pid.value())
        {
            // A resent QoS 2 publish we already have: acknowledge again only.
            self.unacked = self.unacked.saturating_sub(1);
            self.send(&codec::pubrec(pid, PubrecReasonCode::Success));
            return None;
        }
        if let Err(limited) = self.guard.check_publish(&self.state.guards) {
            let wait = limited.wait();
            let paced = self.guard.extra().expect("a limited client has its pacing state");
            paced.pause_ms = wait.min(MAX_PAUSE).as_millis().max(1) as u32;
            if self.version == Version::V3 {
                // 3.1.1 has no way to say no: a publish that can go soon is
                // held until then; one that cannot ends the connection (its
                // QoS 1/2 publish is not acknowledged, so the client still
                // has it and sends it again later).
                if wait > MAX_PAUSE {
                    self.state.guards.stats.floods_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Some(End::Flood);
                }
                paced.held = Some(Box::new(p));
                return None;
            }
            let why = self.state.guards.publish_error(limited).message;
            match (qos, pid) {
                (QoS::Level1, Some(pid)) => {
                    self.unacked = self.unacked.saturating_sub(1);
                    self.send(&puback_with(pid, PubackReasonCode::QuotaExceeded, Some(why)));
                }
                (QoS::Level2, Some(pid)) => {
                    self.unacked = self.unacked.saturating_sub(1);
                    self.send(&pubrec_with(pid, PubrecReasonCode::QuotaExceeded, Some(why)));
                }
                _ => {} // QoS 0: dropped; the pause tells the client to slow down
            }
            return None;
        }
        let session_id = self.session().id;
        let principal = self.session().principal.clone();
        let api_key = self.api_key();
        let pp = &p.properties;
        let meta = meta(
            qos,
            p.retain,
            session_id,
            Props {
                user: &pp.user_properties,
                content_type: pp.content_type.as_deref(),
                response_topic: pp.response_topic.as_deref(),
                correlation: pp.correlation_data.as_ref(),
                utf8: pp.payload_is_utf8,
                expiry: pp.message_expiry_interval,
            },
        );
        let outcome = if p.properties.payload_is_utf8 == Some(true) && std::str::from_utf8(&p.payload).is_err() {
            Err(Refused::PayloadFormat)
        } else {
            publish(&self.state, &principal, api_key, &p.topic_name, p.payload.clone(), meta).await
        };
        let pid = pid?;
        match qos {
            QoS::Level1 => {
                self.unacked = self.unacked.saturating_sub(1);
                let ack = match outcome {
                    Ok(()) => codec::puback(pid, PubackReasonCode::Success),
                    Err(r) => puback_with(pid, r.puback(), r.reason()),
                };
                self.send(&ack);
            }
            _ => {
                let ack = match outcome {
                    Ok(()) => {
                        self.session().awaiting_rel.insert(pid.value());
                        codec::pubrec(pid, PubrecReasonCode::Success)
                    }
                    Err(r) => {
                        self.unacked = self.unacked.saturating_sub(1);
                        pubrec_with(pid, r.pubrec(), r.reason())
                    }
                };
                self.send(&ack);
            }
        }
        None
    }

    /// Writes a persistent session's record (its subscriptions changed).
    async fn save_if_persistent(&mut self) -> Result<(), StoreError> {
        let s = self.session.as_ref().expect("session");
        if s.expiry == 0 {
            return Ok(());
        }
        self.state.mqtt.save_session(&self.client_id, s, None).await?;
        self.session().stored = true;
        Ok(())
    }

    async fn on_subscribe(&mut self, sub: v5::Subscribe) -> Option<End> {
        let sub_id = sub.properties.subscription_id.map(|v| v.value());
        let mut codes = Vec::with_capacity(sub.topics.len());
        let mut retained = Vec::new();
        for (filter, opts) in &sub.topics {
            let filter: &str = filter;
            let code = self.subscribe_one(filter, opts, sub_id, &mut retained).await;
            codes.push(code);
        }
        if self.save_if_persistent().await.is_err() {
            codes.iter_mut().for_each(|c| *c = SubscribeReasonCode::UnspecifiedError);
        }
        let ack = v5::Packet::Suback(v5::Suback { pid: sub.pid, properties: Default::default(), topics: codes });
        self.send(&ack);
        // Retained messages follow the SUBACK.
        self.session().queue.extend(retained);
        None
    }

    async fn subscribe_one(
        &mut self,
        filter: &str,
        opts: &v5::SubscriptionOptions,
        sub_id: Option<u32>,
        retained: &mut Vec<Outgoing>,
    ) -> SubscribeReasonCode {
        let cfg = &self.state.config.mqtt;
        if cfg.deny_subscribe.iter().any(|d| d == filter) {
            // 0x80, as MQTT 3 can say it too (and as the Paho suite expects).
            return SubscribeReasonCode::UnspecifiedError;
        }
        if let Some((group, inner)) = super::topic::shared(filter) {
            return self.subscribe_shared(filter, group, inner, opts, sub_id);
        }
        let s = self.session.as_mut().expect("session");
        if let Some(user) = filter.strip_prefix(UNREAD_PREFIX) {
            // The red dot over MQTT: the count now, then on every change.
            if herald_core::channel::validate_segment(user).is_err() || !s.principal.may_access_inbox(user) {
                return SubscribeReasonCode::NotAuthorized;
            }
            if s.herald.follow_unread(user).await.is_err() {
                return SubscribeReasonCode::UnspecifiedError;
            }
            let qos = codec::qos_u8(opts.max_qos).min(2);
            s.subs.insert(filter.to_owned(), SubOpts { qos, no_local: false, retain_as_published: false, sub_id });
            return granted(qos);
        }
        let mut exact_channel = false;
        match Filter::parse(filter) {
            Ok(f) => {
                let target = Target::from_filter(f);
                exact_channel = matches!(target, Target::Channel(_));
                if !s.principal.may_subscribe(&target) {
                    return SubscribeReasonCode::NotAuthorized;
                }
                if !s.subs.contains_key(filter) && s.herald.add(target, Since::Now).await.is_err() {
                    return SubscribeReasonCode::UnspecifiedError;
                }
            }
            // Topics outside Herald's channel names are for MQTT clients among
            // themselves; a user's token grants channels only.
            Err(_) if s.principal.is_admin() => {}
            Err(_) => return SubscribeReasonCode::NotAuthorized,
        }
        let qos = codec::qos_u8(opts.max_qos).min(2);
        let is_new = s
            .subs
            .insert(
                filter.to_owned(),
                SubOpts { qos, no_local: opts.no_local, retain_as_published: opts.retain_as_published, sub_id },
            )
            .is_none();
        if !exact_channel {
            // A filter that could match a topic outside the channel names
            // (wildcards, or such a topic itself) is routed by the broker too.
            // An exact channel is not: everything on it comes through the hub.
            self.state.mqtt.add_route(s.id, filter, s.routed.clone());
        }
        let send_retained = match opts.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendAtSubscribeIfNotExist => is_new,
            RetainHandling::DoNotSend => false,
        };
        if send_retained {
            for r in self.state.mqtt.retained_matching(filter) {
                if r.meta.expires_at.is_some_and(|at| at <= now_ms()) {
                    continue;
                }
                retained.push(Outgoing {
                    topic: r.topic.clone(),
                    payload: r.payload.clone(),
                    qos: r.meta.qos.min(qos),
                    retain: true,
                    meta: Some(r.meta.clone()),
                    sub_ids: sub_id.into_iter().collect(),
                    released: false,
                    id: None,
                });
            }
        }
        granted(qos)
    }

    /// `$share/{group}/{filter}`: the session joins the group; no retained
    /// messages are sent for shared subscriptions.
    fn subscribe_shared(
        &mut self,
        full: &str,
        group: &str,
        filter: &str,
        opts: &v5::SubscriptionOptions,
        sub_id: Option<u32>,
    ) -> SubscribeReasonCode {
        let s = self.session.as_mut().expect("session");
        let allowed = match Filter::parse(filter) {
            Ok(f) => s.principal.may_subscribe(&Target::from_filter(f)),
            Err(_) => s.principal.is_admin() && !filter.contains("$share"),
        };
        if !allowed {
            return SubscribeReasonCode::NotAuthorized;
        }
        let qos = codec::qos_u8(opts.max_qos).min(2);
        s.subs.insert(full.to_owned(), SubOpts { qos, no_local: opts.no_local, retain_as_published: false, sub_id });
        let member =
            super::broker::Member { session: s.id, tx: s.routed.clone(), qos, sub_id, principal: s.principal.clone() };
        self.state.mqtt.join_shared(&self.state, group, filter, member);
        granted(qos)
    }

    /// After the loop: tell an MQTT 5 client why, publish the will if due,
    /// and park or drop the session.
    async fn finish(mut self, end: End) {
        let told = match &end {
            End::Close(code) => Some(disconnect(*code)),
            End::TokenExpired => {
                Some(disconnect_with(DisconnectReasonCode::NotAuthorized, "token_expired: reconnect with a new token"))
            }
            End::SlowConsumer => Some(disconnect_with(
                DisconnectReasonCode::QuotaExceeded,
                "slow_consumer: the connection stopped reading or fell too far behind; reconnect and resume",
            )),
            End::Flood => Some(disconnect_with(
                DisconnectReasonCode::MessageRateTooHigh,
                "rate_limited: publishes kept coming while reads were paused; slow down",
            )),
            _ => None,
        };
        // Bounded: a client that no longer reads must not hold the session.
        if let Some(packet) = told {
            self.send(&packet);
        }
        let _ = tokio::time::timeout(WRITE_GRACE, self.wr.shutdown()).await;
        let broker = self.state.mqtt.clone();
        let Some(mut session) = self.session.take() else {
            return; // taken over: the session and the will were seen to then
        };
        let will_due = match &end {
            End::Clean { with_will } => *with_will,
            End::TakenOver => false,
            End::Close(DisconnectReasonCode::ServerShuttingDown) => false,
            _ => true,
        };
        let expiry = session.expiry;
        if expiry > 0 {
            // Written before it is parked: on shutdown, before the store closes.
            match broker.save_session(&self.client_id, &session, Some(now_ms())).await {
                Ok(()) => session.stored = true,
                Err(e) => tracing::error!(error = %e, client_id = self.client_id, "storing an MQTT session failed"),
            }
        } else {
            broker.end_session(session.id);
        }
        // The will waits for its delay, or the session's end if sooner.
        let (principal, origin, stored) = (session.principal.clone(), session.id, session.stored);
        let delay = self.will.as_ref().map_or(0, |w| w.properties.delay_interval.unwrap_or(0)).min(expiry);
        // A delayed will is registered as the session parks (see `release`).
        let delayed_will = (will_due && delay > 0 && self.will.is_some()).then(|| broker.next_id());
        match broker.release(&self.client_id, self.conn_id, (expiry > 0).then(|| Box::new(session)), delayed_will) {
            Ok(registered) => {
                if will_due {
                    self.publish_will(principal, origin, delay, registered);
                }
                if expiry > 0 {
                    let client_id = self.client_id.clone();
                    let parked_by = self.conn_id;
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
                        if broker.expire(&client_id, parked_by) {
                            let _ = broker.forget_session(&client_id).await;
                        }
                    });
                } else if stored {
                    let _ = broker.forget_session(&self.client_id).await;
                }
            }
            // A new connection claimed the id while this one was ending (a
            // client that reconnects as soon as it sees the socket close): it
            // waits for the session as from a live connection, and its kick is
            // on the way.
            Err(session) => {
                let kick = match self.kicked {
                    true => None,
                    false => {
                        tokio::time::timeout(Duration::from_secs(5), &mut self.kick).await.ok().and_then(Result::ok)
                    }
                };
                match (kick, session) {
                    (Some(kick), Some(session)) if will_due => self.hand_over(kick, *session),
                    (Some(kick), session) => {
                        let ended = session.is_none();
                        let _ = kick.reply.send(session.map(|s| *s));
                        if will_due {
                            self.publish_will(principal, origin, 0, None);
                        }
                        if ended && stored {
                            let _ = broker.forget_session(&self.client_id).await;
                        }
                    }
                    (None, _) if will_due => self.publish_will(principal, origin, delay, None),
                    (None, _) => {}
                }
            }
        }
    }

    /// Publishes this connection's will, if it has one, after `delay`
    /// seconds, unless the client connects again first (its claim cancels it).
    /// `registered`: the pending will `release` registered with the parking,
    /// and its token; otherwise a delayed will is registered here. A will
    /// without a delay goes at once, whoever connects meanwhile.
    fn publish_will(&mut self, principal: Arc<Principal>, origin: u64, delay: u32, registered: Option<RegisteredWill>) {
        let Some(will) = self.will.take() else { return };
        let state = self.state.clone();
        // The session may be gone already: the will's principal says.
        let api_key = principal.is_admin() && !state.auth.is_open();
        let client_id = self.client_id.clone();
        let pending = registered.or_else(|| {
            (delay > 0).then(|| {
                let token = state.mqtt.next_id();
                (state.mqtt.schedule_will(&client_id, token), token)
            })
        });
        tokio::spawn(async move {
            if let Some((now, token)) = pending {
                // Told to go at once (a clean start ended the session), or
                // still pending when the delay ran out (nobody came back).
                let told = tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => false,
                    _ = now.notified() => true,
                };
                if !told && !state.mqtt.take_will(&client_id, token) {
                    return;
                }
            }
            let wp = &will.properties;
            let meta = meta(
                will.qos,
                will.retain,
                origin,
                Props {
                    user: &wp.user_properties,
                    content_type: wp.content_type.as_deref(),
                    response_topic: wp.response_topic.as_deref(),
                    correlation: wp.correlation_data.as_ref(),
                    utf8: wp.payload_is_utf8,
                    expiry: wp.message_expiry_interval,
                },
            );
            let _ = publish(&state, &principal, api_key, &will.topic_name, will.payload, meta).await;
        });
    }
}

/// Why an inbound publish was not accepted.
#[derive(Debug, Clone)]
enum Refused {
    NotAuthorized,
    PayloadFormat,
    Failed,
    /// Moderation rejected it (`0x83` with the rule and reason) or could
    /// not judge it and fails closed (`0x80`, `moderation_unavailable`).
    Moderated(Moderated),
}

impl Refused {
    fn puback(&self) -> PubackReasonCode {
        match self {
            Refused::NotAuthorized => PubackReasonCode::NotAuthorized,
            Refused::PayloadFormat => PubackReasonCode::PayloadFormatInvalid,
            Refused::Failed | Refused::Moderated(Moderated::Unavailable(_)) => PubackReasonCode::UnspecifiedError,
            Refused::Moderated(Moderated::Rejected(_)) => PubackReasonCode::ImplementationSpecificError,
        }
    }

    fn pubrec(&self) -> PubrecReasonCode {
        match self {
            Refused::NotAuthorized => PubrecReasonCode::NotAuthorized,
            Refused::PayloadFormat => PubrecReasonCode::PayloadFormatInvalid,
            Refused::Failed | Refused::Moderated(Moderated::Unavailable(_)) => PubrecReasonCode::UnspecifiedError,
            Refused::Moderated(Moderated::Rejected(_)) => PubrecReasonCode::ImplementationSpecificError,
        }
    }

    /// The reason string an MQTT 5 client is told.
    fn reason(&self) -> Option<String> {
        match self {
            Refused::Moderated(m) => {
                let e = m.api_error();
                Some(format!("{}: {}", e.code, e.message))
            }
            _ => None,
        }
    }
}

fn puback_with(pid: Pid, code: PubackReasonCode, reason: Option<String>) -> v5::Packet {
    let mut ack = v5::Puback::new(pid, code);
    ack.properties.reason_string = reason.map(Arc::from);
    v5::Packet::Puback(ack)
}

fn pubrec_with(pid: Pid, code: PubrecReasonCode, reason: Option<String>) -> v5::Packet {
    let mut ack = v5::Pubrec::new(pid, code);
    ack.properties.reason_string = reason.map(Arc::from);
    v5::Packet::Pubrec(ack)
}

fn disconnect_with(code: DisconnectReasonCode, reason: &str) -> v5::Packet {
    v5::Packet::Disconnect(v5::Disconnect {
        reason_code: code,
        properties: v5::DisconnectProperties { reason_string: Some(Arc::from(reason)), ..Default::default() },
    })
}

/// Publishes what an MQTT client (or its will) sent: a channel topic is stored
/// and fanned out like any publish; another topic is routed among MQTT
/// sessions. A retained message also replaces the topic's retained one.
async fn publish(
    state: &SharedState,
    principal: &Principal,
    api_key: bool,
    topic: &str,
    mut payload: Bytes,
    meta: Meta,
) -> Result<(), Refused> {
    if topic.starts_with('$') {
        return Err(Refused::NotAuthorized);
    }
    let meta = Arc::new(meta);
    match Channel::parse(topic) {
        Ok(channel) => {
            if !principal.may_publish(&channel) {
                return Err(Refused::NotAuthorized);
            }
            let json_declared = meta.content_type.as_deref().is_some_and(|c| c.starts_with("application/json"));
            let data = match json_declared.then(|| Data::json(payload.clone())) {
                Some(Ok(d)) => d,
                _ => Data::sniff(payload.clone()),
            };
            let p = crate::guard::Publish {
                channel: &channel,
                event: None,
                user: principal.user(),
                api_key,
                transport: "mqtt",
            };
            let data = state.guards.moderate(&p, data).await.map_err(Refused::Moderated)?;
            // A retained copy carries what was stored (masked or modified).
            payload = data.bytes().clone();
            let msg = NewMessage { channel, event: None, data, meta: Some(meta.clone()) };
            state.store.append(vec![msg]).await.map_err(|_| Refused::Failed)?;
        }
        Err(_) if principal.is_admin() => {
            state.mqtt.route(&Routed {
                topic: topic.into(),
                payload: payload.clone(),
                meta: meta.clone(),
                shared: None,
            });
        }
        Err(_) => return Err(Refused::NotAuthorized),
    }
    // Channel topics stored, other topics routed among MQTT sessions: both count.
    state.stats.published(Source::Mqtt, 1);
    if meta.retain {
        state.mqtt.retain(&Routed { topic: topic.into(), payload, meta, shared: None }).await.map_err(|e| {
            tracing::error!(error = %e, "storing a retained message failed");
            Refused::Failed
        })?;
    }
    Ok(())
}

/// The v5 properties a PUBLISH and a will share.
struct Props<'a> {
    user: &'a [UserProperty],
    content_type: Option<&'a str>,
    response_topic: Option<&'a str>,
    correlation: Option<&'a Bytes>,
    utf8: Option<bool>,
    expiry: Option<u32>,
}

fn meta(qos: QoS, retain: bool, origin: u64, p: Props<'_>) -> Meta {
    Meta {
        qos: codec::qos_u8(qos),
        retain,
        user_properties: p.user.iter().map(|u| (u.name.to_string(), u.value.to_string())).collect(),
        content_type: p.content_type.map(String::from),
        response_topic: p.response_topic.map(String::from),
        correlation_data: p.correlation.cloned(),
        payload_utf8: p.utf8,
        expires_at: p.expiry.map(|s| now_ms() + i64::from(s) * 1000),
        origin: Some(origin),
    }
}

/// Where a user's unread count is published: `$herald/unread/{user}`.
pub(crate) const UNREAD_PREFIX: &str = "$herald/unread/";

fn granted(qos: u8) -> SubscribeReasonCode {
    match qos {
        0 => SubscribeReasonCode::GrantedQoS0,
        1 => SubscribeReasonCode::GrantedQoS1,
        _ => SubscribeReasonCode::GrantedQoS2,
    }
}

/// Rebuilds a session an earlier run of the server stored, for `principal`
/// (who it belongs to): its Herald subscription resumes each channel after
/// its stored cursor (a channel with none, new since, from its start), and
/// each filter the principal may still use is subscribed again. Shared
/// subscriptions are not kept (see `persist`).
async fn restore(state: &SharedState, rec: StoredSession, principal: Arc<Principal>) -> Option<Session> {
    let allowed = |filter: &str| permitted(&principal, filter);
    let targets: Vec<Target> = rec.subs.iter().filter_map(|s| allowed(&s.filter).flatten()).collect();
    let cx = state.context(principal.clone(), true);
    let herald = Subscription::open(cx, targets, Since::After(0), &rec.cursor_token()).await.ok()?;
    let mut session = Session::new(rec.id, herald, state.config.mqtt.offline_queue, principal.clone());
    session.stored = true;
    session.expiry = rec.expiry;
    for sub in &rec.subs {
        if super::topic::shared(&sub.filter).is_some() {
            continue;
        }
        let Some(target) = allowed(&sub.filter) else { continue };
        if let Some(user) = sub.filter.strip_prefix(UNREAD_PREFIX) {
            session.herald.follow_unread(user).await.ok()?;
        } else if !matches!(target, Some(Target::Channel(_))) {
            state.mqtt.add_route(session.id, &sub.filter, session.routed.clone());
        }
        session.subs.insert(sub.filter.clone(), sub.opts());
    }
    Some(session)
}

/// Whether `principal` may hold the subscription `filter`: `None` if not,
/// else the Herald target it stands for (`None` inside for an unread-count
/// topic, a shared subscription's or a topic outside the channel names).
fn permitted(principal: &Principal, filter: &str) -> Option<Option<Target>> {
    if let Some(user) = filter.strip_prefix(UNREAD_PREFIX) {
        let ok = herald_core::channel::validate_segment(user).is_ok() && principal.may_access_inbox(user);
        return ok.then_some(None);
    }
    if let Some((_, inner)) = super::topic::shared(filter) {
        let ok = match Filter::parse(inner) {
            Ok(f) => principal.may_subscribe(&Target::from_filter(f)),
            Err(_) => principal.is_admin() && !inner.contains("$share"),
        };
        return ok.then_some(None);
    }
    match Filter::parse(filter) {
        Ok(f) => Some(Target::from_filter(f)).filter(|t| principal.may_subscribe(t)).map(Some),
        Err(_) => principal.is_admin().then_some(None),
    }
}

/// A session resumed with a new credential keeps only the subscriptions
/// that credential grants (a token reissued with fewer channels takes effect
/// on the next connection, not the next session).
fn revalidate(state: &SharedState, session: &mut Session, principal: Arc<Principal>) {
    let refused: Vec<String> =
        session.subs.iter().map(|(f, _)| f.clone()).filter(|f| permitted(&principal, f).is_none()).collect();
    for filter in refused {
        session.subs.remove(filter.as_str());
        if let Some((group, inner)) = super::topic::shared(&filter) {
            state.mqtt.leave_shared(group, inner, session.id);
        } else {
            state.mqtt.remove_route(session.id, &filter);
            if let Ok(f) = Filter::parse(&filter) {
                session.herald.remove(&Target::from_filter(f));
            }
        }
    }
    session.herald.set_principal(principal.clone());
    session.principal = principal;
}

fn disconnect(code: DisconnectReasonCode) -> v5::Packet {
    v5::Packet::Disconnect(v5::Disconnect { reason_code: code, properties: Default::default() })
}

fn pid_of(n: u16) -> Pid {
    Pid::try_from(n).expect("packet ids are never 0")
}

/// A flush, within the write timeout: `None` when done, else how the
/// connection ends (lost, or stalled that long: a slow consumer). One
/// that goes at once arms no timer (`Outbox` keeps its place when a
/// flush is stopped half-way). Its output is small on purpose: the
/// connection's loop holds it across an await.
async fn flush_within<W: AsyncWrite + Unpin>(wr: &mut Outbox<W>, guards: &crate::guard::Guards) -> Option<End> {
    let flushed = match wr.flush().now_or_never() {
        Some(done) => Ok(done),
        None => match guards.write_timeout() {
            Some(limit) => tokio::time::timeout(limit, wr.flush()).await,
            None => Ok(wr.flush().await),
        },
    };
    match flushed {
        Ok(Ok(())) => None,
        Ok(Err(_)) => Some(End::Lost),
        Err(_) => {
            guards.stats.slow_consumers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(End::SlowConsumer)
        }
    }
}
