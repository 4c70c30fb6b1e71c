//! Jobs and records in SQLite. Every change runs on the store's one writer
//! thread, inside its group commit (so a job is as durable as a message,
//! and a burst of notifications shares commits with their jobs); listings and
//! records are read on the reader threads.
//!
//! The pending-key rule is a partial unique index (`key` among pending jobs),
//! so a claim, which makes a job running, gives its key up by itself.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    After, Changes, Claimed, Expect, Job, JobError, JobId, JobState, JobStore, JobSummary, Lease, Record, RecordWrite,
};
use crate::{BoxFuture, SqliteStore, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    key         TEXT,
    payload     BLOB NOT NULL,
    state       INTEGER NOT NULL,
    due         INTEGER NOT NULL,
    lease_until INTEGER,
    token       INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    created     INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_pending_key ON jobs (key) WHERE state = 0 AND key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_due ON jobs (state, due);
CREATE INDEX IF NOT EXISTS jobs_by_lease ON jobs (state, lease_until);
CREATE TABLE IF NOT EXISTS job_records (
    key     TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    value   BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_tokens (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    last INTEGER NOT NULL
);
INSERT OR IGNORE INTO job_tokens (one, last) VALUES (1, 0);
";

const PENDING: i64 = 0;
const RUNNING: i64 = 1;
const DEAD: i64 = 2;

const COLUMNS: &str = "id, kind, key, payload, state, due, lease_until, attempts, last_error, created";

/// Creates the tables, and ends the leases of the process that used the
/// database before: one process owns an embedded store, so whatever it had
/// claimed when it stopped (or was killed) can run again at once instead of
/// waiting out its lease.
pub(crate) fn init_sqlite(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute("UPDATE jobs SET lease_until = 0 WHERE state = ?1", [RUNNING])?;
    Ok(())
}

fn db(e: rusqlite::Error) -> JobError {
    JobError::Store(StoreError::Backend(e.to_string()))
}

fn state_of(n: i64) -> JobState {
    match n {
        PENDING => JobState::Pending,
        RUNNING => JobState::Running,
        _ => JobState::Dead,
    }
}

fn state_code(s: JobState) -> i64 {
    match s {
        JobState::Pending => PENDING,
        JobState::Running => RUNNING,
        JobState::Dead => DEAD,
    }
}

fn job(r: &Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get::<_, i64>(0)? as JobId,
        kind: r.get(1)?,
        key: r.get(2)?,
        payload: r.get(3)?,
        state: state_of(r.get(4)?),
        due: r.get(5)?,
        lease_until: r.get(6)?,
        attempts: r.get::<_, i64>(7)? as u32,
        last_error: r.get(8)?,
        created: r.get(9)?,
    })
}

fn load(conn: &Connection, id: JobId) -> rusqlite::Result<Option<Job>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?.query_row([id as i64], job).optional()
}

