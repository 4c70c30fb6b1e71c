//! Jobs and records on Redis, shared by every node: whichever node's worker
//! claims a job holds it (lease and fencing token), the others cannot finish
//! it, and a lease that ended is claimed by another node. Every method is one
//! Lua script (or one read), so each is atomic, as the trait asks.
//!
//! All job keys carry one hash tag (`{jobs}`) and live on the first Redis:
//! one slot, so a script may touch any of them. Jobs are a hash each; what
//! `claim` reads is a sorted set of pending jobs by due time and one of
//! running jobs by lease end; `jobs` pages through a sorted set of ids per
//! state; dedupe keys are a hash of key to pending job; records are a hash of
//! values, one of versions and a sorted set of keys (prefix listings by
//! `ZRANGEBYLEX`).

use std::sync::LazyLock;

use redis::{Script, Value};

use super::RedisStore;
use crate::{
    BoxFuture, StoreError,
    jobs::{After, Changes, Claimed, Expect, Job, JobError, JobId, JobState, JobStore, JobSummary, Lease, Record},
};

/// Shared by every job script: KEYS are always, in order, the counters,
/// the pending, running and dead sets by time, the three id sets (pending,
/// running, dead), the dedupe keys, and the record values, versions and
/// key set; a job's hash is `KEYS[1] .. ':' .. id` minus the `seq` suffix
/// (built by `job`). Changes come in ARGV from `at`: record count, then per
/// record key, expected version ("" any), value or nothing ("-" deletes,
/// "+" followed by the value sets); job count, then per job kind, key ("-"
/// none, "+key"), due, payload.
const PRELUDE: &str = r#"
local SEQ, PEND, RUN, DEAD, IDP, IDR, IDD, DEDUPE, RVAL, RVER, RKEYS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local JOB = string.sub(SEQ, 1, #SEQ - 3)
local function int(n) return string.format('%d', n) end
local function job(id) return JOB .. 'job:' .. int(id) end

-- Checks the record expectations of the changes at ARGV[at]; returns an
-- error reply naming the first record not as expected, or nil.
local function check(at)
  local r = tonumber(ARGV[at])
  local i = at + 1
  for _ = 1, r do
    local key, expect = ARGV[i], ARGV[i + 1]
    if expect ~= '' then
      local have = tonumber(redis.call('HGET', RVER, key) or '0')
      if have ~= tonumber(expect) then return {'conflict', key} end
    end
    i = i + 3
  end
  return nil
end

-- Makes job `id` pending at `due`, or folds it into the pending holder of
-- its key (deleting it); returns the id of the job now pending.
local function make_pending(id, due)
  local key = redis.call('HGET', job(id), 'key')
  local state = redis.call('HGET', job(id), 'state')
  if key and key ~= '' then
    local holder = redis.call('HGET', DEDUPE, key)
    if holder and tonumber(holder) ~= id then
      holder = tonumber(holder)
      redis.call('DEL', job(id))
      redis.call('ZREM', RUN, id); redis.call('ZREM', IDR, id); redis.call('ZREM', DEAD, id); redis.call('ZREM', IDD, id)
      local hdue = tonumber(redis.call('HGET', job(holder), 'due'))
      if due < hdue then
        redis.call('HSET', job(holder), 'due', int(due))
        redis.call('ZADD', PEND, due, holder)
      end
      return holder
    end
    redis.call('HSET', DEDUPE, key, id)
  end
  redis.call('HSET', job(id), 'state', 'pending', 'due', int(due), 'lease', '')
  redis.call('ZREM', RUN, id); redis.call('ZREM', IDR, id); redis.call('ZREM', DEAD, id); redis.call('ZREM', IDD, id)
  redis.call('ZADD', PEND, due, id); redis.call('ZADD', IDP, id, id)
  return id
end

-- Applies checked changes at ARGV[at]; returns the ids of the new jobs.
local function apply(at, now)
  local r = tonumber(ARGV[at])
  local i = at + 1
  for _ = 1, r do
    local key, value = ARGV[i], ARGV[i + 2]
    if string.sub(value, 1, 1) == '+' then
      redis.call('HSET', RVAL, key, string.sub(value, 2))
      redis.call('HINCRBY', RVER, key, 1)
      redis.call('ZADD', RKEYS, 0, key)
    else
      redis.call('HDEL', RVAL, key); redis.call('HDEL', RVER, key); redis.call('ZREM', RKEYS, key)
    end
    i = i + 3
  end
  local ids = {}
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    local kind, key, due, payload = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
    local dk = string.sub(key, 2)
    local holder = (key ~= '-') and redis.call('HGET', DEDUPE, dk)
    if holder then
      holder = tonumber(holder)
      local hdue = tonumber(redis.call('HGET', job(holder), 'due'))
      if due < hdue then
        redis.call('HSET', job(holder), 'due', int(due))
        redis.call('ZADD', PEND, due, holder)
      end
      ids[#ids + 1] = holder
    else
      local id = redis.call('HINCRBY', SEQ, 'id', 1)
      redis.call('HSET', job(id), 'kind', kind, 'key', (key ~= '-') and dk or '', 'payload', payload,
        'state', 'pending', 'due', int(due), 'lease', '', 'attempts', 0, 'error', '', 'created', int(now), 'token', 0,
        'haskey', (key ~= '-') and '1' or '0')
      redis.call('ZADD', PEND, due, id); redis.call('ZADD', IDP, id, id)
      if key ~= '-' then redis.call('HSET', DEDUPE, dk, id) end
      ids[#ids + 1] = id
    end
    i = i + 4
  end
  return ids
end

local function fields(id)
  return redis.call('HMGET', job(id), 'kind', 'key', 'payload', 'state', 'due', 'lease', 'attempts', 'error', 'created', 'haskey')
end
"#;

/// ARGV: now, then the changes.
const SUBMIT: &str = r#"
local now = tonumber(ARGV[1])
local bad = check(2)
if bad then return bad end
return {'ok', apply(2, now)}
"#;

/// ARGV: now, lease (ms), limit. Answers per job its id, token and fields.
const CLAIM: &str = r#"
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', PEND, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)) do due[#due + 1] = id end
local pend = {}
for i = 1, #due, 2 do pend[#pend + 1] = {tonumber(due[i + 1]), tonumber(due[i])} end
local ran = redis.call('ZRANGEBYSCORE', RUN, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #ran, 2 do pend[#pend + 1] = {tonumber(ran[i + 1]), tonumber(ran[i])} end
table.sort(pend, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
local out = {}
for n = 1, math.min(limit, #pend) do
  local id = pend[n][2]
  local state = redis.call('HGET', job(id), 'state')
  if state == 'pending' then
    local key = redis.call('HGET', job(id), 'key')
    if redis.call('HGET', job(id), 'haskey') == '1' and tonumber(redis.call('HGET', DEDUPE, key)) == id then
      redis.call('HDEL', DEDUPE, key)
    end
  end
  local token = redis.call('HINCRBY', SEQ, 'token', 1)
  redis.call('HSET', job(id), 'state', 'running', 'lease', int(now + lease), 'token', token)
  redis.call('HINCRBY', job(id), 'attempts', 1)
  redis.call('ZREM', PEND, id); redis.call('ZREM', IDP, id)
  redis.call('ZADD', RUN, now + lease, id); redis.call('ZADD', IDR, id, id)
  out[#out + 1] = {id, token, fields(id)}
end
return out
"#;

/// ARGV: now, job id, token, after (done, retry, release, dead), its due,
/// its error, then the changes.
const FINISH: &str = r#"
local now, id, token, after, due, err = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6]
local st = redis.call('HMGET', job(id), 'state', 'token')
if st[1] ~= 'running' or tonumber(st[2]) ~= token then return {'stale'} end
local bad = check(7)
if bad then return bad end
if after == 'done' then
  local key = redis.call('HGET', job(id), 'key')
  redis.call('DEL', job(id))
  redis.call('ZREM', RUN, id); redis.call('ZREM', IDR, id)
elseif after == 'retry' then
  redis.call('HSET', job(id), 'error', err)
  make_pending(id, due)
elseif after == 'release' then
  local a = tonumber(redis.call('HGET', job(id), 'attempts'))
  if a > 0 then redis.call('HSET', job(id), 'attempts', a - 1) end
  make_pending(id, due)
else
  redis.call('HSET', job(id), 'state', 'dead', 'lease', '', 'error', err)
  redis.call('ZREM', RUN, id); redis.call('ZREM', IDR, id)
  redis.call('ZADD', IDD, id, id)
end
apply(7, now)
return {'ok'}
"#;

/// ARGV: now, job id. Answers the job that will run, or `{'notdead'}`.
const REVIVE: &str = r#"
local now, id = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('HGET', job(id), 'state') ~= 'dead' then return {'notdead'} end
redis.call('HSET', job(id), 'attempts', 0)
local now_pending = make_pending(id, now)
return {'ok', now_pending, fields(now_pending)}
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

static SUBMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(SUBMIT));
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CLAIM));
static FINISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(FINISH));
static REVIVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REVIVE));

