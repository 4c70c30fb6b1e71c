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
use herald_core::{Channel, CursorToken, Gap, Principal, Since, Target, cursor};

use crate::{app::SharedState, error::ApiError, query::Query, stats::Transport, stream, subscription::Delivery};

/// Messages per answer when the client does not say.
const DEFAULT_LIMIT: usize = 100;

pub(crate) async fn messages(
    state: SharedState,
    principal: Arc<Principal>,
    channel: Channel,
    query: &Query,
) -> Result<Response, ApiError> {
    let since = query.get("since").map(Since::parse).transpose()?.unwrap_or(Since::After(0));
    let limit = query.positive("limit", DEFAULT_LIMIT)?.min(state.config.limits.poll_limit);
    let mut wait = query.get("wait").map(parse_wait).transpose()?.map(|w| w.min(state.config.longpoll.max_wait));
    // The unread count the client already shows: a different one is news.
    let known_unread = query.get("unread").map(cursor::parse_id).transpose()?;
    if let (Some(w), Some(exp)) = (wait.as_mut(), principal.expires_at()) {
        // Never wait past the token's expiry; the next poll is then refused.
        *w = (*w).min(stream::instant_of(exp).saturating_duration_since(tokio::time::Instant::now()));
    }
    let waiting = wait.is_some_and(|w| !w.is_zero());

    let _connection = waiting.then(|| state.stats.connect(Transport::LongPoll));
    let targets = vec![Target::Channel(channel.clone())];
    // The set-up and read futures are boxed: they are big and short-lived, and
    // inline they would size the future a long poll holds while it waits.
    let mut sub = Box::pin(state.subscribe(principal, targets, since, &CursorToken::default(), waiting)).await?;
    let mut answer = Answer::default();
    while answer.messages.len() < limit {
        match Box::pin(sub.next_ready()).await? {
            Some(d) => answer.push(d),
            None => break,
        }
    }
    let news = answer.has_news(known_unread);
    if !news && let Some(wait) = wait.filter(|_| waiting) {
        tokio::select! {
            d = sub.next() => answer.push(d?),
            _ = tokio::time::sleep(wait) => return Ok(not_modified()),
            _ = state.shutdown.cancelled() => return Ok(not_modified()),
        }
        // Whatever else is already here goes in the same answer.
        while answer.messages.len() < limit {
            match sub.try_next() {
                Some(d) => answer.push(d),
                None => break,
            }
        }
    }
    if let Some(owner) = channel.inbox_owner() {
        // The count as of now: a message can reach this poll before the count
        // it raises has been pushed to watchers.
        answer.unread = Some(Box::pin(state.inbox.count(owner)).await?);
    }
    state.stats.delivered(answer.messages.len() as u64);
    let next = sub.cursors().get(&channel).unwrap_or(0);
    Ok(answer.into_response(&channel, next))
}

/// A poll the HTTP front door parsed itself (no `Origin`, no
/// percent-escapes: nothing the router and its layers would change).
pub(crate) struct Direct {
    pub(crate) channel: Channel,
    pub(crate) query: Option<String>,
    pub(crate) authorization: Option<String>,
}

/// Answers a poll without the router: the same answer as
/// `GET /api/channels/{channel}/messages` through it, for less work per
/// request (no request object, routing, extractors or layers), which for a
/// long poll is every delivery.
///
/// A block, not an `async fn`: an async fn's arguments keep their room in the
/// future after moving on, and this future is what a long poll holds.
#[allow(clippy::manual_async_fn)] // see above: the block is the point
pub(crate) fn direct(state: SharedState, req: Direct) -> impl Future<Output = Response> + Send {
    async move {
        let query = Query::parse(req.query.as_deref());
        let credential = crate::auth::bearer(req.authorization.as_deref(), &query);
        let principal = match state.auth.authenticate_credential(credential) {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        messages(state, principal, req.channel, &query).await.unwrap_or_else(IntoResponse::into_response)
    }
}

fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    s.parse::<f64>().ok().filter(|w| w.is_finite() && *w >= 0.0).map(Duration::from_secs_f64).ok_or_else(|| {
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
}

impl Answer {
    fn push(&mut self, d: Delivery) {
        match d {
            Delivery::Message(m) => self.messages.push(m.json()),
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
