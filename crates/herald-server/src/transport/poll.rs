//! Short and long polling on `GET /api/channels/{channel}/messages`.
//!
//! Both answer with every message after `since` at once (up to `limit`), never
//! one per request. With `wait=S` and nothing new, the request waits up to S
//! seconds for a publish, then answers `304 Not Modified` with no body; the
//! client asks again with the same `since`.

use std::{sync::Arc, time::Duration};

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::{FutureExt, future::Either};
use herald_core::{Channel, CursorToken, Gap, Principal, Since, Target, cursor};

use crate::{
    api::stats::{CloseReason, Transport},
    edge::coalesce::Coalescer,
    edge::error::ApiError,
    edge::query::Query,
    edge::stream,
    guard::{Client, Permit, Who},
    metrics::WriteLatency,
    state::SharedState,
    subscription::Delivery,
};

/// `Params::known_unread` when the client gave none.
const NOT_GIVEN: u64 = u64::MAX;

/// Messages per answer when the client does not say.
const DEFAULT_LIMIT: usize = 100;

/// What a poll asks for, read from its query string up front: the strings
/// are not kept while a long poll waits.
pub(crate) struct Params {
    since: Since,
    /// At most `[limits] poll_limit`; a u32 so the waiting future stays as
    /// small as it was before the permit came.
    limit: u32,
    wait: Option<Duration>,
    /// The unread count the client already shows: a different one is news.
    /// (`NOT_GIVEN` when the client did not say: a count never gets there.
    /// Not an `Option`: eight bytes fewer in every waiting long poll, room
    /// for its connection permit.)
    known_unread: u64,
}

impl Params {
    pub(crate) fn parse(query: &Query, state: &SharedState) -> Result<Self, ApiError> {
        Ok(Params {
            since: query.get("since").map(Since::parse).transpose()?.unwrap_or(Since::After(0)),
            limit: query.positive("limit", DEFAULT_LIMIT)?.min(state.config.limits.poll_limit).min(u32::MAX as usize)
                as u32,
            wait: query.get("wait").map(parse_wait).transpose()?.map(|w| w.min(state.config.longpoll.max_wait)),
            known_unread: query.get("unread").map(cursor::parse_id).transpose()?.unwrap_or(NOT_GIVEN),
        })
    }

    /// A long poll counts as a connection while it waits (node, address and
    /// user counts; not new connections per address: a poller's next
    /// request is not one). A short poll holds no place.
    pub(crate) fn admit(&self, state: &SharedState, client: Client, who: Who) -> Result<Permit, ApiError> {
        match self.wait {
            Some(w) if !w.is_zero() => state.admit(client, who, false),
            _ => Ok(Permit::none()),
        }
    }
}

