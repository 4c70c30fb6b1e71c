//! One subscription, whatever the transport: "replay from the cursor, then go
//! live", as a sequence of [`Delivery`] items in id order per channel, with no
//! duplicates and no holes.
//!
//! It registers with the hub *before* reading history, so nothing published in
//! between is missed; live messages already covered by the replay are dropped by
//! comparing ids with the per-channel cursor. When the hub reports the mailbox
//! overflowed, the subscription re-reads from the store after its cursors
//! ("catch-up") before taking anything else from the mailbox. Transports only
//! encode what comes out.
//!
//! With `[limits] max_lag`, a subscriber whose oldest undelivered message is
//! older than that when it lags (or while it catches up) is not caught up:
//! its next delivery is [`SubscriptionError::TooFarBehind`], and its
//! transport closes it as a slow consumer. It resumes from its cursor.

pub mod cursors;

use std::{collections::VecDeque, sync::Arc, time::Duration};

use herald_core::{Channel, CursorToken, Filter, Gap, Hub, Message, Principal, Since, Subscriber, Target, cursor};
use herald_store::{Store, StoreError};

use self::cursors::Cursors;
use crate::inbox::{Inbox, UnreadWatch};

/// What a transport sends next.
#[derive(Debug, Clone)]
pub enum Delivery {
    Message(Arc<Message>),
    /// Boxed: rare, and inline it would make every queued delivery 40 bytes.
    Gap(Box<Gap>),
    /// The unread count of the inbox this subscription includes.
    Unread(u64),
}

/// Why a subscription cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Past `[limits] max_lag` behind: close, and let the client resume.
    #[error("the subscriber fell too far behind")]
    TooFarBehind,
}

impl SubscriptionError {
    pub fn is_lagging(&self) -> bool {
        matches!(self, SubscriptionError::TooFarBehind)
    }
}

/// What a subscription is opened with.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<dyn Store>,
    /// `None` for one-shot reads (short polling): nothing is registered.
    pub hub: Option<Arc<Hub>>,
    /// Present when inbox channels should carry unread counts.
    pub inbox: Option<Arc<Inbox>>,
    /// Every message is checked against it before delivery.
    pub principal: Arc<Principal>,
    /// Close instead of catching up when this far behind (`None`: never).
    pub max_lag: Option<Duration>,
}

/// What [`Subscription::add`] reports for the `subscribed` answer.
#[derive(Debug, Clone, Copy)]
pub struct Added {
    /// The channel's latest id (channels only).
    pub head: Option<u64>,
    /// Whether a `gap` comes before the replayed messages.
    pub gap: bool,
}

/// History still to read, in order.
#[derive(Debug, Clone)]
enum Backlog {
    /// Read `channel` after `after` until the store has no more.
    Read { channel: Channel, after: u64 },
    /// Find channels matching a filter that this subscription has not seen yet
    /// (they appeared while it lagged) and read them from the start.
    Discover(Filter),
}

pub struct Subscription {
    store: Arc<dyn Store>,
    principal: Arc<Principal>,
    inbox: Option<Arc<Inbox>>,
    /// The count of the first inbox channel subscribed to, if any.
    /// Boxed: few subscriptions follow a count, and it is 48 bytes inline.
    unread: Option<Box<UnreadWatch>>,
    /// The current count is owed to the client (it comes first, then on change).
    unread_due: bool,
    /// The backlog is a catch-up after a lag (not a replay the client asked for).
    catching_up: bool,
    /// Found past `max_lag` behind: every further call says so.
    too_far_behind: bool,
    /// `[limits] max_lag` in milliseconds; 0: never.
    max_lag_ms: u32,
    /// `None` for one-shot reads (short polling): nothing is registered.
    live: Option<Subscriber>,
    filters: Vec<Filter>,
    /// The last id handed out per channel.
    cursors: Cursors,
    backlog: VecDeque<Backlog>,
    ready: VecDeque<Delivery>,
    page: usize,
    /// Jumps in live ids caught (each sent this subscription to the store).
    holes: u32,
}

/// Messages read from the store per round trip.
const PAGE: usize = 256;