impl RedisStore {
    /// The job keys, in the order the scripts expect.
    fn job_keys(&self) -> Vec<String> {
        let p = &self.inner.options.prefix;
        [
            "seq",
            "pending",
            "running",
            "dead",
            "ids:pending",
            "ids:running",
            "ids:dead",
            "dedupe",
            "rec:values",
            "rec:versions",
            "rec:keys",
        ]
        .iter()
        .map(|k| format!("{p}:{{jobs}}:{k}"))
        .collect()
    }

    fn job_hash(&self, id: JobId) -> String {
        format!("{}:{{jobs}}:job:{id}", self.inner.options.prefix)
    }

    fn jobs_shard(&self) -> &super::shard::Shard {
        &self.inner.shards[0]
    }

    async fn run_job_script(
        &self,
        script: &Script,
        head: &[String],
        changes: Option<&Changes>,
    ) -> Result<Vec<Value>, JobError> {
        let mut inv = script.prepare_invoke();
        for k in self.job_keys() {
            inv.key(k);
        }
        for a in head {
            inv.arg(a);
        }
        if let Some(c) = changes {
            inv.arg(c.records.len());
            for w in &c.records {
                inv.arg(&w.key);
                inv.arg(match w.expect {
                    Expect::Any => String::new(),
                    Expect::Version(v) => v.to_string(),
                });
                match &w.value {
                    Some(v) => inv.arg([b"+".as_slice(), v].concat()),
                    None => inv.arg("-"),
                };
            }
            inv.arg(c.jobs.len());
            for j in &c.jobs {
                inv.arg(&j.kind);
                inv.arg(j.key.as_ref().map_or("-".to_owned(), |k| format!("+{k}")));
                inv.arg(j.due);
                inv.arg(&j.payload[..]);
            }
        }
        let answer: Vec<Value> = self.jobs_shard().script(&inv).await?;
        if let Some(Value::BulkString(s)) = answer.first()
            && s == b"conflict"
        {
            let key = answer.get(1).and_then(|v| redis::from_redis_value::<String>(v.clone()).ok()).unwrap_or_default();
            return Err(JobError::Conflict(key));
        }
        Ok(answer)
    }
}

