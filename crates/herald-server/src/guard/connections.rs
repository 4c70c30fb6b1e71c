//! Long-lived connections counted per address and per user, each held by a
//! [`Permit`] that gives its place back when the connection ends (dropped
//! with it, however it ends).
//!
//! A count exists only while its client has connections open, so the maps
//! hold no more entries than there are connections. The node's own total is
//! not counted here: the per-transport connection counters of `/api/stats`
//! are that total already.
//!
//! A permit is one pointer inside the connection, and `None` (no allocation)
//! for a client no count applies to (exempt addresses, API keys): the
//! connections a load test or a local proxy opens cost nothing extra.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Open connections per key, in shards so that connections opening at once
/// rarely wait for each other.
struct Counts {
    shards: Box<[Mutex<HashMap<u64, u32>>]>,
}

const SHARDS: usize = 16;

impl Counts {
    fn new() -> Self {
        Counts { shards: (0..SHARDS).map(|_| Mutex::default()).collect() }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        // Keys are addresses or hashes: their low bits spread well enough.
        let i = (key ^ (key >> 32)) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for `key` if it has fewer than `max`.
    fn acquire(&self, key: u64, max: usize) -> bool {
        let mut shard = self.shard(key);
        let n = shard.entry(key).or_insert(0);
        if *n as usize >= max {
            if *n == 0 {
                shard.remove(&key);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, key: u64) {
        let mut shard = self.shard(key);
        if let Some(n) = shard.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&key);
            }
        }
    }

    fn get(&self, key: u64) -> u32 {
        self.shard(key).get(&key).copied().unwrap_or(0)
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}

/// Connection counts per address and per user, with their limits.
pub struct Connections {
    per_ip: usize,
    per_user: usize,
    by_addr: Counts,
    by_user: Counts,
}

/// Which count refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Address,
    User,
}

impl Connections {
    /// `0` for a limit is none.
    pub fn new(per_ip: usize, per_user: usize) -> Arc<Self> {
        Arc::new(Connections { per_ip, per_user, by_addr: Counts::new(), by_user: Counts::new() })
    }

    /// Takes a place for a connection from `addr` (`None`: not counted)
    /// by `user` (`None`: not counted), or says which count is full.
    pub fn acquire(self: &Arc<Self>, addr: Option<u64>, user: Option<u64>) -> Result<Permit, Full> {
        let addr = addr.filter(|_| self.per_ip > 0);
        let user = user.filter(|_| self.per_user > 0);
        if addr.is_none() && user.is_none() {
            return Ok(Permit(None));
        }
        if let Some(a) = addr
            && !self.by_addr.acquire(a, self.per_ip)
        {
            return Err(Full::Address);
        }
        if let Some(u) = user
            && !self.by_user.acquire(u, self.per_user)
        {
            if let Some(a) = addr {
                self.by_addr.release(a);
            }
            return Err(Full::User);
        }
        Ok(Permit(Some(Box::new(Held { counts: self.clone(), addr, user }))))
    }

    /// Open connections counted for an address and a user (tests, stats).
    pub fn count(&self, addr: u64, user: u64) -> (u32, u32) {
        (self.by_addr.get(addr), self.by_user.get(user))
    }

    /// How many addresses and users have connections counted.
    pub fn tracked(&self) -> (usize, usize) {
        (self.by_addr.len(), self.by_user.len())
    }
}

/// A connection's place in the counts, given back when it is dropped.
#[must_use = "the place is given back when the permit is dropped"]
pub struct Permit(Option<Box<Held>>);

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Permit(counted)" } else { "Permit(none)" })
    }
}

impl Permit {
    /// A permit no count applies to.
    pub fn none() -> Permit {
        Permit(None)
    }

    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

struct Held {
    counts: Arc<Connections>,
    addr: Option<u64>,
    user: Option<u64>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(a) = self.addr {
            self.counts.by_addr.release(a);
        }
        if let Some(u) = self.user {
            self.counts.by_user.release(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_user_and_gives_places_back_on_drop() {
        let c = Connections::new(2, 3);
        let a = c.acquire(Some(1), Some(10)).unwrap();
        let b = c.acquire(Some(1), Some(10)).unwrap();
        assert_eq!(c.acquire(Some(1), Some(11)).err(), Some(Full::Address));
        assert_eq!(c.count(1, 11), (2, 0), "a refused connection holds nothing");
        let d = c.acquire(Some(2), Some(10)).unwrap();
        assert_eq!(c.acquire(Some(3), Some(10)).err(), Some(Full::User));
        assert_eq!(c.count(3, 10), (0, 3), "the address's place was given back");
        drop(a);
        assert_eq!(c.count(1, 10), (1, 2));
        let e = c.acquire(Some(1), None).unwrap();
        drop((b, d, e));
        assert_eq!(c.tracked(), (0, 0), "no entry outlives its connections");
        assert_eq!(std::mem::size_of::<Permit>(), 8, "one pointer per connection");
    }

    #[test]
    fn uncounted_connections_hold_nothing() {
        let c = Connections::new(0, 1);
        let p = c.acquire(Some(1), None).unwrap();
        assert!(p.0.is_none(), "no per-address limit, no user: nothing to hold");
        let _u = c.acquire(Some(1), Some(5)).unwrap();
        assert_eq!(c.acquire(None, Some(5)).err(), Some(Full::User));
    }
}
