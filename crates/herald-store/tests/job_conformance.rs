//! One suite for the `JobStore` seam, run against every implementation:
//! memory, SQLite, and Redis (a real `redis-server` per test).

mod redis_server;

use std::{collections::HashSet, future::Future, pin::Pin, sync::Arc};

use herald_core::RetentionRules;
use herald_store::{
    After, Changes, CommitSink, Expect, JobError, JobState, JobStore, MemoryStore, NewJob, RecordWrite, RedisOptions,
    RedisStore, SqliteOptions, SqliteStore, StoreConfig, system_clock,
};

struct NoSink;
impl CommitSink for NoSink {
    fn committed(&self, _: &[Arc<herald_core::Message>]) {}
}

fn config() -> StoreConfig {
    StoreConfig { retention: RetentionRules::default(), clock: system_clock(), sink: Arc::new(NoSink) }
}

struct Fixture {
    jobs: Arc<dyn JobStore>,
    _dir: Option<tempfile::TempDir>,
    _redis: Option<redis_server::RedisServer>,
}

type Make = fn() -> Pin<Box<dyn Future<Output = Fixture> + Send>>;

fn memory() -> Pin<Box<dyn Future<Output = Fixture> + Send>> {
    Box::pin(async { Fixture { jobs: Arc::new(MemoryStore::new(config())), _dir: None, _redis: None } })
}

fn sqlite() -> Pin<Box<dyn Future<Output = Fixture> + Send>> {
    Box::pin(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteOptions::new(dir.path()), config()).unwrap();
        Fixture { jobs: Arc::new(store), _dir: Some(dir), _redis: None }
    })
}

fn redis() -> Pin<Box<dyn Future<Output = Fixture> + Send>> {
    Box::pin(async {
        let server = redis_server::RedisServer::start(&[]);
        let store = RedisStore::open(RedisOptions::new(vec![server.url()]), config()).await.unwrap();
        Fixture { jobs: Arc::new(store), _dir: None, _redis: Some(server) }
    })
}

fn job(kind: &str, key: Option<&str>, due: i64) -> NewJob {
    NewJob { kind: kind.into(), key: key.map(String::from), due, payload: kind.as_bytes().to_vec() }
}

fn add(jobs: Vec<NewJob>) -> Changes {
    Changes { jobs, records: vec![] }
}

fn write(key: &str, expect: Expect, value: Option<&str>) -> RecordWrite {
    RecordWrite { key: key.into(), expect, value: value.map(|v| v.as_bytes().to_vec()) }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::memory).await } )* }
        mod sqlite_store { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::sqlite).await } )* }
        mod redis_store { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::redis).await } )* }
    };
}

conformance!(
    claims_take_due_jobs_earliest_first,
    a_lease_that_ended_is_claimed_again_and_the_old_token_is_refused,
    one_pending_job_per_key,
    retry_release_dead_and_revive,
    records_are_compare_and_set,
    a_finish_and_its_changes_apply_together_or_not_at_all,
    summary_counts_and_next_due,
    concurrent_claims_never_hand_out_a_job_twice,
);

async fn claims_take_due_jobs_earliest_first(make: Make) {
    let f = make().await;
    let ids = f.jobs.submit(add(vec![job("c", None, 30), job("a", None, 10), job("b", None, 20)]), 1).await.unwrap();
    assert_eq!(ids.len(), 3);
    assert!(f.jobs.claim(5, 1000, 10).await.unwrap().is_empty(), "nothing due yet");
    let first = f.jobs.claim(15, 1000, 10).await.unwrap();
    assert_eq!(first.iter().map(|c| c.job.kind.as_str()).collect::<Vec<_>>(), ["a"]);
    assert_eq!((first[0].job.attempts, first[0].job.state), (1, JobState::Running));
    assert_eq!(first[0].job.lease_until, Some(1015));
    assert_eq!(first[0].job.payload, b"a");
    assert_eq!(first[0].job.created, 1);
    let rest = f.jobs.claim(40, 1000, 10).await.unwrap();
    assert_eq!(rest.iter().map(|c| c.job.kind.as_str()).collect::<Vec<_>>(), ["b", "c"], "by due time");
    assert!(f.jobs.claim(40, 1000, 10).await.unwrap().is_empty(), "leased jobs are not claimed again");
    let tokens: HashSet<u64> = first.iter().chain(&rest).map(|c| c.lease.token).collect();
    assert_eq!(tokens.len(), 3, "each claim has its own token");
}