/// `coalesce`: the connection's, when it outlives this request (the front
/// door's keep-alive connections). A long poll on a connection that was
/// answered within the coalescing window waits out the rest of it before
/// answering, gathering what else arrives: in a burst a poller gets a batch
/// per window instead of a request per message or two (the request and its
/// answer are most of a long poll's cost). A quiet poller is answered at once.
///
/// A block, not an `async fn`, and `params` read in place: an async fn's
/// arguments, and locals moved out of them, keep their room in the future
/// after moving on, and this future is what a long poll holds while it waits.
#[allow(clippy::manual_async_fn)] // see above: the block is the point
pub(crate) fn messages(
    state: SharedState,
    principal: Arc<Principal>,
    channel: Channel,
    mut params: Params,
    permit: Permit,
    coalesce: &mut Coalescer,
) -> impl Future<Output = Result<Response, ApiError>> + Send {
    async move {
        // Its place in the connection counts, held (as captured: no copy
        // waits beside the rest) until the answer is done.
        let _ = &permit;
        if let (Some(w), Some(exp)) = (params.wait.as_mut(), principal.expires_at()) {
            // Never wait past the token's expiry; the next poll is then refused.
            *w = (*w).min(stream::instant_of(exp).saturating_duration_since(tokio::time::Instant::now()));
        }
        let waiting = params.wait.is_some_and(|w| !w.is_zero());

        // A waiting long poll counts as a connection; a short poll does not.
        let mut connection = waiting.then(|| state.stats.connect(Transport::LongPoll));
        let opened_ms = connection.as_ref().map(|c| c.opened_ms());
        let mut end = |reason| {
            if let Some(c) = connection.as_mut() {
                c.end(reason)
            }
        };
        let targets = vec![Target::Channel(channel.clone())];
        // The set-up and read futures are boxed: they are big and short-lived, and
        // inline they would size the future a long poll holds while it waits.
        let mut sub =
            Box::pin(state.subscribe(principal, targets, params.since, &CursorToken::default(), waiting)).await?;
        let mut answer = Answer::default();
        if let Some(opened_ms) = opened_ms {
            answer.latency = WriteLatency::new(opened_ms);
        }
        while answer.messages.len() < params.limit as usize {
            match Box::pin(sub.next_ready()).await? {
                Some(d) => answer.push(d),
                None => break,
            }
        }
        let news = answer.has_news(Some(params.known_unread).filter(|n| *n != NOT_GIVEN));
        if !news && let Some(wait) = params.wait.filter(|_| waiting) {
            tokio::select! {
                d = sub.next() => answer.push(d.inspect_err(|_| end(CloseReason::StoreError))?),
                _ = tokio::time::sleep(wait) => {
                    end(CloseReason::NotModified);
                    return Ok(not_modified());
                }
                _ = state.shutdown.cancelled() => {
                    end(CloseReason::Shutdown);
                    return Ok(not_modified());
                }
            }
        }
        if waiting && answer.messages.len() < params.limit as usize {
            // A busy poller waits for company; then whatever else is already
            // here goes in the same answer.
            Box::pin(coalesce.ready()).await;
            while answer.messages.len() < params.limit as usize {
                match sub.try_next() {
                    Some(d) => answer.push(d),
                    None => break,
                }
            }
        }
        if waiting {
            coalesce.wrote();
        }
        if let Some(owner) = channel.inbox_owner() {
            // The count as of now: a message can reach this poll before the count
            // it raises has been pushed to watchers.
            answer.unread = Some(Box::pin(state.inbox.count(owner)).await?);
        }
        end(CloseReason::Answered);
        let transport = if waiting { Transport::LongPoll } else { Transport::Poll };
        state.stats.delivered(transport, answer.messages.len() as u64);
        std::mem::take(&mut answer.latency).record(&state.metrics, transport);
        let next = sub.cursors().get(&channel).unwrap_or(0);
        Ok(answer.into_response(&channel, next))
    }
}

/// A poll the HTTP front door parsed itself (no `Origin`, no
/// percent-escapes: nothing the router and its layers would change).
pub(crate) struct Direct {
    pub(crate) channel: Channel,
    pub(crate) query: Option<String>,
    pub(crate) authorization: Option<String>,
    /// Who the front door says is asking (the router's guard layer does
    /// this for routed requests).
    pub(crate) client: Client,
}

/// Answers a poll without the router: the same answer as
/// `GET /api/channels/{channel}/messages` through it, for less work per
/// request (no request object, routing, extractors or layers), which for a
/// long poll is every delivery.
///
/// The request is read before the future is made: its strings (query,
/// credential) are freed before a long poll starts waiting.
pub(crate) fn direct(
    state: SharedState,
    req: Direct,
    coalesce: &mut Coalescer,
) -> impl Future<Output = Response> + Send {
    let asked = {
        let query = Query::parse(req.query.as_deref());
        let credential = crate::auth::bearer(req.authorization.as_deref(), &query);
        let principal = state.auth.authenticate_bearer(req.authorization.as_deref(), &query);
        // The request counts before its credential is judged: failing ones
        // are the address's.
        let who = match &principal {
            Ok(p) => state.guards.who(p, credential),
            Err(_) => Who::Anonymous,
        };
        state.guards.check_request(req.client, who).and(principal).and_then(|principal| {
            let params = Params::parse(&query, &state)?;
            let permit = params.admit(&state, req.client, who)?;
            Ok((principal, params, permit))
        })
    };
    match asked {
        Ok((principal, params, permit)) => Either::Left(
            messages(state, principal, req.channel, params, permit, coalesce)
                .map(|answer| answer.unwrap_or_else(IntoResponse::into_response)),
        ),
        Err(e) => Either::Right(std::future::ready(e.into_response())),
    }
}

fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    // Any finite wait is capped by `[longpoll] max_wait` later; one past what a
    // Duration holds panicked here (found by schemathesis: `wait=8e307`).
    let secs = s.parse::<f64>().ok().filter(|w| w.is_finite() && *w >= 0.0);
    secs.map(|w| Duration::try_from_secs_f64(w).unwrap_or(Duration::MAX)).ok_or_else(|| {
        ApiError::bad_request("invalid_parameter", format!("'wait' must be a number of seconds, got '{s}'"))
    })
}

