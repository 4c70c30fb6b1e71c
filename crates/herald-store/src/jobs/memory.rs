//! Jobs and records in memory: the reference semantics of [`JobStore`], kept
//! by the in-memory store under one lock (each method is then atomic).

use std::collections::{BTreeMap, HashMap};

use super::{
    After, Changes, Claimed, Expect, Job, JobError, JobId, JobState, JobStore, JobSummary, Lease, Record, RecordWrite,
};
use crate::{BoxFuture, MemoryStore};

#[derive(Default)]
pub(crate) struct JobTable {
    last_id: JobId,
    last_token: u64,
    /// Each job with the token of its latest claim.
    jobs: BTreeMap<JobId, (Job, u64)>,
    /// Dedupe key to the pending job holding it.
    keys: HashMap<String, JobId>,
    records: BTreeMap<String, Record>,
}

impl JobTable {
    fn check(&self, writes: &[RecordWrite]) -> Result<(), JobError> {
        for w in writes {
            if let Expect::Version(v) = w.expect
                && self.records.get(&w.key).map_or(0, |r| r.version) != v
            {
                return Err(JobError::Conflict(w.key.clone()));
            }
        }
        Ok(())
    }

    /// Applies checked changes.
    fn apply(&mut self, changes: Changes, now: i64) -> Vec<JobId> {
        for w in changes.records {
            match w.value {
                Some(value) => {
                    let version = self.records.get(&w.key).map_or(0, |r| r.version) + 1;
                    self.records.insert(w.key, Record { value, version });
                }
                None => {
                    self.records.remove(&w.key);
                }
            }
        }
        let mut ids = Vec::with_capacity(changes.jobs.len());
        for new in changes.jobs {
            if let Some(holder) = new.key.as_ref().and_then(|k| self.keys.get(k)).copied() {
                let (job, _) = self.jobs.get_mut(&holder).expect("a key's holder exists");
                job.due = job.due.min(new.due);
                ids.push(holder);
                continue;
            }
            self.last_id += 1;
            let id = self.last_id;
            if let Some(k) = &new.key {
                self.keys.insert(k.clone(), id);
            }
            let job = Job {
                id,
                kind: new.kind,
                key: new.key,
                payload: new.payload,
                state: JobState::Pending,
                due: new.due,
                lease_until: None,
                attempts: 0,
                last_error: None,
                created: now,
            };
            self.jobs.insert(id, (job, 0));
            ids.push(id);
        }
        ids
    }

    /// Makes `id` pending at `due`, or folds it into the pending holder of its
    /// key; returns the job that is now pending.
    fn make_pending(&mut self, id: JobId, due: i64) -> Job {
        let key = self.jobs[&id].0.key.clone();
        if let Some(holder) = key.as_ref().and_then(|k| self.keys.get(k)).copied()
            && holder != id
        {
            self.jobs.remove(&id);
            let (job, _) = self.jobs.get_mut(&holder).expect("a key's holder exists");
            job.due = job.due.min(due);
            return job.clone();
        }
        let (job, _) = self.jobs.get_mut(&id).expect("checked by the caller");
        job.state = JobState::Pending;
        job.due = due;
        job.lease_until = None;
        if let Some(k) = key {
            self.keys.insert(k, id);
        }
        job.clone()
    }

    pub(crate) fn submit(&mut self, changes: Changes, now: i64) -> Result<Vec<JobId>, JobError> {
        self.check(&changes.records)?;
        Ok(self.apply(changes, now))
    }

    pub(crate) fn claim(&mut self, now: i64, lease_ms: u64, limit: usize) -> Vec<Claimed> {
        let mut due: Vec<(i64, JobId)> = self
            .jobs
            .values()
            .filter_map(|(j, _)| match j.state {
                JobState::Pending if j.due <= now => Some((j.due, j.id)),
                JobState::Running if j.lease_until.is_some_and(|l| l <= now) => Some((j.lease_until?, j.id)),
                _ => None,
            })
            .collect();
        due.sort_unstable();
        due.truncate(limit);
        let mut out = Vec::with_capacity(due.len());
        for (_, id) in due {
            self.last_token += 1;
            let (job, token) = self.jobs.get_mut(&id).expect("listed above");
            if job.state == JobState::Pending
                && let Some(k) = &job.key
            {
                self.keys.remove(k);
            }
            job.state = JobState::Running;
            job.lease_until = Some(now + lease_ms as i64);
            job.attempts += 1;
            *token = self.last_token;
            out.push(Claimed { job: job.clone(), lease: Lease { job: id, token: self.last_token } });
        }
        out
    }

