//! The SQLite store's readers: a fixed number of threads, each with a read
//! connection of its own, taking read jobs from one queue.
//!
//! Why not the runtime's blocking pool: it starts a thread whenever none is
//! idle at the moment a job arrives, and keeps each for ten seconds after.
//! A connect storm (19,000 subscribers arriving, each reading its channel's
//! head) ran up more than a hundred threads and as many read connections,
//! each with its page cache and lookaside memory, and kept the connections
//! for the server's life. A read is tens of microseconds of CPU, so more
//! readers than cores only queue for the cores; a fixed few bound the
//! threads, the connections and their memory.

use std::{
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::StoreError;

/// A read: given the thread's connection (or why it could not be opened).
type Job = Box<dyn FnOnce(rusqlite::Result<&Connection>) + Send>;

pub(crate) struct Readers {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Readers {
    /// Starts `count` reader threads; each opens its connection with `open`
    /// on its first job.
    pub(crate) fn start(
        count: usize,
        path: PathBuf,
        open: fn(&Path) -> rusqlite::Result<Connection>,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let (rx, path) = (rx.clone(), path.clone());
            let thread = std::thread::Builder::new()
                .name(format!("herald-store-reader-{i}"))
                .spawn(move || serve(&rx, &path, open))
                .map_err(|e| StoreError::Backend(format!("starting a reader thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Readers { jobs: Mutex::new(Some(tx)), threads: Mutex::new(threads) })
    }

    /// Runs `f` on a reader's connection and waits for its answer.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(conn.and_then(f).map_err(|e| StoreError::Backend(e.to_string())));
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)?;
        }
        // Queued, so it runs even if the store closes now: an answer that
        // never comes means the read itself failed (it panicked).
        answer.await.map_err(|_| StoreError::Backend("the read failed".into()))?
    }

    /// Lets the readers finish the jobs already queued, then waits for them
    /// to exit (their connections close with them).
    pub(crate) async fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// One reader thread: jobs until the queue closes.
fn serve(jobs: &Mutex<mpsc::Receiver<Job>>, path: &Path, open: fn(&Path) -> rusqlite::Result<Connection>) {
    let mut conn: Option<Connection> = None;
    loop {
        // The lock is held only while waiting for a job, not while running it.
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if conn.is_none() {
            match open(path) {
                Ok(c) => conn = Some(c),
                // Told to this job; the next one tries again.
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            }
        }
        // A read that panics fails alone (its caller is told), and the
        // thread goes on with a fresh connection, as the blocking pool's
        // threads did.
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job(Ok(conn.as_ref().expect("opened above")))));
        if ran.is_err() {
            tracing::error!("a store read panicked; its reader goes on with a new connection");
            conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_memory(_: &Path) -> rusqlite::Result<Connection> {
        Connection::open_in_memory()
    }

    #[tokio::test]
    async fn a_read_that_panics_fails_alone_and_its_reader_goes_on() {
        let readers = Readers::start(2, PathBuf::new(), in_memory).unwrap();
        for _ in 0..4 {
            let failed = readers.run(|_| -> rusqlite::Result<()> { panic!("a bug in a read") }).await;
            assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
        }
        // Both threads panicked twice and still serve.
        for _ in 0..4 {
            let n: i64 = readers.run(|c| c.query_row("SELECT 41 + 1", [], |r| r.get(0))).await.unwrap();
            assert_eq!(n, 42);
        }
        readers.close().await;
        assert!(matches!(readers.run(|_| Ok(())).await, Err(StoreError::Closed)), "closed: refused");
    }
}
