//! Inboxes and MQTT records on Redis. Group membership is kept twice, under
//! the user (their groups, with the join point) and under the group (its
//! members, in name order), each change a pair of idempotent writes that a
//! retry completes. Read marks are merged by a script, in place: two
//! devices, or two nodes, marking at once both count. MQTT records are
//! written by the signal script, so every node hears of each one.

use std::collections::HashMap;

use herald_core::{
    Channel,
    inbox::{ReadMark, ReadState},
};

use super::{RedisStore, scripts::MARK_READ_SCRIPT};
use crate::{BoxFuture, BrokerRecord, BrokerStore, BrokerTable, InboxStore, Signal, StoreError};

impl InboxStore for RedisStore {
    fn groups_of(&self, user: String) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let key = inner.keys.groups_of(&user);
            let shard = inner.shard(inner.keys.partition_of(&user));
            let mut groups: Vec<(String, u64)> = shard.query(redis::cmd("HGETALL").arg(key)).await?;
            groups.sort();
            Ok(groups)
        })
    }

    fn add_members(
        &self,
        group: String,
        users: Vec<String>,
        joined_after: u64,
    ) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut added = 0;
            for u in &users {
                // The user's side first: it decides membership (and keeps the
                // first join); the group's list follows.
                let p = inner.keys.partition_of(u);
                let new: u64 = inner
                    .shard(p)
                    .query(redis::cmd("HSETNX").arg(inner.keys.groups_of(u)).arg(&group).arg(joined_after))
                    .await?;
                added += new as usize;
            }
            let g = inner.keys.partition_of(&group);
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(inner.keys.members(&group));
            for u in &users {
                zadd.arg(0).arg(u);
            }
            if !users.is_empty() {
                let _: u64 = inner.shard(g).query(&zadd).await?;
            }
            Ok(added)
        })
    }

    fn remove_members(&self, group: String, users: Vec<String>) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut removed = 0;
            for u in &users {
                let p = inner.keys.partition_of(u);
                let gone: u64 =
                    inner.shard(p).query(redis::cmd("HDEL").arg(inner.keys.groups_of(u)).arg(&group)).await?;
                removed += gone as usize;
            }
            if !users.is_empty() {
                let g = inner.keys.partition_of(&group);
                let _: u64 =
                    inner.shard(g).query(redis::cmd("ZREM").arg(inner.keys.members(&group)).arg(&users)).await?;
            }
            Ok(removed)
        })
    }

    fn members(&self, group: String, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let from = if after.is_empty() { "-".to_owned() } else { format!("({after}") };
            let g = inner.keys.partition_of(&group);
            inner
                .shard(g)
                .query(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(inner.keys.members(&group))
                        .arg(from)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit),
                )
                .await
        })
    }

    fn read_state(&self, user: String) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let shard = inner.shard(inner.keys.partition_of(&user));
            let pairs: Vec<(String, String)> = shard.query(redis::cmd("HGETALL").arg(inner.keys.reads(&user))).await?;
            Ok(pairs
                .into_iter()
                .filter_map(|(c, s)| Some((Channel::parse(&c).ok()?, ReadState::decode(&s)?)))
                .collect())
        })
    }

    fn mark_read(
        &self,
        user: String,
        marks: Vec<(Channel, ReadMark)>,
    ) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>> {
        Box::pin(async move {
            if marks.is_empty() {
                return Ok(HashMap::new());
            }
            let inner = &self.inner;
            let mut script = MARK_READ_SCRIPT.prepare_invoke();
            script.key(inner.keys.reads(&user));
            for (channel, mark) in &marks {
                script.arg(channel.as_str());
                match mark {
                    ReadMark::All(head) => script.arg("all").arg(head.to_string()),
                    ReadMark::Ids(ids) => {
                        script.arg("ids").arg(ids.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
                    }
                };
            }
            let shard = inner.shard(inner.keys.partition_of(&user));
            let merged: Vec<(String, String)> = shard.script(&script).await?;
            Ok(merged
                .into_iter()
                .filter_map(|(c, s)| Some((Channel::parse(&c).ok()?, ReadState::decode(&s)?)))
                .collect())
        })
    }
}

fn table_letter(table: BrokerTable) -> char {
    match table {
        BrokerTable::Retained => 'r',
        BrokerTable::Sessions => 's',
    }
}

impl BrokerStore for RedisStore {
    fn put(&self, table: BrokerTable, key: String, value: Option<Vec<u8>>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let letter = table_letter(table);
            let body = value.as_deref().map(super::body).unwrap_or_default();
            let signal = Signal::new(Signal::RECORD, format!("{letter}/{key}"), body);
            let op = if value.is_some() { "put" } else { "del" };
            self.inner.send_signal(&signal, op, Some((&key, letter)), value.as_deref()).await
        })
    }

    fn load(&self, table: BrokerTable) -> BoxFuture<'_, Result<Vec<BrokerRecord>, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut out = Vec::new();
            for p in 0..inner.keys.partitions() {
                let records: Vec<(String, Vec<u8>)> =
                    inner.shard(p).query(redis::cmd("HGETALL").arg(inner.keys.records(p, table_letter(table)))).await?;
                out.extend(records);
            }
            out.sort();
            Ok(out)
        })
    }

    fn get(&self, table: BrokerTable, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let p = inner.keys.partition_of(&key);
            inner.shard(p).query(redis::cmd("HGET").arg(inner.keys.records(p, table_letter(table))).arg(&key)).await
        })
    }

    fn is_shared(&self) -> bool {
        true
    }
}
