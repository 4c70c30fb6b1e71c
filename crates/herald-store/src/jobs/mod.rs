//! The `JobStore` seam: durable outbound work — what Herald owes someone (an
//! e-mail, a webhook call, a decision about a user's unread notifications) —
//! and the small versioned records that work keeps (a user's contact, how far
//! a user's fallback got, how far a channel was forwarded).
//!
//! A job is *pending* until its due time, then *claimed* by one worker with a
//! lease and a fencing token: while the lease runs nobody else can claim it;
//! once it ends another worker may, and from then on the first worker's token
//! is refused, so a worker that stalled past its lease cannot also finish the
//! job. The worker finishes with an [`After`]: done (the job is deleted),
//! retry at a time, back without counting the attempt, or dead (kept, listed,
//! revivable). A finish and a [`Changes`] (new jobs, record writes) apply
//! together or not at all, which is how a step hands over to the next without
//! a window where a crash loses the hand-over or does it twice.
//!
//! Designed to be implemented on Redis with one script per method, so several
//! nodes share one queue: a hash per job; a sorted set of pending jobs by due
//! time and one of running jobs by lease end (what `claim` and `summary`
//! read); a sorted set of ids per state (what `jobs` pages through); a hash
//! of dedupe key to pending job; `INCR` counters for ids and fencing tokens;
//! records as one hash (value and version) plus a sorted set of their keys
//! for `records`' ordered prefix listing (`ZRANGEBYLEX`). Every method is one
//! atomic step, times are the caller's (`now`, ms since the epoch), and
//! nothing here assumes SQL.

mod memory;
mod sqlite;

pub(crate) use memory::JobTable;
pub(crate) use sqlite::init_sqlite;

use crate::{BoxFuture, StoreError};

/// A job's id: assigned by the store, never reused.
pub type JobId = u64;

/// Where a job is in its life. Finished jobs are deleted, not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for its due time (or due and not yet claimed).
    Pending,
    /// Claimed by a worker whose lease has not been given back. A lease that
    /// ended can be claimed again.
    Running,
    /// Failed for good; kept until revived.
    Dead,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(JobState::Pending),
            "running" => Some(JobState::Running),
            "dead" => Some(JobState::Dead),
            _ => None,
        }
    }
}

/// A job to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// What runs it (the store does not interpret it).
    pub kind: String,
    /// A dedupe key: at most one *pending* job holds a key. Adding a job whose
    /// key a pending job holds adds nothing, and the holder's due time becomes
    /// the earlier of the two. A claim gives the key up, so work that arrives
    /// while a job runs gets a pending job of its own.
    pub key: Option<String>,
    /// When it may run.
    pub due: i64,
    /// What it needs (opaque to the store).
    pub payload: Vec<u8>,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub kind: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub state: JobState,
    /// When it is (or was last) due.
    pub due: i64,
    /// When the current lease ends (running jobs only).
    pub lease_until: Option<i64>,
    /// Claims so far (a claim is an attempt, whether or not it finished).
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created: i64,
}

/// The right to finish one claimed job: its id and the fencing token of the
/// claim. A later claim of the same job makes this token stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub job: JobId,
    pub token: u64,
}

/// A job handed to a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub lease: Lease,
}

/// How a claimed job ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Finished: the job is deleted.
    Done,
    /// Failed this time: pending again at `due`, with the error kept.
    Retry { due: i64, error: String },
    /// Not attempted after all (a send rate said wait): pending again at
    /// `due`, and the claim does not count as an attempt.
    Release { due: i64 },
    /// Failed for good: kept as a dead letter with the error.
    Dead { error: String },
}

/// A stored record and its version (1 on first write, +1 on each write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub value: Vec<u8>,
    pub version: u64,
}

/// What a record write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there.
    Any,
    /// This version; 0 means no record.
    Version(u64),
}

/// Sets (`Some`) or deletes (`None`) one record, if it is as expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWrite {
    pub key: String,
    pub expect: Expect,
    pub value: Option<Vec<u8>>,
}

/// Jobs to add and records to write, applied atomically: if any record is
/// not as expected, nothing is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub jobs: Vec<NewJob>,
    pub records: Vec<RecordWrite>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.records.is_empty()
    }
}

/// Counts by state and the next moment a claim could take something.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobSummary {
    pub pending: u64,
    pub running: u64,
    pub dead: u64,
    /// The earliest due time of a pending job or lease end of a running one:
    /// when a worker should look again, and (when past) how late the oldest
    /// due job is.
    pub next_due: Option<i64>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The lease was lost: the job was claimed again (or finished, or revived)
    /// since. The caller's work on it must not take effect.
    #[error("job {0}: the lease is no longer held")]
    Stale(JobId),
    /// A record was written by someone else since it was read.
    #[error("record '{0}' changed since it was read")]
    Conflict(String),
    #[error("no dead job {0}")]
    NotDead(JobId),
}

/// Durable jobs and records. Every method is atomic on its own.
pub trait JobStore: Send + Sync + 'static {
    /// Applies `changes` (see [`Changes`] and [`NewJob::key`]); returns, per
    /// new job, the id of the job that now holds it (its own, or the pending
    /// job with the same key).
    fn submit(&self, changes: Changes, now: i64) -> BoxFuture<'_, Result<Vec<JobId>, JobError>>;

    /// Claims up to `limit` jobs that are due at `now` (pending with `due <=
    /// now`, or running with a lease that ended), earliest first, for
    /// `lease_ms`: each gets a new fencing token, one more attempt, and gives
    /// up its dedupe key.
    fn claim(&self, now: i64, lease_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Claimed>, JobError>>;

    /// Ends a claim and applies `changes` with it, all or nothing. `Stale`
    /// when the lease's token is no longer the job's, `Conflict` when a record
    /// is not as expected. A job that goes back to pending while another
    /// pending job holds its key is folded into that one (deleted; the holder
    /// becomes due at the earlier time).
    fn finish(&self, lease: Lease, after: After, changes: Changes, now: i64) -> BoxFuture<'_, Result<(), JobError>>;

    /// Jobs in `state` with ids above `after`, by id, at most `limit`.
    fn jobs(&self, state: JobState, after: JobId, limit: usize) -> BoxFuture<'_, Result<Vec<Job>, JobError>>;

    /// A dead job back to pending, due `now`, its attempts reset (folded into
    /// a pending job with its key, as in `finish`); returns the job that will
    /// run. `NotDead` when there is no such dead job.
    fn revive(&self, id: JobId, now: i64) -> BoxFuture<'_, Result<Job, JobError>>;

    fn summary(&self) -> BoxFuture<'_, Result<JobSummary, JobError>>;

    fn record(&self, key: String) -> BoxFuture<'_, Result<Option<Record>, JobError>>;

    /// Records whose keys start with `prefix` and sort after `after`, in key
    /// order, at most `limit`.
    fn records(
        &self,
        prefix: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(String, Record)>, JobError>>;
}