async fn a_lease_that_ended_is_claimed_again_and_the_old_token_is_refused(make: Make) {
    let f = make().await;
    f.jobs.submit(add(vec![job("x", None, 0)]), 0).await.unwrap();
    let old = f.jobs.claim(100, 50, 1).await.unwrap().remove(0);
    assert!(f.jobs.claim(149, 50, 1).await.unwrap().is_empty(), "the lease still runs");
    let new = f.jobs.claim(150, 50, 1).await.unwrap().remove(0);
    assert_eq!(new.job.id, old.job.id);
    assert_eq!(new.job.attempts, 2, "the lost claim counted as an attempt");
    assert!(new.lease.token > old.lease.token, "tokens only grow");
    let stale = f.jobs.finish(old.lease, After::Done, Changes::default(), 160).await;
    assert!(matches!(stale, Err(JobError::Stale(id)) if id == old.job.id), "{stale:?}");
    // The refused finish changed nothing: the new holder finishes.
    f.jobs.finish(new.lease, After::Done, Changes::default(), 160).await.unwrap();
    assert!(f.jobs.claim(10_000, 50, 10).await.unwrap().is_empty(), "done jobs are gone");
    let again = f.jobs.finish(new.lease, After::Done, Changes::default(), 170).await;
    assert!(matches!(again, Err(JobError::Stale(_))), "a job finishes once: {again:?}");
    // A lease that ended but was not claimed again can still be finished.
    f.jobs.submit(add(vec![job("y", None, 0)]), 0).await.unwrap();
    let late = f.jobs.claim(200, 10, 1).await.unwrap().remove(0);
    f.jobs.finish(late.lease, After::Done, Changes::default(), 500).await.unwrap();
}

async fn one_pending_job_per_key(make: Make) {
    let f = make().await;
    let a = f.jobs.submit(add(vec![job("fallback", Some("user/1"), 100)]), 0).await.unwrap()[0];
    let same = f.jobs.submit(add(vec![job("fallback", Some("user/1"), 50), job("other", Some("user/2"), 700)]), 0);
    let same = same.await.unwrap();
    assert_eq!(same[0], a, "the pending holder answers for its key");
    assert_ne!(same[1], a);
    f.jobs.submit(add(vec![job("fallback", Some("user/1"), 90)]), 0).await.unwrap();
    let pending = f.jobs.jobs(JobState::Pending, 0, 10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending.iter().find(|j| j.id == a).unwrap().due, 50, "the earlier due time wins");

    // A claim gives the key up: new work gets a pending job of its own.
    let claimed = f.jobs.claim(60, 1000, 1).await.unwrap().remove(0);
    assert_eq!(claimed.job.id, a);
    let b = f.jobs.submit(add(vec![job("fallback", Some("user/1"), 80)]), 0).await.unwrap()[0];
    assert_ne!(b, a);
    // Going back to pending while another holds the key folds into it.
    f.jobs
        .finish(claimed.lease, After::Retry { due: 75, error: "later".into() }, Changes::default(), 61)
        .await
        .unwrap();
    let pending = f.jobs.jobs(JobState::Pending, 0, 10).await.unwrap();
    let keyed: Vec<_> = pending.iter().filter(|j| j.key.as_deref() == Some("user/1")).collect();
    assert_eq!(keyed.len(), 1, "{pending:?}");
    assert_eq!((keyed[0].id, keyed[0].due), (b, 75));
    // With the key free, a retried job takes it back.
    let claimed = f.jobs.claim(75, 1000, 1).await.unwrap().remove(0);
    assert_eq!(claimed.job.id, b);
    f.jobs.finish(claimed.lease, After::Retry { due: 300, error: "e".into() }, Changes::default(), 76).await.unwrap();
    let again = f.jobs.submit(add(vec![job("fallback", Some("user/1"), 400)]), 0).await.unwrap()[0];
    assert_eq!(again, b);
}

