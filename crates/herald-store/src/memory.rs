//! An in-memory store: same semantics as SQLite, no durability. Used by tests
//! and by `herald serve --memory`.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use std::collections::HashMap;

use herald_core::{
    Channel, Filter, Message, NewMessage, Window,
    inbox::{ReadMark, ReadState},
};

use crate::{
    BoxFuture, BrokerRecord, BrokerStore, BrokerTable, IDEMPOTENCY_TTL_MS, Idempotency, InboxStore, Page, Receipt,
    Signal, Store, StoreConfig, StoreError, jobs::JobTable, monotonic,
};

struct Log {
    head: u64,
    messages: VecDeque<Arc<Message>>,
}

struct State {
    logs: BTreeMap<Channel, Log>,
    last_time: i64,
    closed: bool,
    /// group -> user -> joined after
    groups: BTreeMap<String, BTreeMap<String, u64>>,
    reads: HashMap<String, HashMap<Channel, ReadState>>,
    broker: HashMap<BrokerTable, BTreeMap<String, Vec<u8>>>,
    /// Idempotency key -> (expires at, fingerprint, first receipt).
    idempotency: HashMap<String, (i64, u64, Receipt)>,
}

pub struct MemoryStore {
    config: StoreConfig,
    state: Mutex<State>,
    /// Outbound jobs and their records (`jobs::memory`), under a lock of their own.
    jobs: Mutex<JobTable>,
}

impl MemoryStore {
    pub fn new(config: StoreConfig) -> Self {
        MemoryStore {
            config,
            state: Mutex::new(State {
                logs: BTreeMap::new(),
                last_time: 0,
                closed: false,
                groups: BTreeMap::new(),
                reads: HashMap::new(),
                broker: HashMap::new(),
                idempotency: HashMap::new(),
            }),
            jobs: Mutex::new(JobTable::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn job_table(&self) -> std::sync::MutexGuard<'_, JobTable> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemoryStore {
    /// Appends under the lock, which is held through the sink call so that
    /// concurrent appends reach subscribers in id order.
    fn append_locked(&self, st: &mut State, batch: Vec<NewMessage>) -> Result<Vec<Arc<Message>>, StoreError> {
        if st.closed {
            return Err(StoreError::Closed);
        }
        let started = std::time::Instant::now();
        let now = monotonic(&self.config.clock, &mut st.last_time);
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            let retention = self.config.retention.for_channel(&m.channel);
            let log = st.logs.entry(m.channel.clone()).or_insert(Log { head: 0, messages: VecDeque::new() });
            log.head += 1;
            let msg = Arc::new(Message::new(m.channel, log.head, m.event, m.data, now).with_meta(m.meta));
            log.messages.push_back(msg.clone());
            while log.messages.len() as u64 > retention.size {
                log.messages.pop_front();
            }
            out.push(msg);
        }
        self.config.sink.commit_took(out.len(), started.elapsed());
        self.config.sink.committed(&out);
        Ok(out)
    }
}

impl Store for MemoryStore {
    fn append(&self, batch: Vec<NewMessage>) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
        Box::pin(async move { self.append_locked(&mut self.lock(), batch) })
    }

    fn append_once(
        &self,
        idempotency: Idempotency,
        batch: Vec<NewMessage>,
    ) -> BoxFuture<'_, Result<Receipt, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let now = (self.config.clock)();
            st.idempotency.retain(|_, (expires, _, _)| *expires > now);
            if let Some((_, fingerprint, receipt)) = st.idempotency.get(&idempotency.key) {
                return match *fingerprint == idempotency.fingerprint {
                    true => Ok(receipt.clone()),
                    false => Err(StoreError::IdempotencyConflict),
                };
            }
            let stored = self.append_locked(&mut st, batch)?;
            let receipt: Receipt = stored.iter().map(|m| (m.channel.clone(), m.id)).collect();
            st.idempotency
                .insert(idempotency.key, (now + IDEMPOTENCY_TTL_MS, idempotency.fingerprint, receipt.clone()));
            Ok(receipt)
        })
    }

    fn signal(&self, signal: Signal) -> BoxFuture<'_, Result<(), StoreError>> {
        self.config.sink.signaled(&signal);
        Box::pin(std::future::ready(Ok(())))
    }

    fn cached_head(&self, channel: &Channel) -> Option<u64> {
        // Always known here, and read under the lock that appends hold through
        // their sink call: a subscriber resolving `now` gets there quicker
        // (no read), which narrows the window in which a concurrent publish
        // lands before it has registered.
        Some(self.lock().logs.get(channel).map_or(0, |l| l.head))
    }

    fn read(&self, channel: Channel, after: u64, limit: usize) -> BoxFuture<'_, Result<Page, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            let cutoff = self.config.retention.for_channel(&channel).cutoff((self.config.clock)());
            let Some(log) = st.logs.get(&channel) else {
                return Ok(Page { messages: Vec::new(), window: Window::new(1, 0) });
            };
            let live = log.messages.iter().skip_while(|m| m.time < cutoff);
            let first = live.clone().next().map_or(log.head + 1, |m| m.id);
            let messages = live.skip_while(|m| m.id <= after).take(limit).cloned().collect();
            Ok(Page { messages, window: Window::new(first, log.head) })
        })
    }

    fn channels(&self, filter: Filter) -> BoxFuture<'_, Result<Vec<(Channel, u64)>, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            Ok(st.logs.iter().filter(|(c, _)| filter.matches(c)).map(|(c, l)| (c.clone(), l.head)).collect())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.lock().closed = true;
        })
    }
}