fn not_modified() -> Response {
    let mut res = StatusCode::NOT_MODIFIED.into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[derive(Default)]
struct Answer {
    messages: Vec<bytes::Bytes>,
    missed: Option<Gap>,
    /// The inbox owner's unread count, on inbox channels.
    unread: Option<u64>,
    /// A long poll's: its oldest message committed while it waited.
    latency: WriteLatency,
}

impl Answer {
    fn push(&mut self, d: Delivery) {
        match d {
            Delivery::Message(m) => {
                self.latency.note(&m);
                self.messages.push(m.json())
            }
            // Two gaps in one answer (history trimmed between pages) merge.
            Delivery::Gap(g) => match &mut self.missed {
                Some(prev) => prev.to = g.to,
                None => self.missed = Some(*g),
            },
            Delivery::Unread(n) => self.unread = Some(n),
        }
    }

    /// Worth answering a long poll for: messages, a gap, or an unread count
    /// other than the one the client said it shows.
    fn has_news(&self, known_unread: Option<u64>) -> bool {
        !self.messages.is_empty()
            || self.missed.is_some()
            || (known_unread.is_some() && self.unread.is_some() && self.unread != known_unread)
    }

    /// `{"channel","messages":[..],"next":N,"gap":bool,"missed"?:{..}}`, built
    /// from each message's cached JSON.
    fn into_response(self, channel: &Channel, next: u64) -> Response {
        let mut out = Vec::with_capacity(64 + self.messages.iter().map(|m| m.len() + 1).sum::<usize>());
        out.extend_from_slice(b"{\"channel\":");
        serde_json::to_writer(&mut out, channel.as_str()).expect("vec write");
        out.extend_from_slice(b",\"messages\":[");
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(m);
        }
        out.extend_from_slice(format!("],\"next\":{next},\"gap\":{}", self.missed.is_some()).as_bytes());
        if let Some(g) = &self.missed {
            out.extend_from_slice(b",\"missed\":");
            serde_json::to_writer(&mut out, g).expect("vec write");
        }
        if let Some(n) = self.unread {
            out.extend_from_slice(format!(",\"unread\":{n}").as_bytes());
        }
        out.push(b'}');
        let mut res = (StatusCode::OK, out).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res
    }
}

#[cfg(test)]
mod tests {
    use herald_core::{Data, NewMessage};
    use http_body_util::BodyExt;
    use tokio::time::Instant;

    use super::*;
    use crate::edge::coalesce::WINDOW;

    async fn open_state() -> SharedState {
        let mut config = crate::config::Config::default();
        config.server.memory = true;
        config.server.http = "127.0.0.1:0".parse().unwrap();
        config.server.mqtt = "off".into();
        crate::server::Server::bind(config, Default::default()).await.unwrap().state().clone()
    }

    async fn publish(state: &SharedState, text: &str) {
        let m = NewMessage { channel: Channel::parse("c").unwrap(), event: None, data: Data::text(text), meta: None };
        state.store.append(vec![m]).await.unwrap();
    }

    async fn ids(res: Response) -> Vec<u64> {
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_long_poller_gets_what_comes_within_the_window_in_one_answer() {
        let state = open_state().await;
        let admin = state.auth.authenticate_credential(None).unwrap();
        let channel = Channel::parse("c").unwrap();
        let mut coalesce = Coalescer::default();
        publish(&state, "1").await;

        // A quiet connection is answered at once.
        let start = Instant::now();
        let params = Params::parse(&Query::parse(Some("since=0&wait=30")), &state).unwrap();
        let res = messages(state.clone(), admin.clone(), channel.clone(), params, Permit::none(), &mut coalesce)
            .await
            .unwrap();
        assert_eq!(ids(res).await, [1]);
        assert_eq!(Instant::now(), start, "nothing waited");

        // Answered just now, it waits out the window for what else comes.
        let params = Params::parse(&Query::parse(Some("since=1&wait=30")), &state).unwrap();
        let poll = messages(state.clone(), admin.clone(), channel.clone(), params, Permit::none(), &mut coalesce);
        let burst = async {
            for text in ["2", "3", "4"] {
                publish(&state, text).await;
            }
        };
        let (res, ()) = tokio::join!(poll, burst);
        assert_eq!(ids(res.unwrap()).await, [2, 3, 4]);
        assert_eq!(Instant::now(), start + WINDOW, "answered at the window's end");
    }
}
