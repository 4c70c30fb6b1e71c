//! The hub: who is listening to what, and the hand-off of committed messages to
//! each listener's mailbox.
//!
//! Every subscriber owns one bounded mailbox, whatever it listens to (one channel,
//! many, or filters). Publishing never waits: a full mailbox marks the subscriber
//! as *lagged* instead, and the subscriber catches up from the store by its
//! cursors, so a slow consumer costs the publisher nothing and loses nothing.
//! The hub never knows which transport a subscriber serves.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use crate::{channel::Channel, filter::Filter, message::Message, queue::Queue};

/// What a subscriber listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Channel(Channel),
    Filter(Filter),
}

impl Target {
    /// A filter without wildcards is just a channel.
    pub fn from_filter(filter: Filter) -> Self {
        match filter.as_channel() {
            Some(ch) => Target::Channel(ch),
            None => Target::Filter(filter),
        }
    }

    pub fn matches(&self, channel: &Channel) -> bool {
        match self {
            Target::Channel(c) => c == channel,
            Target::Filter(f) => f.matches(channel),
        }
    }
}

struct Mailbox {
    queue: Queue<Arc<Message>>,
    /// Set when a message could not be queued; cleared by the subscriber when it
    /// starts catching up from the store.
    lagged: AtomicBool,
}