/// How soon a live subscription reads again when the store is unavailable,
/// first and at most.
const STORE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const STORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl Subscription {
    /// Opens a subscription to `targets`. Each channel starts from its entry in
    /// `token` if it has one, else from `since`.
    pub async fn open(
        cx: Context,
        targets: Vec<Target>,
        since: Since,
        token: &CursorToken,
    ) -> Result<Self, StoreError> {
        let mut s = Subscription {
            store: cx.store,
            principal: cx.principal,
            inbox: cx.inbox,
            unread: None,
            unread_due: false,
            catching_up: false,
            too_far_behind: false,
            max_lag_ms: cx.max_lag.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32),
            live: cx.hub.as_ref().map(|h| h.subscriber()),
            filters: Vec::new(),
            cursors: Cursors::default(),
            backlog: VecDeque::new(),
            ready: VecDeque::new(),
            page: PAGE,
            holes: 0,
        };
        let mut starts = Vec::with_capacity(targets.len());
        for t in &targets {
            starts.push(s.resolve_now(t, since, token).await?);
        }
        // Register everything before reading anything, so nothing published
        // meanwhile falls between history and live.
        if let Some(sub) = s.live.as_mut() {
            for t in &targets {
                sub.add(t.clone());
            }
        }
        for (t, since) in targets.into_iter().zip(starts) {
            s.start(t, since, token).await?;
        }
        Ok(s)
    }

    /// Adds a target to a live subscription (WebSocket `subscribe`) and tells
    /// what the client should be told first: the channel's head (for a channel)
    /// and whether a gap precedes the replay.
    pub async fn add(&mut self, target: Target, since: Since) -> Result<Added, StoreError> {
        let since = self.resolve_now(&target, since, &CursorToken::default()).await?;
        if let Some(sub) = self.live.as_mut() {
            sub.add(target.clone());
        }
        let head = match &target {
            Target::Channel(ch) => Some(self.head(ch).await?),
            Target::Filter(_) => None,
        };
        let scheduled = self.start(target, since, &CursorToken::default()).await?;
        let mut gap = false;
        for (ch, from) in scheduled {
            if self.store.cached_head(&ch) == Some(from) {
                continue; // at the head: no gap
            }
            let window = self.store.read(ch.clone(), 0, 0).await?.window;
            gap |= cursor::plan(&ch, from, window).gap.is_some();
        }
        Ok(Added { head, gap })
    }

    /// Stops delivering `target`: forgets its channels' cursors and drops what
    /// was queued for them, unless another target still covers them.
    pub fn remove(&mut self, target: &Target) -> bool {
        let Some(sub) = self.live.as_mut() else { return false };
        if !sub.remove(target) {
            return false;
        }
        self.filters.retain(|f| !matches!(target, Target::Filter(g) if g == f));
        let sub = self.live.as_ref().expect("checked above");
        self.cursors.retain(|ch| sub.listens_to(ch));
        self.ready.retain(|d| match d {
            Delivery::Message(m) => sub.listens_to(&m.channel),
            Delivery::Gap(g) => sub.listens_to(&g.channel),
            Delivery::Unread(_) => true,
        });
        self.backlog.retain(|b| match b {
            Backlog::Read { channel, .. } => sub.listens_to(channel),
            Backlog::Discover(f) => !matches!(target, Target::Filter(g) if g == f),
        });
        true
    }

    /// Where `target` starts, called *before* registering it: `now` on a
    /// channel (with no cursor in `token`) becomes a cursor at the channel's
    /// head as it is now. A message committed while the subscription
    /// registers is then read back or received live (and deduplicated); with
    /// the head read after registering, it could already be in the mailbox
    /// and the cursor dropped it. Filters resolve `now` per channel later.
    async fn resolve_now(&self, target: &Target, since: Since, token: &CursorToken) -> Result<Since, StoreError> {
        match (target, since) {
            (Target::Channel(ch), Since::Now) if !token.0.contains_key(ch) => Ok(Since::After(self.head(ch).await?)),
            _ => Ok(since),
        }
    }

    /// Starts carrying `user`'s unread count (MQTT's `$herald/unread/{user}`).
    pub async fn follow_unread(&mut self, user: &str) -> Result<(), StoreError> {
        match herald_core::inbox::user_channel(user) {
            Some(c) => self.watch_inbox(&c).await,
            None => Ok(()),
        }
    }

    /// Starts carrying `channel`'s owner's unread count if it is an inbox (the
    /// first one only: a client follows one inbox per connection).
    async fn watch_inbox(&mut self, channel: &Channel) -> Result<(), StoreError> {
        if let (Some(owner), Some(inbox), None) = (channel.inbox_owner(), &self.inbox, &self.unread) {
            self.unread = Some(Box::new(inbox.watch(owner).await?));
            self.unread_due = true;
        }
        Ok(())
    }

    /// Starts a target; returns the channels whose replay it scheduled.
    async fn start(
        &mut self,
        target: Target,
        since: Since,
        token: &CursorToken,
    ) -> Result<Vec<(Channel, u64)>, StoreError> {
        let mut scheduled = Vec::new();
        match target {
            Target::Channel(ch) => {
                self.watch_inbox(&ch).await?;
                let start = token.0.get(&ch).map_or(since, |id| Since::After(*id));
                // `now` on a channel was resolved before registering.
                debug_assert!(!matches!(start, Since::Now), "resolve_now runs first");
                scheduled.extend(self.start_channel(ch.clone(), start, 0).map(|from| (ch, from)));
            }
            Target::Filter(f) => {
                let mut found = self.store.channels(f.clone()).await?;
                found.retain(|(c, _)| self.principal.may_read(c));
                for (ch, head) in found {
                    let start = token.0.get(&ch).map_or(since, |id| Since::After(*id));
                    scheduled.extend(self.start_channel(ch.clone(), start, head).map(|from| (ch, from)));
                }
                if !self.filters.contains(&f) {
                    self.filters.push(f);
                }
            }
        }
        Ok(scheduled)
    }

    /// Schedules `channel` from `start`; `head` resolves `since=now`. Returns
    /// the cursor its replay starts after, when a replay was scheduled.
    fn start_channel(&mut self, channel: Channel, start: Since, head: u64) -> Option<u64> {
        let from = start.resolve(head);
        if let Some(cur) = self.cursors.get(&channel)
            && (cur <= from || !self.cursors.is_untouched(&channel))
        {
            // Already covered from at least as early (a channel named twice,
            // or by a channel and a filter), or already delivered from: going
            // back would hand the client messages twice.
            return None;
        }
        // An earlier start for a channel nothing was delivered from yet: replay
        // it from there instead, dropping what was queued for it.
        self.backlog.retain(|b| !matches!(b, Backlog::Read { channel: c, .. } if *c == channel));
        self.ready.retain(|d| !matches!(d, Delivery::Message(m) if m.channel == channel));
        self.cursors.place(&channel, from);
        match start {
            Since::Now => None,
            Since::After(_) => {
                self.backlog.push_back(Backlog::Read { channel, after: from });
                Some(from)
            }
        }
    }

    /// The channel's head: from the store's cache when it knows, else read.
    async fn head(&self, channel: &Channel) -> Result<u64, StoreError> {
        match self.store.cached_head(channel) {
            Some(head) => Ok(head),
            None => Ok(self.store.read(channel.clone(), 0, 0).await?.window.head),
        }
    }

    /// The last id handed out for each channel: the cursor a client resumes from.
    /// The credential it reads with from now on (a resumed MQTT session's
    /// new connection); the caller has removed what it no longer grants.
    pub fn set_principal(&mut self, principal: Arc<Principal>) {
        self.principal = principal;
    }

    pub fn cursors(&self) -> &Cursors {
        &self.cursors
    }

    /// The next delivery that needs no waiting for new publishes: replayed
    /// history (reading the store as needed), then whatever is already queued.
    pub async fn next_ready(&mut self) -> Result<Option<Delivery>, SubscriptionError> {
        loop {
            if self.too_far_behind {
                return Err(SubscriptionError::TooFarBehind);
            }
            if let Some(n) = self.take_unread() {
                return Ok(Some(Delivery::Unread(n)));
            }
            if let Some(d) = self.pop_ready() {
                return Ok(Some(d));
            }
            if let Some(item) = self.backlog.front().cloned() {
                // Cancel-safe: the item is removed only after the read finished.
                self.process(item).await?;
                continue;
            }
            match self.live.as_mut().and_then(Subscriber::try_recv) {
                Some(msg) => self.accept_live(msg),
                None => return Ok(None),
            }
        }
    }

    /// Like [`Self::next_ready`] but never touches the store: for batching what
    /// is already in memory behind a delivery that was just awaited.
    pub fn try_next(&mut self) -> Option<Delivery> {
        loop {
            if self.too_far_behind {
                return None; // `next` and `next_ready` say why
            }
            if let Some(n) = self.take_unread() {
                return Some(Delivery::Unread(n));
            }
            if let Some(d) = self.pop_ready() {
                return Some(d);
            }
            if !self.backlog.is_empty() {
                return None;
            }
            let msg = self.live.as_mut()?.try_recv()?;
            self.accept_live(msg);
        }
    }

    /// The next delivery, waiting for a publish if need be. Cancel-safe. For a
    /// one-shot subscription with nothing left, or once the hub has closed,
    /// waits forever (the caller watches shutdown).
    ///
    /// Most of the time this is a small future waiting on the mailbox alone;
    /// the general one (store reads, unread counts) is several hundred bytes
    /// and is boxed, so a connection task waiting here is sized for the
    /// common case.
    pub async fn next(&mut self) -> Result<Delivery, SubscriptionError> {
        loop {
            if let Some(d) = self.try_next() {
                return Ok(d);
            }
            if !self.is_memory_only() {
                match Box::pin(self.next_general()).await? {
                    Some(d) => return Ok(d),
                    None => continue,
                }
            }
            if !std::future::poll_fn(|cx| self.poll_live(cx)).await {
                return std::future::pending().await;
            }
        }
    }

    /// The next delivery while the subscription needs the store (history to
    /// read) or follows an unread count; `None` as soon as it needs neither and
    /// nothing is ready, so the caller waits the lean way ([`Self::poll_live`])
    /// instead of holding this future for as long as the connection is idle
    /// (heaptrack: 630 bytes of every idle SSE stream that began with a replay).
    pub async fn next_general(&mut self) -> Result<Option<Delivery>, SubscriptionError> {
        let mut pause = STORE_RETRY_MIN;
        loop {
            match self.next_ready().await {
                Ok(Some(d)) => return Ok(Some(d)),
                Ok(None) => {}
                Err(SubscriptionError::Store(StoreError::Unavailable(why))) if self.live.is_some() => {
                    // The store is away (Redis unreachable): a live stream
                    // stays open, its heartbeats go on (they are timed by
                    // whoever polls this), and it reads again shortly; what
                    // is published meanwhile waits in the mailbox or, past
                    // it, in the store.
                    tracing::debug!(%why, ?pause, "store unavailable; the subscription reads again shortly");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(STORE_RETRY_MAX);
                    continue;
                }
                Err(e) => return Err(e),
            }
            if self.is_memory_only() {
                return Ok(None);
            }
            let unread_changed = async {
                match self.unread.as_mut() {
                    Some(w) => w.rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let Some(sub) = self.live.as_mut() else {
                if unread_changed.await {
                    self.unread_due = true;
                }
                continue;
            };
            tokio::select! {
                m = sub.recv() => match m {
                    Some(msg) => self.accept_live(msg),
                    None => return std::future::pending().await,
                },
                changed = unread_changed => if changed { self.unread_due = true },
            }
        }
    }

    /// Whether [`Self::try_next`] and [`Self::poll_live`] are all this
    /// subscription needs right now. Not when history remains to be read (the
    /// store is async) or an unread count is followed (its watch is a future):
    /// then [`Self::next`] is the way.
    pub fn is_memory_only(&self) -> bool {
        self.backlog.is_empty() && self.unread.is_none() && !self.too_far_behind
    }

    /// Waits for the mailbox without a future to hold: `Ready(true)` when a
    /// message came (take it with [`Self::try_next`]), `Ready(false)` when the
    /// hub closed (shutdown). Pending forever for a one-shot subscription.
    pub fn poll_live(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
        use std::task::Poll;
        let Some(sub) = self.live.as_mut() else { return Poll::Pending };
        match sub.poll_recv(cx) {
            Poll::Ready(Some(msg)) => {
                self.accept_live(msg);
                Poll::Ready(true)
            }
            Poll::Ready(None) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The unread count when it is owed: first thing, then after each change.
    fn take_unread(&mut self) -> Option<u64> {
        let w = self.unread.as_mut()?;
        if std::mem::take(&mut self.unread_due) || w.rx.has_changed().unwrap_or(false) {
            return Some(*w.rx.borrow_and_update());
        }
        None
    }

    fn accept_live(&mut self, msg: Arc<Message>) {
        if !self.principal.may_read(&msg.channel) {
            return;
        }
        let lagged = self.live.as_ref().is_some_and(Subscriber::take_lagged);
        if lagged {
            // Messages were dropped after this one (the mailbox was full), so
            // it is the oldest the subscriber has not had: its age is how far
            // behind the subscriber is.
            if self.is_too_old(msg.time) {
                self.too_far_behind = true;
                return;
            }
            // It is committed, so the catch-up read returns it too, in order.
            self.schedule_catch_up();
        } else {
            self.ready.push_back(Delivery::Message(msg));
        }
    }

    /// Whether a message from `time` (ms) is older than `max_lag`.
    fn is_too_old(&self, time: i64) -> bool {
        self.max_lag_ms > 0 && herald_store::now_ms().saturating_sub(time) > i64::from(self.max_lag_ms)
    }

    fn schedule_catch_up(&mut self) {
        tracing::debug!(channels = self.cursors.iter().count(), "subscriber lagged; catching up from the store");
        self.catching_up = true;
        for (ch, id) in self.cursors.iter() {
            self.backlog.push_back(Backlog::Read { channel: ch.clone(), after: id });
        }
        for f in &self.filters {
            self.backlog.push_back(Backlog::Discover(f.clone()));
        }
    }

    async fn process(&mut self, item: Backlog) -> Result<(), StoreError> {
        match item {
            Backlog::Read { channel, after } if self.store.cached_head(&channel) == Some(after) => {
                // At the head (a long poll or a reconnect that missed nothing,
                // most of them): nothing to read, and what comes next arrives live.
                self.backlog.pop_front();
            }
            Backlog::Read { channel, after } => {
                let mut page = self.store.read(channel.clone(), after, self.page).await?;
                let plan = cursor::plan(&channel, after, page.window);
                if plan.after != after && page.messages.is_empty() && plan.gap.as_ref().is_some_and(|g| g.reset) {
                    // The cursor was ahead of the head: read from the oldest instead.
                    page = self.store.read(channel.clone(), plan.after, self.page).await?;
                }
                self.backlog.pop_front();
                // Catching up, and still past max_lag behind: give up.
                if self.catching_up && page.messages.first().is_some_and(|m| self.is_too_old(m.time)) {
                    self.too_far_behind = true;
                    return Ok(());
                }
                let mut prev = plan.after;
                match plan.gap {
                    Some(gap) => self.ready.push_back(Delivery::Gap(Box::new(gap))),
                    // From 0 on a channel whose ids begin at an origin: the
                    // ids below it never were, so the cursor starts there
                    // (nothing else of this channel is queued: the backlog
                    // is read only once everything ready went out).
                    None if plan.after > after => self.cursors.moved(&channel, plan.after),
                    None => {}
                }
                let full = page.messages.len() == self.page;
                let last = page.messages.last().map(|m| m.id);
                for m in page.messages {
                    // A hole inside the stored history itself (ids that
                    // went on from a higher base after a store lost data)
                    // is told as a gap, so the live check below never
                    // sends the reader back for what is not there.
                    if m.id > prev + 1 {
                        let gap = Gap { channel: channel.clone(), from: prev + 1, to: m.id - 1, reset: false };
                        self.ready.push_back(Delivery::Gap(Box::new(gap)));
                    }
                    prev = m.id;
                    self.ready.push_back(Delivery::Message(m));
                }
                if full && let Some(last) = last {
                    self.backlog.push_front(Backlog::Read { channel, after: last });
                }
            }
            Backlog::Discover(filter) => {
                let mut found = self.store.channels(filter).await?;
                found.retain(|(c, _)| self.principal.may_read(c));
                self.backlog.pop_front();
                for (ch, _) in found {
                    if self.cursors.get(&ch).is_none() {
                        self.cursors.moved(&ch, 0);
                        self.backlog.push_back(Backlog::Read { channel: ch, after: 0 });
                    }
                }
            }
        }
        if self.backlog.is_empty() {
            // Caught up: an idle connection keeps no room for more (heaptrack:
            // 116 bytes of every WebSocket that subscribed with a replay).
            self.backlog = VecDeque::new();
            if std::mem::take(&mut self.catching_up)
                && let Some(sub) = &self.live
            {
                sub.caught_up();
            }
        }
        Ok(())
    }

    /// Pops the next item, dropping messages at or before the channel's cursor
    /// and advancing the cursor past what is handed out.
    fn pop_ready(&mut self) -> Option<Delivery> {
        while let Some(d) = self.ready.pop_front() {
            match &d {
                Delivery::Message(m) => {
                    match self.cursors.get(&m.channel) {
                        Some(cur) if m.id <= cur => continue,
                        Some(cur) if m.id > cur + 1 => {
                            // Ids must come as cursor + 1: a jump means
                            // something did not arrive (over Redis, a feed
                            // message lost on the way). Read the channel
                            // from the store after the cursor instead; what
                            // is queued for it comes again from there.
                            let channel = m.channel.clone();
                            self.ready.retain(|d| !matches!(d, Delivery::Message(x) if x.channel == channel));
                            self.backlog.push_back(Backlog::Read { channel, after: cur });
                            self.holes += 1;
                            continue;
                        }
                        _ => {}
                    }
                    self.cursors.moved(&m.channel, m.id);
                }
                Delivery::Gap(g) => {
                    self.cursors.moved(&g.channel, g.to);
                }
                Delivery::Unread(_) => {}
            }
            return Some(d);
        }
        if self.ready.capacity() > 4 {
            // A replay or a burst drained: its room goes back. (Four, a live
            // message's pass through, stay: 64 bytes, not an allocation each.)
            self.ready = VecDeque::new();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Data, NewMessage, RetentionRules};
    use herald_store::{MemoryStore, StoreConfig, system_clock};

    fn setup(capacity: usize, retention: RetentionRules) -> (Arc<dyn Store>, Arc<Hub>) {
        let hub = Hub::new(capacity);
        let store = MemoryStore::new(StoreConfig { retention, clock: system_clock(), sink: hub.clone() });
        (Arc::new(store), hub)
    }

    fn cx(store: &Arc<dyn Store>, hub: Option<&Arc<Hub>>) -> Context {
        Context {
            store: store.clone(),
            hub: hub.cloned(),
            inbox: None,
            principal: Arc::new(Principal::Admin),
            max_lag: None,
        }
    }

    async fn publish(store: &Arc<dyn Store>, ch: &str, n: usize) {
        for i in 0..n {
            let m = NewMessage {
                channel: Channel::parse(ch).unwrap(),
                event: None,
                data: Data::text(i.to_string()),
                meta: None,
            };
            store.append(vec![m]).await.unwrap();
        }
    }

    fn ids(ds: &[Delivery]) -> Vec<String> {
        ds.iter()
            .map(|d| match d {
                Delivery::Message(m) => format!("{}:{}", m.channel, m.id),
                Delivery::Gap(g) => format!("gap {}:{}-{}", g.channel, g.from, g.to),
                Delivery::Unread(n) => format!("unread {n}"),
            })
            .collect()
    }

    async fn drain(s: &mut Subscription) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Some(d) = s.next_ready().await.unwrap() {
            out.push(d);
        }
        out
    }

    #[tokio::test]
    async fn replays_then_goes_live_without_duplicates() {
        let (store, hub) = setup(64, RetentionRules::default());
        publish(&store, "c", 3).await;
        let t = vec![Target::Channel(Channel::parse("c").unwrap())];
        let mut s =
            Subscription::open(cx(&store, Some(&hub)), t, Since::After(1), &CursorToken::default()).await.unwrap();
        publish(&store, "c", 2).await; // lands in the mailbox and in the store
        assert_eq!(ids(&drain(&mut s).await), ["c:2", "c:3", "c:4", "c:5"]);
        publish(&store, "c", 1).await;
        assert_eq!(ids(&[s.next().await.unwrap()]), ["c:6"]);
    }

    #[tokio::test]
    async fn since_now_skips_history_and_gap_reports_trimmed_ids() {
        let (store, hub) =
            setup(64, RetentionRules { default: herald_core::Retention { size: 2, ttl_ms: None }, rules: vec![] });
        publish(&store, "c", 5).await;
        let t = || vec![Target::Channel(Channel::parse("c").unwrap())];
        let mut now =
            Subscription::open(cx(&store, Some(&hub)), t(), Since::Now, &CursorToken::default()).await.unwrap();
        assert!(drain(&mut now).await.is_empty());
        assert_eq!(now.cursors().get(&Channel::parse("c").unwrap()), Some(5));
        let mut old =
            Subscription::open(cx(&store, None), t(), Since::After(1), &CursorToken::default()).await.unwrap();
        assert_eq!(ids(&drain(&mut old).await), ["gap c:2-3", "c:4", "c:5"]);
    }

    #[tokio::test]
    async fn lagging_subscriber_catches_up_from_the_store() {
        let (store, hub) = setup(2, RetentionRules::default());
        let t = vec![Target::Filter(Filter::parse("room/+").unwrap())];
        let mut s =
            Subscription::open(cx(&store, Some(&hub)), t, Since::After(0), &CursorToken::default()).await.unwrap();
        publish(&store, "room/a", 5).await;
        publish(&store, "room/b", 3).await;
        let got = ids(&drain(&mut s).await);
        let a: Vec<_> = got.iter().filter(|x| x.starts_with("room/a")).cloned().collect();
        let b: Vec<_> = got.iter().filter(|x| x.starts_with("room/b")).cloned().collect();
        assert_eq!(a, ["room/a:1", "room/a:2", "room/a:3", "room/a:4", "room/a:5"]);
        assert_eq!(b, ["room/b:1", "room/b:2", "room/b:3"]);
    }

    /// Messages committed a minute ago (the store's clock says so): a
    /// subscriber that lags on them is past a 30 s `max_lag` and is told so
    /// instead of catching up; one with no limit catches up; one that never
    /// lagged is not affected.
    #[tokio::test]
    async fn a_lagging_subscriber_past_max_lag_is_closed_instead_of_caught_up() {
        let a_minute_ago: herald_store::Clock = Arc::new(|| herald_store::now_ms() - 60_000);
        let setup = |mailbox: usize| {
            let hub = Hub::new(mailbox);
            let config =
                StoreConfig { retention: RetentionRules::default(), clock: a_minute_ago.clone(), sink: hub.clone() };
            (Arc::new(MemoryStore::new(config)) as Arc<dyn Store>, hub)
        };
        let t = || vec![Target::Channel(Channel::parse("c").unwrap())];
        let none = CursorToken::default();
        let open = |store: &Arc<dyn Store>, hub: &Arc<Hub>, max_lag: Option<Duration>| {
            let cx = Context { max_lag, ..cx(store, Some(hub)) };
            Subscription::open(cx, t(), Since::Now, &none)
        };
        let (store, hub) = setup(2);
        let mut limited = open(&store, &hub, Some(Duration::from_secs(30))).await.unwrap();
        let mut unlimited = open(&store, &hub, None).await.unwrap();
        assert!(drain(&mut limited).await.is_empty() && drain(&mut unlimited).await.is_empty());
        publish(&store, "c", 5).await; // two fit in each mailbox: both lag
        assert!(matches!(limited.next_ready().await, Err(SubscriptionError::TooFarBehind)));
        assert!(limited.next().await.unwrap_err().is_lagging(), "and stays so");
        assert_eq!(ids(&drain(&mut unlimited).await), ["c:1", "c:2", "c:3", "c:4", "c:5"], "caught up");

        let (store, hub) = setup(64);
        let mut within = open(&store, &hub, Some(Duration::from_secs(30))).await.unwrap();
        assert!(drain(&mut within).await.is_empty());
        publish(&store, "c", 5).await;
        assert_eq!(drain(&mut within).await.len(), 5, "old messages, but no lag: delivered");
    }

    #[tokio::test]
    async fn token_resumes_each_channel_of_a_filter() {
        let (store, hub) = setup(64, RetentionRules::default());
        publish(&store, "room/a", 3).await;
        publish(&store, "room/b", 3).await;
        let token = CursorToken::decode("room/a=2,room/b=3").unwrap();
        let t = vec![Target::Filter(Filter::parse("room/#").unwrap())];
        let mut s = Subscription::open(cx(&store, Some(&hub)), t, Since::After(0), &token).await.unwrap();
        assert_eq!(ids(&drain(&mut s).await), ["room/a:3"]);
        assert_eq!(CursorToken::encode_cursors(s.cursors().iter()), "room/a=3,room/b=3");
    }
}
