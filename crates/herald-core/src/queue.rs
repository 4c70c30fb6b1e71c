//! A bounded queue with one consumer, for messages waiting to be sent to a
//! connection: the hub's mailboxes and MQTT's routed messages.
//!
//! Not a tokio channel: one of those allocates a 32-slot block up front
//! (about 800 bytes per subscriber, measured with heaptrack), and most
//! subscribers of a push server are idle connections that never hold a
//! message. This one allocates on first use and gives a burst's room back
//! once drained, so an idle connection's queue is a lock and a few words.
//!
//! Producers never wait: a full (or closed) queue refuses the item and the
//! producer decides what that means (the hub marks the subscriber lagged).
//! Closing wakes the consumer, which sees the end once the queue is drained.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::Mutex,
    task::{Context, Poll, Waker},
};

pub struct Queue<T> {
    inner: Mutex<Inner<T>>,
    capacity: usize,
}

struct Inner<T> {
    items: VecDeque<T>,
    /// The consumer waiting for an item, if it is.
    waker: Option<Waker>,
    closed: bool,
}

/// A drained queue keeps at most this much room.
const KEEP_ROOM: usize = 64;

impl<T> Queue<T> {
    /// A queue holding at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner { items: VecDeque::new(), waker: None, closed: false }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        // A panic elsewhere while holding the lock leaves the queue consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item`, or hands it back when the queue is full or closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let waker = {
            let mut q = self.lock();
            if q.closed || q.items.len() >= self.capacity {
                return Err(item);
            }
            q.items.push_back(item);
            q.waker.take()
        };
        // Woken outside the lock, so the consumer never waits for a producer.
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// The next item if one is queued.
    pub fn pop(&self) -> Option<T> {
        match self.poll_pop(None) {
            Poll::Ready(item) => item,
            Poll::Pending => None,
        }
    }

    /// The next item; `None` once closed and drained. Cancel-safe.
    pub async fn recv(&self) -> Option<T> {
        poll_fn(|cx| self.poll_pop(Some(cx))).await
    }

    /// The next item, or registers `cx` to be woken when one comes.
    pub fn poll_pop(&self, cx: Option<&mut Context<'_>>) -> Poll<Option<T>> {
        let mut q = self.lock();
        if let Some(item) = q.items.pop_front() {
            if q.items.is_empty() && q.items.capacity() > KEEP_ROOM {
                q.items = VecDeque::new();
            }
            return Poll::Ready(Some(item));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        if let Some(cx) = cx
            && !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            q.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Refuses further items and wakes the consumer.
    pub fn close(&self) {
        let waker = {
            let mut q = self.lock();
            q.closed = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room currently allocated, in items (for tests of the idle footprint).
    pub fn allocated(&self) -> usize {
        self.lock().items.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    #[test]
    fn bounded_and_refuses_when_full() {
        let q = Queue::new(2);
        assert_eq!(q.push(1), Ok(()));
        assert_eq!(q.push(2), Ok(()));
        assert_eq!(q.push(3), Err(3));
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.push(3), Ok(()));
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(2), Some(3), None));
    }

    #[test]
    fn allocates_nothing_while_idle_and_gives_room_back_once_drained() {
        let q = Queue::new(1024);
        assert_eq!(q.allocated(), 0);
        for i in 0..500 {
            q.push(i).unwrap();
        }
        assert!(q.allocated() >= 500);
        while q.pop().is_some() {}
        assert!(q.allocated() <= KEEP_ROOM);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_consumer_is_woken_by_a_push_and_by_close() {
        let q = Arc::new(Queue::new(16));
        let consumer = {
            let q = q.clone();
            tokio::spawn(async move { (q.recv().await, q.recv().await, q.recv().await) })
        };
        tokio::task::yield_now().await;
        q.push(1).unwrap();
        q.push(2).unwrap();
        q.close();
        assert_eq!(q.push(3), Err(3), "closed: refused");
        let got = tokio::time::timeout(Duration::from_secs(10), consumer).await.expect("woken").unwrap();
        assert_eq!(got, (Some(1), Some(2), None), "drained first, then the end");
    }
}