    pub(crate) fn finish(&mut self, lease: Lease, after: After, changes: Changes, now: i64) -> Result<(), JobError> {
        match self.jobs.get(&lease.job) {
            Some((job, token)) if job.state == JobState::Running && *token == lease.token => {}
            _ => return Err(JobError::Stale(lease.job)),
        }
        self.check(&changes.records)?;
        match after {
            After::Done => {
                self.jobs.remove(&lease.job);
            }
            After::Retry { due, error } => {
                self.jobs.get_mut(&lease.job).expect("checked").0.last_error = Some(error);
                self.make_pending(lease.job, due);
            }
            After::Release { due } => {
                let job = &mut self.jobs.get_mut(&lease.job).expect("checked").0;
                job.attempts = job.attempts.saturating_sub(1);
                self.make_pending(lease.job, due);
            }
            After::Dead { error } => {
                let job = &mut self.jobs.get_mut(&lease.job).expect("checked").0;
                job.state = JobState::Dead;
                job.lease_until = None;
                job.last_error = Some(error);
            }
        }
        self.apply(changes, now);
        Ok(())
    }

    pub(crate) fn jobs(&self, state: JobState, after: JobId, limit: usize) -> Vec<Job> {
        self.jobs.range(after + 1..).map(|(_, (j, _))| j).filter(|j| j.state == state).take(limit).cloned().collect()
    }

    pub(crate) fn revive(&mut self, id: JobId, now: i64) -> Result<Job, JobError> {
        match self.jobs.get_mut(&id) {
            Some((job, _)) if job.state == JobState::Dead => job.attempts = 0,
            _ => return Err(JobError::NotDead(id)),
        }
        Ok(self.make_pending(id, now))
    }

    pub(crate) fn summary(&self) -> JobSummary {
        let mut s = JobSummary::default();
        for (j, _) in self.jobs.values() {
            let at = match j.state {
                JobState::Pending => {
                    s.pending += 1;
                    Some(j.due)
                }
                JobState::Running => {
                    s.running += 1;
                    j.lease_until
                }
                JobState::Dead => {
                    s.dead += 1;
                    None
                }
            };
            if let Some(at) = at {
                s.next_due = Some(s.next_due.map_or(at, |n: i64| n.min(at)));
            }
        }
        s
    }

    pub(crate) fn record(&self, key: &str) -> Option<Record> {
        self.records.get(key).cloned()
    }

    pub(crate) fn records(&self, prefix: &str, after: &str, limit: usize) -> Vec<(String, Record)> {
        use std::ops::Bound;
        let start = if after >= prefix { Bound::Excluded(after) } else { Bound::Included(prefix) };
        self.records
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }
}

impl JobStore for MemoryStore {
    fn submit(&self, changes: Changes, now: i64) -> BoxFuture<'_, Result<Vec<JobId>, JobError>> {
        Box::pin(async move { self.job_table().submit(changes, now) })
    }

    fn claim(&self, now: i64, lease_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Claimed>, JobError>> {
        Box::pin(async move { Ok(self.job_table().claim(now, lease_ms, limit)) })
    }

    fn finish(&self, lease: Lease, after: After, changes: Changes, now: i64) -> BoxFuture<'_, Result<(), JobError>> {
        Box::pin(async move { self.job_table().finish(lease, after, changes, now) })
    }

    fn jobs(&self, state: JobState, after: JobId, limit: usize) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        Box::pin(async move { Ok(self.job_table().jobs(state, after, limit)) })
    }

    fn revive(&self, id: JobId, now: i64) -> BoxFuture<'_, Result<Job, JobError>> {
        Box::pin(async move { self.job_table().revive(id, now) })
    }

    fn summary(&self) -> BoxFuture<'_, Result<JobSummary, JobError>> {
        Box::pin(async move { Ok(self.job_table().summary()) })
    }

    fn record(&self, key: String) -> BoxFuture<'_, Result<Option<Record>, JobError>> {
        Box::pin(async move { Ok(self.job_table().record(&key)) })
    }

    fn records(
        &self,
        prefix: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(String, Record)>, JobError>> {
        Box::pin(async move { Ok(self.job_table().records(&prefix, &after, limit)) })
    }
}
