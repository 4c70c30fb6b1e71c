//! Per-user inboxes: unread counts kept live for connected users, read marks,
//! group membership, and the inbox listing.
//!
//! The arithmetic is in `herald_core::inbox`; this module keeps, for every user
//! with at least one live connection, their groups and read state in memory and
//! a `watch` channel carrying their count. A listener on the hub recomputes the
//! counts of the connected users a committed notification concerns (one user,
//! a group's members, or everyone) and every connection of theirs — whatever
//! its transport — sees the new value. Users without a connection cost nothing
//! until they ask.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use bytes::Bytes;
use herald_core::{
    Channel, Filter, Hub, Message, Target, Window,
    inbox::{self, ReadMark, ReadState, Source},
};
use herald_store::{InboxStore, Signal, Store, StoreError};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::signals;

pub struct Inbox {
    store: Arc<dyn Store>,
    members: Arc<dyn InboxStore>,
    watched: Mutex<HashMap<String, Watched>>,
}

/// What is kept in memory for a connected user.
struct Watched {
    count: watch::Sender<u64>,
    groups: Vec<(String, u64)>,
    reads: HashMap<Channel, ReadState>,
    connections: usize,
}

/// A connection's view of one user's unread count. Dropping it releases the
/// user's in-memory state once their last connection is gone.
pub struct UnreadWatch {
    inbox: Arc<Inbox>,
    user: String,
    pub rx: watch::Receiver<u64>,
}

impl UnreadWatch {
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl Drop for UnreadWatch {
    fn drop(&mut self) {
        let inbox = self.inbox.clone();
        let user = std::mem::take(&mut self.user);
        // Dropped from sync code; the release is a quick async lock.
        tokio::spawn(async move {
            let mut watched = inbox.watched.lock().await;
            if let Some(w) = watched.get_mut(&user) {
                w.connections -= 1;
                if w.connections == 0 {
                    watched.remove(&user);
                }
            }
        });
    }
}

/// Which read marks to set.
pub enum Mark {
    All,
    Ids(Vec<(Channel, u64)>),
}

/// Window reads shared by every user recomputed in one pass.
#[derive(Default)]
struct Windows(HashMap<Channel, Window>);

impl Windows {
    async fn get(&mut self, store: &dyn Store, channel: &Channel) -> Result<Window, StoreError> {
        if let Some(w) = self.0.get(channel) {
            return Ok(*w);
        }
        let w = store.read(channel.clone(), 0, 0).await?.window;
        self.0.insert(channel.clone(), w);
        Ok(w)
    }
}

async fn count(
    store: &dyn Store,
    windows: &mut Windows,
    user: &str,
    groups: &[(String, u64)],
    reads: &HashMap<Channel, ReadState>,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for Source { channel, floor } in inbox::sources(user, groups) {
        let w = windows.get(store, &channel).await?;
        total += inbox::unread(w, floor, reads.get(&channel));
    }
    Ok(total)
}

impl Inbox {
    pub fn new(store: Arc<dyn Store>, members: Arc<dyn InboxStore>) -> Arc<Self> {
        Arc::new(Inbox { store, members, watched: Mutex::new(HashMap::new()) })
    }