impl InboxStore for MemoryStore {
    fn groups_of(&self, user: String) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            Ok(st.groups.iter().filter_map(|(g, m)| m.get(&user).map(|j| (g.clone(), *j))).collect())
        })
    }

    fn add_members(
        &self,
        group: String,
        users: Vec<String>,
        joined_after: u64,
    ) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let members = st.groups.entry(group).or_default();
            let before = members.len();
            for u in users {
                members.entry(u).or_insert(joined_after);
            }
            Ok(members.len() - before)
        })
    }

    fn remove_members(&self, group: String, users: Vec<String>) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let Some(members) = st.groups.get_mut(&group) else { return Ok(0) };
            Ok(users.iter().filter(|u| members.remove(*u).is_some()).count())
        })
    }

    fn members(&self, group: String, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            Ok(st
                .groups
                .get(&group)
                .map_or_else(Vec::new, |m| m.keys().filter(|u| **u > after).take(limit).cloned().collect()))
        })
    }

    fn read_state(&self, user: String) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>> {
        Box::pin(async move { Ok(self.lock().reads.get(&user).cloned().unwrap_or_default()) })
    }

    fn mark_read(
        &self,
        user: String,
        marks: Vec<(Channel, ReadMark)>,
    ) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let reads = st.reads.entry(user).or_default();
            let mut out = HashMap::new();
            for (channel, mark) in marks {
                let state = reads.entry(channel.clone()).or_default();
                state.apply(&mark);
                out.insert(channel, state.clone());
            }
            Ok(out)
        })
    }
}

impl BrokerStore for MemoryStore {
    fn put(&self, table: BrokerTable, key: String, value: Option<Vec<u8>>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let records = st.broker.entry(table).or_default();
            match value {
                Some(v) => records.insert(key, v),
                None => records.remove(&key),
            };
            Ok(0)
        })
    }

    fn load(&self, table: BrokerTable) -> BoxFuture<'_, Result<Vec<BrokerRecord>, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            Ok(st.broker.get(&table).map_or_else(Vec::new, |r| r.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
        })
    }

    fn get(&self, table: BrokerTable, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move { Ok(self.lock().broker.get(&table).and_then(|r| r.get(&key).cloned())) })
    }
}