fn status(answer: &[Value]) -> String {
    answer.first().and_then(|v| redis::from_redis_value::<String>(v.clone()).ok()).unwrap_or_default()
}

fn bad(what: &str) -> JobError {
    JobError::Store(StoreError::Backend(format!("unexpected answer from Redis to a job {what}")))
}

/// A job from its id and `fields` (the prelude's order).
fn job_of(id: JobId, fields: Value) -> Option<Job> {
    let f: Vec<Option<Vec<u8>>> = redis::from_redis_value(fields).ok()?;
    let text = |i: usize| f.get(i).cloned().flatten().and_then(|b| String::from_utf8(b).ok());
    let num = |i: usize| text(i).and_then(|t| t.parse::<i64>().ok());
    let has_key = text(9).as_deref() == Some("1");
    Some(Job {
        id,
        kind: text(0)?,
        key: if has_key { text(1) } else { None },
        payload: f.get(2).cloned().flatten().unwrap_or_default(),
        state: JobState::parse(&text(3)?)?,
        due: num(4)?,
        lease_until: num(5),
        attempts: num(6).unwrap_or(0) as u32,
        last_error: text(7).filter(|e| !e.is_empty()),
        created: num(8).unwrap_or(0),
    })
}

impl JobStore for RedisStore {
    fn submit(&self, changes: Changes, now: i64) -> BoxFuture<'_, Result<Vec<JobId>, JobError>> {
        Box::pin(async move {
            let answer = self.run_job_script(&SUBMIT_SCRIPT, &[now.to_string()], Some(&changes)).await?;
            match (status(&answer).as_str(), answer.get(1)) {
                ("ok", Some(ids)) => redis::from_redis_value(ids.clone()).map_err(|_| bad("submit")),
                _ => Err(bad("submit")),
            }
        })
    }

    fn claim(&self, now: i64, lease_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Claimed>, JobError>> {
        Box::pin(async move {
            let head = [now.to_string(), lease_ms.to_string(), limit.to_string()];
            let answer = self.run_job_script(&CLAIM_SCRIPT, &head, None).await?;
            answer
                .into_iter()
                .map(|item| {
                    let Value::Array(mut parts) = item else { return Err(bad("claim")) };
                    let fields = parts.pop().ok_or_else(|| bad("claim"))?;
                    let token: u64 =
                        redis::from_redis_value(parts.pop().ok_or_else(|| bad("claim"))?).map_err(|_| bad("claim"))?;
                    let id: u64 =
                        redis::from_redis_value(parts.pop().ok_or_else(|| bad("claim"))?).map_err(|_| bad("claim"))?;
                    let job = job_of(id, fields).ok_or_else(|| bad("claim"))?;
                    Ok(Claimed { job, lease: Lease { job: id, token } })
                })
                .collect()
        })
    }

    fn finish(&self, lease: Lease, after: After, changes: Changes, now: i64) -> BoxFuture<'_, Result<(), JobError>> {
        Box::pin(async move {
            let (what, due, error) = match after {
                After::Done => ("done", 0, String::new()),
                After::Retry { due, error } => ("retry", due, error),
                After::Release { due } => ("release", due, String::new()),
                After::Dead { error } => ("dead", 0, error),
            };
            let head =
                [now.to_string(), lease.job.to_string(), lease.token.to_string(), what.into(), due.to_string(), error];
            let answer = self.run_job_script(&FINISH_SCRIPT, &head, Some(&changes)).await?;
            match status(&answer).as_str() {
                "ok" => Ok(()),
                "stale" => Err(JobError::Stale(lease.job)),
                _ => Err(bad("finish")),
            }
        })
    }

    fn jobs(&self, state: JobState, after: JobId, limit: usize) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        Box::pin(async move {
            let keys = self.job_keys();
            let set = match state {
                JobState::Pending => &keys[4],
                JobState::Running => &keys[5],
                JobState::Dead => &keys[6],
            };
            let shard = self.jobs_shard();
            let ids: Vec<u64> = shard
                .query(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(set)
                        .arg(format!("({after}"))
                        .arg("+inf")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit),
                )
                .await?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let fields: Value = shard
                    .query(redis::cmd("HMGET").arg(self.job_hash(id)).arg(&[
                        "kind", "key", "payload", "state", "due", "lease", "attempts", "error", "created", "haskey",
                    ]))
                    .await?;
                out.extend(job_of(id, fields));
            }
            Ok(out)
        })
    }

    fn revive(&self, id: JobId, now: i64) -> BoxFuture<'_, Result<Job, JobError>> {
        Box::pin(async move {
            let answer = self.run_job_script(&REVIVE_SCRIPT, &[now.to_string(), id.to_string()], None).await?;
            match status(&answer).as_str() {
                "notdead" => Err(JobError::NotDead(id)),
                "ok" => {
                    let mut it = answer.into_iter().skip(1);
                    let holder: u64 =
                        redis::from_redis_value(it.next().ok_or_else(|| bad("revive"))?).map_err(|_| bad("revive"))?;
                    job_of(holder, it.next().ok_or_else(|| bad("revive"))?).ok_or_else(|| bad("revive"))
                }
                _ => Err(bad("revive")),
            }
        })
    }

    fn summary(&self) -> BoxFuture<'_, Result<JobSummary, JobError>> {
        Box::pin(async move {
            let keys = self.job_keys();
            let mut pipe = redis::pipe();
            pipe.cmd("ZCARD").arg(&keys[1]).cmd("ZCARD").arg(&keys[2]).cmd("ZCARD").arg(&keys[6]);
            pipe.cmd("ZRANGE").arg(&keys[1]).arg(0).arg(0).arg("WITHSCORES");
            pipe.cmd("ZRANGE").arg(&keys[2]).arg(0).arg(0).arg("WITHSCORES");
            type Answer = (u64, u64, u64, Vec<(String, f64)>, Vec<(String, f64)>);
            let (pending, running, dead, p, r): Answer = self.jobs_shard().pipe(&pipe).await?;
            let next_due = p.first().map(|x| x.1 as i64).into_iter().chain(r.first().map(|x| x.1 as i64)).min();
            Ok(JobSummary { pending, running, dead, next_due })
        })
    }

    fn record(&self, key: String) -> BoxFuture<'_, Result<Option<Record>, JobError>> {
        Box::pin(async move {
            let keys = self.job_keys();
            let mut pipe = redis::pipe();
            pipe.cmd("HGET").arg(&keys[8]).arg(&key).cmd("HGET").arg(&keys[9]).arg(&key);
            let (value, version): (Option<Vec<u8>>, Option<u64>) = self.jobs_shard().pipe(&pipe).await?;
            Ok(value.zip(version).map(|(value, version)| Record { value, version }))
        })
    }

    fn records(
        &self,
        prefix: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(String, Record)>, JobError>> {
        Box::pin(async move {
            let keys = self.job_keys();
            let shard = self.jobs_shard();
            let start = if after.as_str() >= prefix.as_str() { format!("({after}") } else { format!("[{prefix}") };
            let names: Vec<String> = shard
                .query(redis::cmd("ZRANGEBYLEX").arg(&keys[10]).arg(start).arg("+").arg("LIMIT").arg(0).arg(limit))
                .await?;
            let mut out = Vec::new();
            for name in names.into_iter().take_while(|n| n.starts_with(&prefix)) {
                if let Some(r) = JobStore::record(self, name.clone()).await? {
                    out.push((name, r));
                }
            }
            Ok(out)
        })
    }
}
