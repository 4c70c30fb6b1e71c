//! Rate limits as GCRA (the generic cell rate algorithm: a token bucket kept
//! as one number, the "theoretical arrival time" of the next event).
//!
//! Two kinds:
//! - [`Gcra`] with its state in a `u64` the caller keeps: per connection
//!   (publishes on one WebSocket or MQTT connection). Eight bytes inside the
//!   connection, nothing anywhere else, so an idle connection costs nothing.
//! - [`Keyed`]: per client (requests, new connections per address, publishes
//!   per user), shared by every connection, in governor's `RateLimiter` over
//!   a store of ours that caps how many clients it tracks. Past the cap, new
//!   clients share one bucket until the sweeper ([`Limiter::forget_idle`],
//!   governor's `retain_recent`) forgets those whose bucket is full again:
//!   an attacker with many addresses can slow new clients down, but not grow
//!   memory without bound, and clients already tracked are not affected.
//!
//! Limits are per node: each Herald node counts for itself. [`Limiter`] is
//! the seam for a cluster-wide backend; it is synchronous on purpose (it sits
//! on every request's path), so such a backend would keep a local budget and
//! settle it with the others in the background.

use std::{
    num::NonZeroU32,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, MonotonicClock},
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{
        InMemoryState, NotKeyed, StateStore,
        keyed::{DashMapStateStore, ShrinkableKeyedStateStore},
    },
};

use crate::config::Rate;

/// A rate and burst as GCRA parameters, for state the caller keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds one event's token takes to come back.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst - 1` intervals.
    tolerance: u64,
}

impl Gcra {
    /// `None` when the rate is off.
    pub fn new(rate: Rate, burst: u32) -> Option<Gcra> {
        if rate.is_off() {
            return None;
        }
        let interval = (rate.interval().as_nanos() as u64).max(1);
        Some(Gcra { interval, tolerance: interval.saturating_mul(u64::from(burst.max(1) - 1)) })
    }

    /// One event at `now` (nanoseconds, [`now`]): admitted, moving `tat`, or
    /// refused with how long until it would be.
    pub fn check(&self, tat: &mut u64, now: u64) -> Result<(), Duration> {
        let start = (*tat).max(now);
        let ahead = start - now;
        if ahead > self.tolerance {
            return Err(Duration::from_nanos(ahead - self.tolerance));
        }
        *tat = start + self.interval;
        Ok(())
    }
}

/// Nanoseconds since this process's first call: the clock of [`Gcra`] state.
/// (Never 0 at a check, so a zeroed state means "no events yet".)
pub fn now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1));
    epoch.elapsed().as_nanos() as u64
}

/// A limiter of many clients by key; the seam a cluster-wide backend would
/// implement.
pub trait Limiter: Send + Sync {
    /// One event for `key`: admitted, or refused with the wait.
    fn check(&self, key: u64) -> Result<(), Duration>;
    /// Clients tracked now.
    fn tracked(&self) -> usize;
    /// Forgets clients whose bucket is full again (they are as if new).
    fn forget_idle(&self);
}

/// This node's keyed limiter: governor's GCRA over [`Capped`].
pub struct Keyed<C: Clock = MonotonicClock> {
    inner: RateLimiter<u64, Capped, C, NoOpMiddleware<C::Instant>>,
}

impl Keyed<MonotonicClock> {
    /// `None` when the rate is off.
    pub fn new(rate: Rate, burst: u32, cap: usize) -> Option<Self> {
        Self::with_clock(rate, burst, cap, MonotonicClock)
    }
}

impl<C: Clock> Keyed<C> {
    pub fn with_clock(rate: Rate, burst: u32, cap: usize, clock: C) -> Option<Self> {
        if rate.is_off() {
            return None;
        }
        let burst = NonZeroU32::new(burst.max(1)).expect("at least 1");
        let quota = Quota::with_period(rate.interval().max(Duration::from_nanos(1)))?.allow_burst(burst);
        Some(Keyed { inner: RateLimiter::new(quota, Capped::new(cap), clock) })
    }
}

impl<C> Limiter for Keyed<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    fn check(&self, key: u64) -> Result<(), Duration> {
        self.inner.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.inner.clock().now()))
    }

    fn tracked(&self) -> usize {
        self.inner.len()
    }

    fn forget_idle(&self) {
        let before = self.inner.len();
        self.inner.retain_recent();
        // Room goes back after a wave of clients has gone, not at every sweep
        // (a steady map would be reallocated each time).
        if self.inner.len() < before / 2 {
            self.inner.shrink_to_fit();
        }
    }
}