async fn retry_release_dead_and_revive(make: Make) {
    let f = make().await;
    let id = f.jobs.submit(add(vec![job("mail", Some("k"), 0)]), 0).await.unwrap()[0];
    let c = f.jobs.claim(1, 1000, 1).await.unwrap().remove(0);
    f.jobs.finish(c.lease, After::Retry { due: 10, error: "451 busy".into() }, Changes::default(), 2).await.unwrap();
    let j = &f.jobs.jobs(JobState::Pending, 0, 10).await.unwrap()[0];
    assert_eq!((j.id, j.due, j.attempts, j.last_error.as_deref()), (id, 10, 1, Some("451 busy")));
    assert!(f.jobs.claim(9, 1000, 1).await.unwrap().is_empty(), "not before its retry time");

    let c = f.jobs.claim(10, 1000, 1).await.unwrap().remove(0);
    assert_eq!(c.job.attempts, 2);
    f.jobs.finish(c.lease, After::Release { due: 20 }, Changes::default(), 11).await.unwrap();
    let c = f.jobs.claim(20, 1000, 1).await.unwrap().remove(0);
    assert_eq!(c.job.attempts, 2, "a released claim was not an attempt");

    f.jobs.finish(c.lease, After::Dead { error: "550 no such user".into() }, Changes::default(), 21).await.unwrap();
    assert!(f.jobs.claim(1_000_000, 1000, 10).await.unwrap().is_empty(), "dead jobs do not run");
    let dead = f.jobs.jobs(JobState::Dead, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].last_error.as_deref(), dead[0].lease_until), (id, Some("550 no such user"), None));
    assert!(f.jobs.jobs(JobState::Dead, id, 10).await.unwrap().is_empty(), "paged by id");

    let revived = f.jobs.revive(id, 500).await.unwrap();
    assert_eq!((revived.id, revived.state, revived.due, revived.attempts), (id, JobState::Pending, 500, 0));
    assert!(matches!(f.jobs.revive(id, 500).await, Err(JobError::NotDead(_))), "only dead jobs revive");
    assert!(matches!(f.jobs.revive(9999, 500).await, Err(JobError::NotDead(_))));
    assert_eq!(
        f.jobs.submit(add(vec![job("mail", Some("k"), 900)]), 0).await.unwrap()[0],
        id,
        "it holds its key again"
    );
}

async fn records_are_compare_and_set(make: Make) {
    let f = make().await;
    assert_eq!(f.jobs.record("a/1".into()).await.unwrap(), None);
    let set = |w: RecordWrite| Changes { jobs: vec![], records: vec![w] };
    f.jobs.submit(set(write("a/1", Expect::Version(0), Some("one"))), 0).await.unwrap();
    let r = f.jobs.record("a/1".into()).await.unwrap().unwrap();
    assert_eq!((r.value.as_slice(), r.version), (&b"one"[..], 1));

    // A stale expectation applies nothing, not even the job beside it.
    let conflict =
        Changes { jobs: vec![job("j", None, 0)], records: vec![write("a/1", Expect::Version(0), Some("x"))] };
    assert!(matches!(f.jobs.submit(conflict, 0).await, Err(JobError::Conflict(k)) if k == "a/1"));
    assert_eq!(f.jobs.summary().await.unwrap().pending, 0);
    assert_eq!(f.jobs.record("a/1".into()).await.unwrap().unwrap().value, b"one");

    f.jobs.submit(set(write("a/1", Expect::Version(1), Some("two"))), 0).await.unwrap();
    f.jobs.submit(set(write("a/1", Expect::Any, Some("three"))), 0).await.unwrap();
    assert_eq!(f.jobs.record("a/1".into()).await.unwrap().unwrap().version, 3);
    for k in ["a/2", "a/3", "a0", "b", "a"] {
        f.jobs.submit(set(write(k, Expect::Any, Some(k))), 0).await.unwrap();
    }
    f.jobs.submit(set(write("a/3", Expect::Version(1), None)), 0).await.unwrap();
    assert_eq!(f.jobs.record("a/3".into()).await.unwrap(), None, "deleted");
    let keys = |v: Vec<(String, herald_store::Record)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys(f.jobs.records("a/".into(), String::new(), 10).await.unwrap()), ["a/1", "a/2"]);
    assert_eq!(keys(f.jobs.records("a/".into(), "a/1".into(), 10).await.unwrap()), ["a/2"]);
    assert_eq!(keys(f.jobs.records("a".into(), String::new(), 2).await.unwrap()), ["a", "a/1"]);
    assert_eq!(keys(f.jobs.records(String::new(), "a0".into(), 10).await.unwrap()), ["b"]);
}

async fn a_finish_and_its_changes_apply_together_or_not_at_all(make: Make) {
    let f = make().await;
    f.jobs.submit(add(vec![job("decide", None, 0)]), 0).await.unwrap();
    let c = f.jobs.claim(1, 1000, 1).await.unwrap().remove(0);
    let follow = |expect| Changes {
        jobs: vec![job("send", None, 5), job("send", None, 6)],
        records: vec![write("progress/u", expect, Some("sent"))],
    };
    let refused = f.jobs.finish(c.lease, After::Done, follow(Expect::Version(3)), 2).await;
    assert!(matches!(refused, Err(JobError::Conflict(_))), "{refused:?}");
    let s = f.jobs.summary().await.unwrap();
    assert_eq!((s.pending, s.running), (0, 1), "the job is still claimed and nothing was added");
    f.jobs.finish(c.lease, After::Done, follow(Expect::Version(0)), 2).await.unwrap();
    let s = f.jobs.summary().await.unwrap();
    assert_eq!((s.pending, s.running), (2, 0));
    assert_eq!(f.jobs.record("progress/u".into()).await.unwrap().unwrap().value, b"sent");
    // Dead with a follow-up: the next channel takes over in the same step.
    let c = f.jobs.claim(5, 1000, 1).await.unwrap().remove(0);
    f.jobs.finish(c.lease, After::Dead { error: "gone".into() }, add(vec![job("next", None, 7)]), 6).await.unwrap();
    let pending = f.jobs.jobs(JobState::Pending, 0, 10).await.unwrap();
    assert_eq!(pending.iter().map(|j| j.kind.as_str()).collect::<Vec<_>>(), ["send", "next"]);
}

