//! A progress line while a run goes on: connections opened, messages sent
//! and received, time elapsed. Written to stderr, rewritten in place a few
//! times a second, and only when stderr is a terminal: in a pipe or a file
//! (scripts, `bench/compare.sh`) the bench stays as quiet as before.
//!
//! The counts are process-wide atomics the clients add to; one relaxed add
//! per event, whether anyone draws them or not.

use std::{
    io::{IsTerminal, Write},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Subscribers connected (and subscribed).
pub(crate) static CONNECTED: AtomicU64 = AtomicU64::new(0);
/// Messages published (acknowledged, for publishers that wait).
pub(crate) static SENT: AtomicU64 = AtomicU64::new(0);
/// Messages received by subscribers.
pub(crate) static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// What a run expects, for the "of N" figures; 0 leaves a figure out.
#[derive(Clone, Copy, Default)]
pub(crate) struct Expect {
    pub(crate) connections: u64,
    pub(crate) sent: u64,
    pub(crate) received: u64,
}

/// Draws the line until dropped, then clears it.
pub(crate) struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing when stderr is a terminal; otherwise does nothing.
    pub(crate) fn start(expect: Expect) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                let mut err = std::io::stderr().lock();
                // Carriage return and erase-line: the line is redrawn in place.
                let _ = write!(err, "\r\x1b[K{}", line(expect, started.elapsed()));
                let _ = err.flush();
            }
        });
        Progress { task: Some(task) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// `connected 800/1000  sent 0/1000  received 0/1000000  2.3 s`
fn line(expect: Expect, elapsed: Duration) -> String {
    let figure = |name: &str, n: &AtomicU64, of: u64| {
        let n = n.load(Ordering::Relaxed);
        if of > 0 { format!("{name} {n}/{of}") } else { format!("{name} {n}") }
    };
    let mut parts = Vec::new();
    if expect.connections > 0 {
        parts.push(figure("connected", &CONNECTED, expect.connections));
    }
    parts.push(figure("sent", &SENT, expect.sent));
    if expect.received > 0 {
        parts.push(figure("received", &RECEIVED, expect.received));
    }
    parts.push(format!("{:.1} s", elapsed.as_secs_f64()));
    parts.join("  ")
}

pub(crate) fn connected() {
    CONNECTED.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn sent() {
    SENT.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn received() {
    RECEIVED.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_what_a_run_expects() {
        let l = line(Expect { connections: 10, sent: 5, received: 50 }, Duration::from_millis(1500));
        assert!(l.starts_with("connected "), "{l}");
        assert!(l.contains("/10") && l.contains("/5") && l.contains("/50") && l.ends_with("1.5 s"), "{l}");
        let l = line(Expect { sent: 100, ..Default::default() }, Duration::ZERO);
        assert!(!l.contains("connected") && !l.contains("received"), "{l}");
    }
}
