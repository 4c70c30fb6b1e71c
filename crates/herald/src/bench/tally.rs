//! What subscribers record: the payload they expect (a sequence number and
//! the send time), per-subscriber loss/duplicate/order counts, and one shared
//! latency histogram.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use hdrhistogram::Histogram;

/// Shared by all subscribers of one run: the latency histogram, and the
/// first send time and last receive time seen, which bound the delivery
/// window even when someone else (another process) published.
pub(crate) struct Recorder {
    hist: Mutex<Histogram<u64>>,
    first_sent_us: AtomicU64,
    last_received_us: AtomicU64,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Recorder {
            hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
            first_sent_us: AtomicU64::new(u64::MAX),
            last_received_us: AtomicU64::new(0),
        }
    }

    fn record(&self, sent_us: u64) {
        let now = now_us();
        self.first_sent_us.fetch_min(sent_us, Ordering::Relaxed);
        self.last_received_us.fetch_max(now, Ordering::Relaxed);
        let _ = self.hist().record(now.saturating_sub(sent_us).max(1));
    }

    pub(crate) fn hist(&self) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        self.hist.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds from the first message sent to the last one received, if any arrived.
    pub(crate) fn window_secs(&self) -> Option<f64> {
        let (first, last) = (self.first_sent_us.load(Ordering::Relaxed), self.last_received_us.load(Ordering::Relaxed));
        (last > 0 && last > first).then(|| (last - first) as f64 / 1e6)
    }

    /// The histogram as `latency_µs count` lines, so several processes'
    /// figures can be merged into exact quantiles by a script.
    pub(crate) fn write_latencies(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::fmt::Write;
        let mut out = String::new();
        for v in self.hist().iter_recorded() {
            let _ = writeln!(out, "{} {}", v.value_iterated_to(), v.count_at_value());
        }
        std::fs::write(path, out)?;
        Ok(())
    }
}

/// What one subscriber received.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) received: u64,
    pub(crate) unique: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    last_seq: Option<u64>,
    seen: Vec<bool>,
}

impl Tally {
    pub(crate) fn new(messages: usize) -> Self {
        Tally { seen: vec![false; messages], ..Default::default() }
    }

    /// Records one delivery of `seq` sent at `sent_us` (µs since the epoch).
    pub(crate) fn record(&mut self, seq: u64, sent_us: u64, recorder: &Recorder) {
        self.received += 1;
        let Some(slot) = self.seen.get_mut(seq as usize) else { return };
        if *slot {
            self.duplicates += 1;
            return;
        }
        *slot = true;
        self.unique += 1;
        if self.last_seq.is_some_and(|l| seq < l) {
            self.out_of_order += 1;
        }
        self.last_seq = Some(seq);
        recorder.record(sent_us);
    }
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// The ~100-byte payload: sequence number, send time, padding.
pub(crate) fn payload(seq: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"t\":{}", now_us());
    let pad = 100usize.saturating_sub(head.len() + 9);
    format!("{head},\"p\":\"{}\"}}", "x".repeat(pad))
}

/// Reads `seq` and `t` back out of a payload (or a message object around it).
pub(crate) fn parse_payload(text: &str) -> Option<(u64, u64)> {
    let num = |key: &str| -> Option<u64> {
        let i = text.find(key)? + key.len();
        let rest = &text[i..];
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Some((num("\"seq\":")?, num("\"t\":")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_inside_an_envelope() {
        let p = payload(42);
        assert!((90..=100).contains(&p.len()), "{p}");
        let (seq, t) = parse_payload(&format!("{{\"id\":7,\"data\":{p}}}")).unwrap();
        assert_eq!(seq, 42);
        assert!(t > 0);
    }

    #[test]
    fn tally_counts_duplicates_and_disorder() {
        let rec = Recorder::new();
        let mut t = Tally::new(3);
        for seq in [0, 2, 1, 2] {
            t.record(seq, now_us(), &rec);
        }
        assert_eq!((t.received, t.unique, t.duplicates, t.out_of_order), (4, 3, 1, 1));
        assert_eq!(rec.hist().len(), 3);
    }
}