impl Mailbox {
    fn deliver(&self, msg: &Arc<Message>) {
        if self.queue.push(msg.clone()).is_err() {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

#[derive(Default)]
struct Registry {
    exact: HashMap<Channel, HashMap<u64, Arc<Mailbox>>>,
    filters: Vec<(Filter, u64, Arc<Mailbox>)>,
}

pub struct Hub {
    registry: RwLock<Registry>,
    mailbox_capacity: usize,
    next_id: AtomicU64,
    /// Messages handed to the hub since start.
    published: AtomicU64,
    /// Subscribers found lagged (their mailbox overflowed), and those that
    /// then caught up from the store: counted here, where every subscriber
    /// already points, rather than in each subscription.
    lagged: AtomicU64,
    caught_up: AtomicU64,
    /// Set by [`Hub::close`]: every mailbox is closed, now and when added.
    closed: AtomicBool,
}

impl Hub {
    /// `mailbox_capacity` bounds each subscriber's queue of undelivered messages.
    pub fn new(mailbox_capacity: usize) -> Arc<Self> {
        Arc::new(Hub {
            registry: RwLock::default(),
            mailbox_capacity: mailbox_capacity.max(1),
            next_id: AtomicU64::new(1),
            published: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// A new subscriber listening to nothing yet.
    pub fn subscriber(self: &Arc<Self>) -> Subscriber {
        Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            hub: self.clone(),
            mailbox: Arc::new(Mailbox { queue: Queue::new(self.mailbox_capacity), lagged: AtomicBool::new(false) }),
            targets: Vec::new(),
        }
    }

    /// Hands committed messages, in id order, to every matching mailbox.
    pub fn publish(&self, msgs: &[Arc<Message>]) {
        self.published.fetch_add(msgs.len() as u64, Ordering::Relaxed);
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        for msg in msgs {
            if let Some(subs) = reg.exact.get(&msg.channel) {
                for mb in subs.values() {
                    mb.deliver(msg);
                }
            }
            for (filter, _, mb) in &reg.filters {
                if filter.matches(&msg.channel) {
                    mb.deliver(msg);
                }
            }
        }
    }

    /// Ends every subscription (shutdown): each subscriber receives what is
    /// already queued, then `None`. Publishing after this delivers nothing.
    pub fn close(&self) {
        let reg = self.registry.write().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Release);
        let exact = reg.exact.values().flat_map(HashMap::values);
        for mb in exact.chain(reg.filters.iter().map(|(_, _, mb)| mb)) {
            mb.queue.close();
        }
    }

    /// Messages published since start.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Messages waiting in mailboxes, over every subscriber: memory held for
    /// consumers that have not taken them yet (a stalled one's stays until
    /// it is closed).
    pub fn queued(&self) -> usize {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        // A subscriber registered for several targets is counted once.
        let mut seen = std::collections::HashSet::new();
        let exact = reg.exact.values().flat_map(|subs| subs.iter().map(|(id, mb)| (*id, mb)));
        exact
            .chain(reg.filters.iter().map(|(_, id, mb)| (*id, mb)))
            .filter(|(id, _)| seen.insert(*id))
            .map(|(_, mb)| mb.queue.len())
            .sum()
    }

    /// Times a subscriber was found lagged since start.
    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    /// Times a lagged subscriber caught up from the store since start.
    pub fn caught_up(&self) -> u64 {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// How many (subscriber, target) registrations exist.
    pub fn registrations(&self) -> usize {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        reg.exact.values().map(HashMap::len).sum::<usize>() + reg.filters.len()
    }

    /// The channels and the filters someone listens to now.
    pub fn interest(&self) -> (Vec<Channel>, Vec<Filter>) {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        let mut filters: Vec<Filter> = reg.filters.iter().map(|(f, _, _)| f.clone()).collect();
        filters.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        filters.dedup();
        (reg.exact.keys().cloned().collect(), filters)
    }

    fn register(&self, id: u64, mailbox: &Arc<Mailbox>, target: &Target) {
        let mut reg = self.registry.write().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Acquire) {
            mailbox.queue.close();
        }
        match target {
            Target::Channel(ch) => {
                reg.exact.entry(ch.clone()).or_default().insert(id, mailbox.clone());
            }
            Target::Filter(f) => reg.filters.push((f.clone(), id, mailbox.clone())),
        }
    }

    fn unregister(&self, id: u64, target: &Target) {
        let mut reg = self.registry.write().unwrap_or_else(|e| e.into_inner());
        match target {
            Target::Channel(ch) => {
                if let Some(subs) = reg.exact.get_mut(ch) {
                    subs.remove(&id);
                    if subs.is_empty() {
                        reg.exact.remove(ch);
                    }
                }
            }
            Target::Filter(f) => reg.filters.retain(|(g, sid, _)| !(*sid == id && g == f)),
        }
    }
}

/// One listener: a mailbox and the targets registered for it. Dropping it
/// unregisters everything.
pub struct Subscriber {
    id: u64,
    hub: Arc<Hub>,
    mailbox: Arc<Mailbox>,
    targets: Vec<Target>,
}

impl Subscriber {
    /// Starts receiving messages for `target` (no-op if already listening).
    pub fn add(&mut self, target: Target) {
        if !self.targets.contains(&target) {
            if self.targets.capacity() == 0 {
                // One target is the common case: no room for four.
                self.targets.reserve_exact(1);
            }
            self.hub.register(self.id, &self.mailbox, &target);
            self.targets.push(target);
        }
    }

    /// Stops receiving messages for `target`; returns whether it was registered.
    pub fn remove(&mut self, target: &Target) -> bool {
        let before = self.targets.len();
        self.targets.retain(|t| t != target);
        if self.targets.len() != before {
            self.hub.unregister(self.id, target);
            true
        } else {
            false
        }
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Whether any target covers `channel`.
    pub fn listens_to(&self, channel: &Channel) -> bool {
        self.targets.iter().any(|t| t.matches(channel))
    }

    /// The next queued message; pending while nothing is published, `None`
    /// once the hub closed (shutdown) and the mailbox is drained. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Arc<Message>> {
        self.mailbox.queue.recv().await
    }

    /// [`Self::recv`] for hand-written futures.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Arc<Message>>> {
        self.mailbox.queue.poll_pop(Some(cx))
    }

    pub fn try_recv(&mut self) -> Option<Arc<Message>> {
        self.mailbox.queue.pop()
    }

    /// True once after messages were dropped because the mailbox was full.
    pub fn take_lagged(&self) -> bool {
        let lagged = self.mailbox.lagged.swap(false, Ordering::AcqRel);
        if lagged {
            self.hub.lagged.fetch_add(1, Ordering::Relaxed);
        }
        lagged
    }

    /// Reports that the catch-up after a lag is done (counted by the hub).
    pub fn caught_up(&self) {
        self.hub.caught_up.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        for t in std::mem::take(&mut self.targets) {
            self.hub.unregister(self.id, &t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Data;

    fn msg(ch: &str, id: u64) -> Arc<Message> {
        Arc::new(Message::new(Channel::parse(ch).unwrap(), id, None, Data::text("x"), 0))
    }

    #[tokio::test]
    async fn delivers_to_exact_and_filter_targets_in_order() {
        let hub = Hub::new(16);
        let mut a = hub.subscriber();
        a.add(Target::Channel(Channel::parse("chat/1").unwrap()));
        let mut b = hub.subscriber();
        b.add(Target::Filter(Filter::parse("chat/+").unwrap()));
        hub.publish(&[msg("chat/1", 1), msg("chat/2", 1), msg("chat/1", 2), msg("news", 1)]);
        assert_eq!(a.try_recv().unwrap().id, 1);
        assert_eq!(a.try_recv().unwrap().id, 2);
        assert!(a.try_recv().is_none());
        let got: Vec<_> = std::iter::from_fn(|| b.try_recv()).map(|m| (m.channel.to_string(), m.id)).collect();
        assert_eq!(got, [("chat/1".into(), 1), ("chat/2".into(), 1), ("chat/1".into(), 2)]);
    }

    #[tokio::test]
    async fn closing_the_hub_ends_every_subscriber_after_what_is_queued() {
        let hub = Hub::new(16);
        let mut s = hub.subscriber();
        s.add(Target::Channel(Channel::parse("c").unwrap()));
        hub.publish(&[msg("c", 1)]);
        hub.close();
        hub.publish(&[msg("c", 2)]);
        assert_eq!(s.recv().await.map(|m| m.id), Some(1));
        assert!(s.recv().await.is_none());
        let mut late = hub.subscriber();
        late.add(Target::Channel(Channel::parse("c").unwrap()));
        assert!(late.recv().await.is_none(), "a subscriber added after close ends at once");
    }

    #[test]
    fn full_mailbox_marks_lag_instead_of_blocking() {
        let hub = Hub::new(2);
        let mut s = hub.subscriber();
        s.add(Target::Channel(Channel::parse("c").unwrap()));
        hub.publish(&[msg("c", 1), msg("c", 2), msg("c", 3)]);
        assert!(s.take_lagged());
        assert!(!s.take_lagged(), "lag is reported once");
        assert_eq!(hub.lagged(), 1, "and counted once");
        assert_eq!(s.try_recv().unwrap().id, 1);
    }

    #[test]
    fn drop_and_remove_unregister() {
        let hub = Hub::new(2);
        let mut s = hub.subscriber();
        let t = Target::Filter(Filter::parse("#").unwrap());
        s.add(Target::Channel(Channel::parse("c").unwrap()));
        s.add(t.clone());
        s.add(t.clone());
        assert_eq!(hub.registrations(), 2);
        assert!(s.remove(&t));
        assert!(!s.remove(&t));
        assert_eq!(hub.registrations(), 1);
        drop(s);
        assert_eq!(hub.registrations(), 0);
    }
}