async fn summary_counts_and_next_due(make: Make) {
    let f = make().await;
    assert_eq!(f.jobs.summary().await.unwrap(), Default::default());
    f.jobs.submit(add(vec![job("a", None, 100), job("b", None, 200), job("c", None, 300)]), 0).await.unwrap();
    assert_eq!(f.jobs.summary().await.unwrap().next_due, Some(100));
    let a = f.jobs.claim(100, 50, 1).await.unwrap().remove(0);
    let s = f.jobs.summary().await.unwrap();
    assert_eq!((s.pending, s.running, s.dead, s.next_due), (2, 1, 0, Some(150)), "the lease end comes first");
    f.jobs.finish(a.lease, After::Dead { error: "x".into() }, Changes::default(), 101).await.unwrap();
    let s = f.jobs.summary().await.unwrap();
    assert_eq!((s.pending, s.running, s.dead, s.next_due), (2, 0, 1, Some(200)));
}

async fn concurrent_claims_never_hand_out_a_job_twice(make: Make) {
    let f = make().await;
    f.jobs.submit(add((0..60).map(|i| job("j", None, i)).collect()), 0).await.unwrap();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let jobs = f.jobs.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let claimed = jobs.claim(1000, 60_000, 2).await.unwrap();
                    if claimed.is_empty() {
                        return got;
                    }
                    for c in claimed {
                        got.push(c.job.id);
                        jobs.finish(c.lease, After::Done, Changes::default(), 1000).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (60, 60), "every job once");
}

/// The embedded store is one process's: after a restart, the jobs that
/// process had claimed run again at once instead of waiting out their lease.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_keeps_jobs_across_a_reopen_and_frees_the_old_process_leases() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), config()).unwrap();
    store.submit(add(vec![job("a", Some("k"), 10), job("b", None, 20)]), 0).await.unwrap();
    let claimed = store.claim(10, 3_600_000, 1).await.unwrap().remove(0);
    store.submit(Changes { jobs: vec![], records: vec![write("r", Expect::Any, Some("v"))] }, 0).await.unwrap();
    drop(store); // no close: as after a kill, the leases were never given back
    let store = SqliteStore::open(SqliteOptions::new(dir.path()), config()).unwrap();
    let again = store.claim(30, 1000, 10).await.unwrap();
    assert_eq!(again.iter().map(|c| c.job.kind.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(again[0].job.attempts, 2);
    assert!(again[0].lease.token > claimed.lease.token, "tokens keep growing across a reopen");
    assert_eq!(store.record("r".into()).await.unwrap().unwrap().value, b"v");
}

/// Job writes share the message writer's group commits: one that is refused
/// (a stale compare-and-set) undoes itself alone, never the publishes or the
/// other writes committed with it.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_refused_job_write_fails_alone_in_a_shared_commit() {
    use herald_core::{Channel, Data, NewMessage};
    use herald_store::Store;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(SqliteOptions::new(dir.path()), config()).unwrap());
    let set =
        |v: u64| Changes { jobs: vec![job("j", None, 0)], records: vec![write("r", Expect::Version(v), Some("x"))] };
    store.submit(set(0), 0).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let msg =
                NewMessage { channel: Channel::parse("c").unwrap(), event: None, data: Data::text("m"), meta: None };
            let appended = s.append(vec![msg]).await.map(|m| m[0].id);
            // Half the writes expect a version the record never had again.
            let written = s.submit(set(if i % 2 == 0 { 0 } else { 1 }), 0).await;
            (appended, written)
        }));
    }
    let mut ids = Vec::new();
    let (mut refused, mut applied) = (0, 0);
    for t in tasks {
        let (appended, written) = t.await.unwrap();
        ids.push(appended.expect("every publish commits"));
        match written {
            Err(JobError::Conflict(_)) => refused += 1,
            Ok(_) => applied += 1,
            Err(e) => panic!("{e}"),
        }
    }
    ids.sort();
    assert_eq!(ids, (1..=40).collect::<Vec<u64>>());
    assert_eq!((refused, applied), (39, 1), "version 1 is expected once: the first such write makes it 2");
    let s = store.summary().await.unwrap();
    assert_eq!(s.pending, 2, "the first write's job and the one applied; none of the refused");
}
