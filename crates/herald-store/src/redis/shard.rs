//! One Redis server of the deployment: the connection commands go through,
//! what Herald learnt of its settings, and how it is doing. Several shards
//! split the partitions between them (client-side sharding, by a jump hash
//! of the partition number, so adding a shard moves as few as possible).

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{
    Client, Cmd, FromRedisValue, PushInfo, RedisError, aio::ConnectionManager, cluster_async::ClusterConnection,
};
use tokio::sync::mpsc;

use crate::StoreError;

pub(crate) struct Shard {
    /// The URL without its password, for logs and stats.
    pub(crate) name: String,
    pub(crate) conn: Conn,
    /// Every command and script is bounded by this: past it the outcome is
    /// unknown, and the caller is told the store is unavailable.
    timeout: Duration,
    /// Whether a Redis restart may lose acknowledged writes (not AOF with
    /// `appendfsync always`): ids then go on from a floor after a restart.
    pub(crate) lossy: AtomicBool,
    /// The feed's pub/sub connection is up and subscribed.
    pub(crate) feed_up: AtomicBool,
    /// The last command failed for want of Redis (cleared by a success).
    pub(crate) failing: AtomicBool,
    pub(crate) last_error: Mutex<Option<String>>,
    /// Feed payloads handed on, and read back from the log after a gap.
    pub(crate) received: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// How commands reach Redis.
pub(crate) enum Conn {
    /// One Redis: commands on a connection manager, the feed on a pub/sub
    /// connection of its own made from `client`.
    Single { client: Client, manager: ConnectionManager },
    /// A Redis Cluster: commands go to the master of their keys' slot; the
    /// feed is sharded pub/sub (`SSUBSCRIBE`) on the same connection, its
    /// messages arriving on `pushes` (RESP3), resubscribed by the client
    /// after a reconnection or a slot move.
    Cluster { conn: ClusterConnection, pushes: std::sync::Mutex<Option<mpsc::UnboundedReceiver<PushInfo>>> },
}

/// Runs `$body` with `$c` a clone of the shard's connection, whichever kind
/// it is (both are `ConnectionLike`, but not one type), bounded by the timeout.
macro_rules! on_conn {
    ($shard:expr, $c:ident => $body:expr) => {
        match &$shard.conn {
            Conn::Single { manager, .. } => {
                let mut $c = manager.clone();
                $shard.bounded(async move { $body }).await
            }
            Conn::Cluster { conn, .. } => {
                let mut $c = conn.clone();
                $shard.bounded(async move { $body }).await
            }
        }
    };
}

/// Partition `p`'s shard among `n`: Lamping and Veach's jump consistent hash.
pub(crate) fn shard_of(p: u32, n: usize) -> usize {
    let mut key = u64::from(p).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let (mut b, mut j) = (-1i64, 0i64);
    while j < n as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// A URL fit for logs: `redis://:secret@host` loses its secret.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl Shard {
    /// Connects; fails if Redis cannot be reached within `connect_timeout`.
    pub(crate) async fn connect(url: &str, timeout: Duration, connect_timeout: Duration) -> Result<Shard, StoreError> {
        let name = redact(url);
        let client = Client::open(url).map_err(|e| StoreError::Backend(format!("redis url {name}: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager =
            tokio::time::timeout(connect_timeout * 3, ConnectionManager::new_with_config(client.clone(), config))
                .await
                .map_err(|_| StoreError::Unavailable(format!("{name}: no answer within {connect_timeout:?}")))?
                .map_err(|e| StoreError::Unavailable(format!("{name}: {e}")))?;
        Ok(Shard::new(name, Conn::Single { client, manager }, timeout))
    }

    /// Connects to a Redis Cluster through any of its `seeds`.
    pub(crate) async fn connect_cluster(
        seeds: &[String],
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Shard, StoreError> {
        let name = format!("cluster {}", seeds.iter().map(|s| redact(s)).collect::<Vec<_>>().join(","));
        let (tx, pushes) = mpsc::unbounded_channel();
        let client = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .response_timeout(timeout)
            .connection_timeout(connect_timeout)
            .build()
            .map_err(|e| StoreError::Backend(format!("{name}: {e}")))?;
        let conn = tokio::time::timeout(connect_timeout * 3, client.get_async_connection())
            .await
            .map_err(|_| StoreError::Unavailable(format!("{name}: no answer within {connect_timeout:?}")))?
            .map_err(|e| StoreError::Unavailable(format!("{name}: {e}")))?;
        Ok(Shard::new(name, Conn::Cluster { conn, pushes: std::sync::Mutex::new(Some(pushes)) }, timeout))
    }

    fn new(name: String, conn: Conn, timeout: Duration) -> Shard {
        Shard {
            name,
            conn,
            timeout,
            lossy: AtomicBool::new(true),
            feed_up: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
            received: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster { .. })
    }

    /// Runs one command, bounded by the timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        on_conn!(self, c => cmd.query_async::<T>(&mut c).await)
    }

    /// Runs a pipeline, bounded by the timeout. (On a Cluster, only for
    /// commands whose keys share a slot.)
    pub(crate) async fn pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StoreError> {
        on_conn!(self, c => pipe.query_async::<T>(&mut c).await)
    }

    /// Runs a script, bounded by the timeout.
    pub(crate) async fn script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        on_conn!(self, c => invocation.invoke_async::<T>(&mut c).await)
    }

    async fn bounded<T>(&self, f: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(self.unavailable(format!("no answer within {:?}", self.timeout))),
        };
        if result.is_ok() && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(redis = %self.name, "Redis answers again");
        }
        result
    }

    fn error(&self, e: RedisError) -> StoreError {
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.unavailable(e.to_string())
        } else if e.code() == Some("BUSY") || e.code() == Some("LOADING") || e.code() == Some("MASTERDOWN") {
            // A long script, a restart reading its data, a replica cut off.
            self.unavailable(e.to_string())
        } else {
            StoreError::Backend(format!("{}: {e}", self.name))
        }
    }

    fn unavailable(&self, why: String) -> StoreError {
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(redis = %self.name, error = %why, "Redis unavailable");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        StoreError::Unavailable(format!("{}: {why}", self.name))
    }

    /// Reads a `CONFIG GET` value; `None` where CONFIG is not allowed (some
    /// hosted Redis rename or forbid it).
    pub(crate) async fn config(&self, key: &str) -> Option<String> {
        let pairs: Vec<String> = self.query(redis::cmd("CONFIG").arg("GET").arg(key)).await.ok()?;
        pairs.get(1).cloned()
    }

    pub(crate) fn is_available(&self) -> bool {
        !self.failing.load(Ordering::Relaxed) && self.feed_up.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hash_spreads_and_moves_little() {
        let three: Vec<usize> = (0..128).map(|p| shard_of(p, 3)).collect();
        for s in 0..3 {
            let n = three.iter().filter(|x| **x == s).count();
            assert!((25..=60).contains(&n), "shard {s} holds {n} of 128");
        }
        // A fourth shard takes partitions only from the others, never swaps them.
        let four: Vec<usize> = (0..128).map(|p| shard_of(p, 4)).collect();
        for (a, b) in three.iter().zip(&four) {
            assert!(a == b || *b == 3);
        }
        assert!((0..128).all(|p| shard_of(p, 1) == 0));
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(redact("redis://:s3cret@10.0.0.1:6379/0"), "redis://***@10.0.0.1:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