/// governor's DashMap store with a cap on its keys: past `cap`, a key not
/// yet tracked is measured against one shared `overflow` state.
pub struct Capped {
    map: DashMapStateStore<u64>,
    overflow: InMemoryState,
    /// Keys in `map` (kept here: `DashMap::len` locks every shard).
    len: AtomicUsize,
    cap: usize,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Capped { map: Default::default(), overflow: Default::default(), len: AtomicUsize::new(0), cap: cap.max(1) }
    }
}

impl StateStore for Capped {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if self.len.load(Ordering::Relaxed) >= self.cap {
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = self.map.entry(*key).or_insert_with(|| {
            self.len.fetch_add(1, Ordering::Relaxed);
            InMemoryState::default()
        });
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for Capped {
    fn retain_recent(&self, drop_below: Nanos) {
        self.map.retain(|_, state| {
            // A state is read only through a measurement; one that refuses
            // changes nothing.
            let idle = state.measure_and_replace(&NotKeyed::NonKey, |tat| {
                Err::<((), Nanos), bool>(tat.is_none_or(|t| t <= drop_below))
            });
            let keep = idle == Err(false);
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_connection_gets_its_burst_then_one_per_interval() {
        let g = Gcra::new(Rate::per(10, Duration::from_secs(1)), 3).unwrap();
        let mut tat = 0;
        let t0 = 5_000 * MS;
        for _ in 0..3 {
            assert_eq!(g.check(&mut tat, t0), Ok(()));
        }
        assert_eq!(g.check(&mut tat, t0), Err(Duration::from_millis(100)), "the burst is spent");
        assert_eq!(g.check(&mut tat, t0 + 60 * MS), Err(Duration::from_millis(40)));
        assert_eq!(g.check(&mut tat, t0 + 100 * MS), Ok(()), "one token back after an interval");
        assert!(g.check(&mut tat, t0 + 100 * MS).is_err());
        // Idle long enough, the whole burst is back, and no more.
        let later = t0 + 10_000 * MS;
        for _ in 0..3 {
            assert_eq!(g.check(&mut tat, later), Ok(()));
        }
        assert!(g.check(&mut tat, later).is_err());
        assert!(Gcra::new(Rate::OFF, 5).is_none());
    }

    fn keyed(rate: Rate, burst: u32, cap: usize) -> (Keyed<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Keyed::with_clock(rate, burst, cap, clock.clone()).unwrap(), clock)
    }

    #[test]
    fn clients_are_limited_apart() {
        let (l, clock) = keyed(Rate::per(1, Duration::from_secs(1)), 2, 100);
        assert!(l.check(1).is_ok());
        assert!(l.check(1).is_ok());
        assert_eq!(l.check(1), Err(Duration::from_secs(1)));
        assert!(l.check(2).is_ok(), "another client has its own bucket");
        clock.advance(Duration::from_millis(400));
        assert_eq!(l.check(1), Err(Duration::from_millis(600)));
        clock.advance(Duration::from_millis(600));
        assert!(l.check(1).is_ok());
    }

    #[test]
    fn past_the_cap_new_clients_share_one_bucket_until_idle_ones_are_forgotten() {
        let (l, clock) = keyed(Rate::per(1, Duration::from_secs(1)), 1, 3);
        for k in 1..=3 {
            assert!(l.check(k).is_ok());
        }
        assert_eq!(l.tracked(), 3);
        assert!(l.check(4).is_ok(), "the shared bucket's one token");
        assert!(l.check(5).is_err(), "new clients share it");
        assert!(l.check(4).is_err());
        assert_eq!(l.tracked(), 3, "the map did not grow");
        assert!(l.check(1).is_err(), "tracked clients keep their own state");
        // Nothing is idle yet: nothing is forgotten.
        l.forget_idle();
        assert_eq!(l.tracked(), 3);
        clock.advance(Duration::from_secs(2));
        assert!(l.check(2).is_ok(), "client 2 is busy again");
        l.forget_idle();
        assert_eq!(l.tracked(), 1, "the idle ones are forgotten, the busy one kept");
        assert!(l.check(2).is_err(), "and keeps its state");
        assert!(l.check(5).is_ok(), "a new client is tracked again");
        assert_eq!(l.tracked(), 2);
    }
}