fn version(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT version FROM job_records WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

fn check(conn: &Connection, writes: &[RecordWrite]) -> Result<(), JobError> {
    for w in writes {
        if let Expect::Version(v) = w.expect
            && version(conn, &w.key).map_err(db)? != v
        {
            return Err(JobError::Conflict(w.key.clone()));
        }
    }
    Ok(())
}

fn pending_holder(conn: &Connection, key: &str) -> rusqlite::Result<Option<JobId>> {
    let id: Option<i64> = conn
        .prepare_cached("SELECT id FROM jobs WHERE state = 0 AND key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(id.map(|i| i as JobId))
}

/// Applies checked changes.
fn apply(conn: &Connection, changes: Changes, now: i64) -> rusqlite::Result<Vec<JobId>> {
    for w in changes.records {
        match w.value {
            Some(value) => {
                let v = version(conn, &w.key)? + 1;
                conn.prepare_cached("INSERT OR REPLACE INTO job_records (key, version, value) VALUES (?1, ?2, ?3)")?
                    .execute(params![w.key, v as i64, value])?;
            }
            None => {
                conn.prepare_cached("DELETE FROM job_records WHERE key = ?1")?.execute([w.key])?;
            }
        }
    }
    let mut ids = Vec::with_capacity(changes.jobs.len());
    for new in changes.jobs {
        if let Some(k) = &new.key
            && let Some(holder) = pending_holder(conn, k)?
        {
            conn.prepare_cached("UPDATE jobs SET due = min(due, ?2) WHERE id = ?1")?
                .execute(params![holder as i64, new.due])?;
            ids.push(holder);
            continue;
        }
        conn.prepare_cached(
            "INSERT INTO jobs (kind, key, payload, state, due, created) VALUES (?1, ?2, ?3, 0, ?4, ?5)",
        )?
        .execute(params![new.kind, new.key, new.payload, new.due, now])?;
        ids.push(conn.last_insert_rowid() as JobId);
    }
    Ok(ids)
}

/// Makes `id` pending at `due`, or folds it into the pending holder of its
/// key; returns the id of the job that is now pending.
fn make_pending(conn: &Connection, id: JobId, key: Option<&str>, due: i64) -> rusqlite::Result<JobId> {
    if let Some(k) = key
        && let Some(holder) = pending_holder(conn, k)?
        && holder != id
    {
        conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?.execute([id as i64])?;
        conn.prepare_cached("UPDATE jobs SET due = min(due, ?2) WHERE id = ?1")?
            .execute(params![holder as i64, due])?;
        return Ok(holder);
    }
    conn.prepare_cached("UPDATE jobs SET state = 0, due = ?2, lease_until = NULL WHERE id = ?1")?
        .execute(params![id as i64, due])?;
    Ok(id)
}

fn claim(conn: &Connection, now: i64, lease_ms: u64, limit: usize) -> rusqlite::Result<Vec<Claimed>> {
    let ids: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM (
                 SELECT id, due AS at FROM jobs WHERE state = 0 AND due <= ?1
                 UNION ALL
                 SELECT id, lease_until AS at FROM jobs WHERE state = 1 AND lease_until <= ?1
             ) ORDER BY at, id LIMIT ?2",
        )?
        .query_map(params![now, limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let token: i64 =
            conn.prepare_cached("UPDATE job_tokens SET last = last + 1 RETURNING last")?.query_row([], |r| r.get(0))?;
        conn.prepare_cached(
            "UPDATE jobs SET state = 1, lease_until = ?2, token = ?3, attempts = attempts + 1 WHERE id = ?1",
        )?
        .execute(params![id, now + lease_ms as i64, token])?;
        let job = load(conn, id as JobId)?.expect("claimed in this transaction");
        out.push(Claimed { job, lease: Lease { job: id as JobId, token: token as u64 } });
    }
    Ok(out)
}

fn finish(conn: &Connection, lease: Lease, after: After, changes: Changes, now: i64) -> Result<(), JobError> {
    let held: Option<(i64, i64, Option<String>)> = conn
        .prepare_cached("SELECT state, token, key FROM jobs WHERE id = ?1")
        .and_then(|mut s| s.query_row([lease.job as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
        .map_err(db)?;
    let key = match held {
        Some((RUNNING, token, key)) if token as u64 == lease.token => key,
        _ => return Err(JobError::Stale(lease.job)),
    };
    check(conn, &changes.records)?;
    let id = lease.job as i64;
    let run = || -> rusqlite::Result<()> {
        match after {
            After::Done => {
                conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?.execute([id])?;
            }
            After::Retry { due, error } => {
                conn.prepare_cached("UPDATE jobs SET last_error = ?2 WHERE id = ?1")?.execute(params![id, error])?;
                make_pending(conn, lease.job, key.as_deref(), due)?;
            }
            After::Release { due } => {
                conn.prepare_cached("UPDATE jobs SET attempts = max(attempts - 1, 0) WHERE id = ?1")?.execute([id])?;
                make_pending(conn, lease.job, key.as_deref(), due)?;
            }
            After::Dead { error } => {
                conn.prepare_cached("UPDATE jobs SET state = 2, lease_until = NULL, last_error = ?2 WHERE id = ?1")?
                    .execute(params![id, error])?;
            }
        }
        apply(conn, changes, now)?;
        Ok(())
    };
    run().map_err(db)
}

fn revive(conn: &Connection, id: JobId, now: i64) -> Result<Job, JobError> {
    let found = load(conn, id).map_err(db)?;
    let Some(dead) = found.filter(|j| j.state == JobState::Dead) else {
        return Err(JobError::NotDead(id));
    };
    let run = || -> rusqlite::Result<Job> {
        conn.prepare_cached("UPDATE jobs SET attempts = 0 WHERE id = ?1")?.execute([id as i64])?;
        let now_pending = make_pending(conn, id, dead.key.as_deref(), now)?;
        Ok(load(conn, now_pending)?.expect("pending in this transaction"))
    };
    run().map_err(db)
}

/// A record from its value and version columns, starting at `at`.
fn record_row(r: &Row<'_>, at: usize) -> rusqlite::Result<Record> {
    Ok(Record { value: r.get(at)?, version: r.get::<_, i64>(at + 1)? as u64 })
}

impl JobStore for SqliteStore {
    fn submit(&self, changes: Changes, now: i64) -> BoxFuture<'_, Result<Vec<JobId>, JobError>> {
        Box::pin(self.write(move |conn| {
            check(conn, &changes.records)?;
            apply(conn, changes, now).map_err(db)
        }))
    }

    fn claim(&self, now: i64, lease_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Claimed>, JobError>> {
        Box::pin(self.write(move |conn| claim(conn, now, lease_ms, limit).map_err(db)))
    }

    fn finish(&self, lease: Lease, after: After, changes: Changes, now: i64) -> BoxFuture<'_, Result<(), JobError>> {
        Box::pin(self.write(move |conn| finish(conn, lease, after, changes, now)))
    }

    fn jobs(&self, state: JobState, after: JobId, limit: usize) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        Box::pin(async move {
            let rows = self
                .with_reader(move |conn| {
                    conn.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM jobs WHERE state = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                    ))?
                    .query_map(params![state_code(state), after as i64, limit as i64], job)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .await?;
            Ok(rows)
        })
    }

    fn revive(&self, id: JobId, now: i64) -> BoxFuture<'_, Result<Job, JobError>> {
        Box::pin(self.write(move |conn| revive(conn, id, now)))
    }

    fn summary(&self) -> BoxFuture<'_, Result<JobSummary, JobError>> {
        Box::pin(async move {
            let s = self
                .with_reader(|conn| {
                    let mut s = JobSummary::default();
                    let mut stmt = conn.prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")?;
                    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)))? {
                        match row? {
                            (PENDING, n) => s.pending = n,
                            (RUNNING, n) => s.running = n,
                            (_, n) => s.dead += n,
                        }
                    }
                    s.next_due = conn
                        .prepare_cached(
                            "SELECT min(at) FROM (
                                 SELECT min(due) AS at FROM jobs WHERE state = 0
                                 UNION ALL
                                 SELECT min(lease_until) AS at FROM jobs WHERE state = 1
                             )",
                        )?
                        .query_row([], |r| r.get(0))?;
                    Ok(s)
                })
                .await?;
            Ok(s)
        })
    }

    fn record(&self, key: String) -> BoxFuture<'_, Result<Option<Record>, JobError>> {
        Box::pin(async move {
            let r = self
                .with_reader(move |conn| {
                    conn.prepare_cached("SELECT value, version FROM job_records WHERE key = ?1")?
                        .query_row([key], |r| record_row(r, 0))
                        .optional()
                })
                .await?;
            Ok(r)
        })
    }

    fn records(
        &self,
        prefix: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(String, Record)>, JobError>> {
        Box::pin(async move {
            let rows = self
                .with_reader(move |conn| {
                    // Keys with the prefix sort from the prefix itself up to
                    // the prefix followed by the highest character: a range
                    // on the primary key (not LIKE: keys may hold % or _).
                    let upper = format!("{prefix}\u{10FFFF}");
                    let start = if after.as_str() >= prefix.as_str() { after } else { String::new() };
                    let mut stmt = conn.prepare_cached(
                        "SELECT key, value, version FROM job_records
                         WHERE key >= ?1 AND key < ?2 AND key > ?3 ORDER BY key LIMIT ?4",
                    )?;
                    stmt.query_map(params![prefix, upper, start, limit as i64], |r| {
                        Ok((r.get::<_, String>(0)?, record_row(r, 1)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .await?;
            Ok(rows)
        })
    }
}
