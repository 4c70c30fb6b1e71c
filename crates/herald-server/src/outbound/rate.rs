//! Send rates: how fast Herald may call one webhook endpoint or the SMTP
//! relay, so a backlog (after an outage, a notification to a large group)
//! drains at a pace the receiver can take instead of all at once.
//!
//! GCRA per key (an endpoint's URL, or the relay): `count` sends at once,
//! then one every `per / count`. Keys are the configured endpoints, so the
//! map stays as small as the configuration.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::SendRate;

pub(crate) struct Limiter {
    rate: SendRate,
    /// Per key, the theoretical arrival time of the next send.
    next: Mutex<HashMap<String, Instant>>,
}

impl Limiter {
    pub(crate) fn new(rate: SendRate) -> Self {
        Limiter { rate, next: Mutex::new(HashMap::new()) }
    }

    /// Takes a send for `key` at `now`, or says how long until one is free
    /// (and takes nothing).
    pub(crate) fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.count == 0 {
            return Ok(());
        }
        let interval = self.rate.per / self.rate.count;
        let burst = interval * (self.rate.count - 1);
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let tat = next.get(key).copied().unwrap_or(now).max(now);
        let ahead = tat - now;
        if ahead > burst {
            return Err(ahead - burst);
        }
        next.insert(key.to_owned(), tat + interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval_per_key() {
        let l = Limiter::new(SendRate { count: 3, per: Duration::from_secs(3) });
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check("a", t), Ok(()));
        }
        assert_eq!(l.check("a", t), Err(Duration::from_secs(1)), "the burst is spent");
        assert_eq!(l.check("b", t), Ok(()), "keys are apart");
        assert_eq!(l.check("a", t + Duration::from_millis(999)), Err(Duration::from_millis(1)));
        assert_eq!(l.check("a", t + Duration::from_secs(1)), Ok(()));
        assert!(l.check("a", t + Duration::from_secs(1)).is_err());
        // After a quiet spell the whole burst is back, no more.
        let later = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.check("a", later), Ok(()));
        }
        assert!(l.check("a", later).is_err());
    }

    #[test]
    fn zero_is_no_limit() {
        let l = Limiter::new(SendRate { count: 0, per: Duration::from_secs(1) });
        let t = Instant::now();
        assert!((0..10_000).all(|_| l.check("x", t).is_ok()));
    }
}