    /// Starts the task that turns committed notifications into new counts.
    pub fn spawn_listener(self: &Arc<Self>, hub: &Arc<Hub>, shutdown: CancellationToken) {
        let mut sub = hub.subscriber();
        sub.add(Target::Filter(Filter::parse("user/+").expect("valid")));
        sub.add(Target::Filter(Filter::parse("$group/+").expect("valid")));
        sub.add(Target::Channel(inbox::all_channel()));
        let inbox = self.clone();
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = sub.recv() => match m { Some(m) => m, None => return },
                };
                let mut batch = vec![first];
                while let Some(m) = sub.try_recv() {
                    batch.push(m);
                }
                let all = sub.take_lagged();
                if let Err(e) = inbox.on_committed(&batch, all).await {
                    tracing::warn!(error = %e, "could not update unread counts");
                }
            }
        });
    }

    /// Recomputes the counts of connected users that `msgs` concern (all of
    /// them when `everyone`, after the listener fell behind).
    async fn on_committed(&self, msgs: &[Arc<Message>], everyone: bool) -> Result<(), StoreError> {
        let watched = self.watched.lock().await;
        let mut users: HashSet<String> = HashSet::new();
        for m in msgs {
            if everyone || m.channel.as_str() == inbox::ALL_CHANNEL {
                users.extend(watched.keys().cloned());
                break;
            }
            if let Some(owner) = m.channel.inbox_owner() {
                if watched.contains_key(owner) {
                    users.insert(owner.to_owned());
                }
            } else if let Some(group) = m.channel.as_str().strip_prefix("$group/") {
                users.extend(
                    watched.iter().filter(|(_, w)| w.groups.iter().any(|(g, _)| g == group)).map(|(u, _)| u.clone()),
                );
            }
        }
        let mut windows = Windows::default();
        for user in users {
            let Some(w) = watched.get(&user) else { continue };
            let n = count(&*self.store, &mut windows, &user, &w.groups, &w.reads).await?;
            w.count.send_if_modified(|c| std::mem::replace(c, n) != n);
        }
        Ok(())
    }

    /// Watches `user`'s count; the receiver starts with the current value.
    pub async fn watch(self: &Arc<Self>, user: &str) -> Result<UnreadWatch, StoreError> {
        let mut watched = self.watched.lock().await;
        if !watched.contains_key(user) {
            let groups = self.members.groups_of(user.to_owned()).await?;
            let reads = self.members.read_state(user.to_owned()).await?;
            let n = count(&*self.store, &mut Windows::default(), user, &groups, &reads).await?;
            let (count, _) = watch::channel(n);
            watched.insert(user.to_owned(), Watched { count, groups, reads, connections: 0 });
        }
        let w = watched.get_mut(user).expect("inserted above");
        w.connections += 1;
        Ok(UnreadWatch { inbox: self.clone(), user: user.to_owned(), rx: w.count.subscribe() })
    }

    /// The user's groups and read state: from memory when connected, else the store.
    async fn state_of(&self, user: &str) -> Result<(Vec<(String, u64)>, HashMap<Channel, ReadState>), StoreError> {
        if let Some(w) = self.watched.lock().await.get(user) {
            return Ok((w.groups.clone(), w.reads.clone()));
        }
        Ok((self.members.groups_of(user.to_owned()).await?, self.members.read_state(user.to_owned()).await?))
    }

    pub async fn count(&self, user: &str) -> Result<u64, StoreError> {
        let (groups, reads) = self.state_of(user).await?;
        count(&*self.store, &mut Windows::default(), user, &groups, &reads).await
    }

    /// Sets read marks and returns the new count; every connection of the
    /// user, on this node and every other, sees it. The store merges the
    /// marks atomically, so a mark made at the same moment on another
    /// device (or node) is never lost.
    pub async fn mark(&self, user: &str, mark: Mark) -> Result<u64, StoreError> {
        let groups = match self.watched.lock().await.get(user) {
            Some(w) => w.groups.clone(),
            None => self.members.groups_of(user.to_owned()).await?,
        };
        let sources = inbox::sources(user, &groups);
        let mut windows = Windows::default();
        let mut marks = Vec::new();
        match mark {
            Mark::All => {
                for s in &sources {
                    let head = windows.get(&*self.store, &s.channel).await?.head;
                    marks.push((s.channel.clone(), ReadMark::All(head)));
                }
            }
            Mark::Ids(ids) => {
                let mut by_channel: HashMap<Channel, Vec<u64>> = HashMap::new();
                for (channel, id) in ids {
                    // Only the user's own sources hold their marks.
                    if sources.iter().any(|s| s.channel == channel) {
                        by_channel.entry(channel).or_default().push(id);
                    }
                }
                marks.extend(by_channel.into_iter().map(|(c, ids)| (c, ReadMark::Ids(ids))));
            }
        }
        let merged =
            if marks.is_empty() { HashMap::new() } else { self.members.mark_read(user.to_owned(), marks).await? };
        let mut watched = self.watched.lock().await;
        let n = match watched.get_mut(user) {
            Some(w) => {
                w.reads.extend(merged);
                let n = count(&*self.store, &mut windows, user, &w.groups, &w.reads).await?;
                w.count.send_if_modified(|c| std::mem::replace(c, n) != n);
                n
            }
            None => {
                let reads = self.members.read_state(user.to_owned()).await?;
                count(&*self.store, &mut windows, user, &groups, &reads).await?
            }
        };
        drop(watched);
        self.announce(user, &[user.to_owned()]).await;
        Ok(n)
    }

    /// Adds users to a group; they see the group's notifications from now on.
    pub async fn add_members(&self, group: &str, users: Vec<String>) -> Result<usize, StoreError> {
        let channel = inbox::group_channel(group).expect("group names are validated by the caller");
        let head = self.store.read(channel, 0, 0).await?.window.head;
        let added = self.members.add_members(group.to_owned(), users.clone(), head).await?;
        self.refresh(&users).await?;
        self.announce(group, &users).await;
        Ok(added)
    }

    pub async fn remove_members(&self, group: &str, users: Vec<String>) -> Result<usize, StoreError> {
        let removed = self.members.remove_members(group.to_owned(), users.clone()).await?;
        self.refresh(&users).await?;
        self.announce(group, &users).await;
        Ok(removed)
    }

    pub async fn members(&self, group: &str, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.members.members(group.to_owned(), after.to_owned(), limit).await
    }

    /// Tells every node that these users' read state or groups changed
    /// (over Redis; on one node the signal comes back here, harmlessly).
    /// Best effort: the change is stored, and a node that misses the signal
    /// corrects its counts at the next notification or feed resync.
    async fn announce(&self, key: &str, users: &[String]) {
        for chunk in users.chunks(1000) {
            let signal = Signal::new(signals::INBOX, key, Bytes::from(chunk.join("\n")));
            if let Err(e) = self.store.signal(signal).await {
                tracing::warn!(error = %e, "could not tell other nodes of an inbox change");
            }
        }
    }

    /// Reloads the groups and read state of connected users among `users`
    /// from the store, and their counts: after a change made here or on
    /// another node.
    pub async fn refresh(&self, users: &[String]) -> Result<(), StoreError> {
        let mut watched = self.watched.lock().await;
        let mut windows = Windows::default();
        for u in users {
            if let Some(w) = watched.get_mut(u) {
                w.groups = self.members.groups_of(u.clone()).await?;
                w.reads = self.members.read_state(u.clone()).await?;
                let n = count(&*self.store, &mut windows, u, &w.groups, &w.reads).await?;
                w.count.send_if_modified(|c| std::mem::replace(c, n) != n);
            }
        }
        Ok(())
    }

    /// Reloads every connected user (signals may have been missed).
    pub async fn refresh_all(&self) -> Result<(), StoreError> {
        let users: Vec<String> = self.watched.lock().await.keys().cloned().collect();
        self.refresh(&users).await
    }

    /// The user's inbox, newest first: every retained message of their sources
    /// (above each group's join point), with its read flag.
    pub async fn list(&self, user: &str) -> Result<Vec<(Arc<Message>, bool)>, StoreError> {
        let (groups, reads) = self.state_of(user).await?;
        let mut items = Vec::new();
        for Source { channel, floor } in inbox::sources(user, &groups) {
            let mut after = floor;
            loop {
                let page = self.store.read(channel.clone(), after, 512).await?;
                let full = page.messages.len() == 512;
                for m in page.messages {
                    after = m.id;
                    let read = reads.get(&channel).is_some_and(|r| r.is_read(m.id));
                    items.push((m, read));
                }
                if !full {
                    break;
                }
            }
        }
        items.sort_by(|(a, _), (b, _)| {
            b.time.cmp(&a.time).then_with(|| a.channel.cmp(&b.channel)).then(b.id.cmp(&a.id))
        });
        Ok(items)
    }
}
