//! Group and everyone notifications (`[fallback] groups = true`): one
//! message in `$group/{g}` or `$all`, read through by every member's inbox.
//! When it falls due, a `fanout` job goes through the audience a page at a
//! time and, for each member who has not read it, adds it to the member's
//! owed notifications and wakes their `fallback` job, which sends it (in a
//! digest with whatever else they are owed) unless they read it by then.
//!
//! A fan-out's progress (the last member done) is written with each page,
//! so a crash or a lease that ends resumes after the last page written and
//! never adds a page twice. The audience of `$all` is every user Herald knows:
//! those with a personal inbox channel or a contact.

use herald_core::{
    Channel, Filter,
    inbox::{self, ReadState},
};
use herald_store::{After, Changes, Claimed, Expect, JobError, NewJob, RecordWrite, now_ms};
use serde::{Deserialize, Serialize};

use super::{
    Outbound,
    fallback::{self, Spec, UserState},
    keys,
};

/// Members handled per store write.
const PAGE: usize = 200;
/// Pages per run; a larger audience goes on in the next run, at once.
const PAGES_PER_RUN: usize = 10;

/// A `fanout` job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Fanout {
    pub(crate) channel: String,
    pub(crate) id: u64,
}

impl Fanout {
    pub(crate) fn job(channel: &Channel, id: u64, due: i64) -> NewJob {
        let notification = inbox::notification_id(channel, id);
        NewJob {
            kind: keys::FANOUT.into(),
            key: Some(keys::fanout_run(&notification)),
            due,
            payload: serde_json::to_vec(&Fanout { channel: channel.to_string(), id }).expect("serialisable"),
        }
    }
}

/// A channel's finished fan-outs, the `fanout/{channel}` record.
pub(crate) async fn done(ob: &Outbound, channel: &Channel) -> Result<(ReadState, u64), JobError> {
    Ok(match ob.jobs.record(keys::fanout(channel.as_str())).await? {
        Some(r) => (std::str::from_utf8(&r.value).ok().and_then(ReadState::decode).unwrap_or_default(), r.version),
        None => (ReadState::default(), 0),
    })
}

pub(crate) async fn run(ob: &Outbound, c: &Claimed, task: Fanout) -> Result<(), JobError> {
    let Ok(channel) = Channel::parse(&task.channel) else {
        let error = format!("'{}' is not a channel", task.channel);
        return ob.jobs.finish(c.lease, After::Dead { error }, Changes::default(), now_ms()).await;
    };
    let id = task.id;
    let notification = inbox::notification_id(&channel, id);
    let (finished, finished_version) = done(ob, &channel).await?;
    if finished.is_read(id) {
        return ob.jobs.finish(c.lease, After::Done, Changes::default(), now_ms()).await;
    }
    let msg = ob.store.read(channel.clone(), id - 1, 1).await?.messages.into_iter().find(|m| m.id == id);
    let owed = msg
        .is_some_and(|m| m.time >= ob.fallback_since && matches!(Spec::of(&m, &ob.config.fallback), Spec::On { .. }));
    let progress_key = keys::fanout_run(&notification);
    for _ in 0..PAGES_PER_RUN {
        let (after, progress_version) = match ob.jobs.record(progress_key.clone()).await? {
            Some(r) => (String::from_utf8(r.value).unwrap_or_default(), r.version),
            None => (String::new(), 0),
        };
        let members = if owed { audience(ob, &channel, &after).await? } else { Vec::new() };
        let Some(last) = members.last().cloned() else {
            // Everyone done (or nobody owed it): remember it, in one write
            // with the job's end.
            let mut finished = finished.clone();
            finished.mark([id]);
            let changes = Changes {
                jobs: vec![],
                records: vec![
                    RecordWrite {
                        key: keys::fanout(channel.as_str()),
                        expect: Expect::Version(finished_version),
                        value: Some(finished.encode().into_bytes()),
                    },
                    RecordWrite { key: progress_key, expect: Expect::Version(progress_version), value: None },
                ],
            };
            return ob.jobs.finish(c.lease, After::Done, changes, now_ms()).await;
        };
        let now = now_ms();
        let mut changes = Changes::default();
        for member in members {
            let reads = ob.inbox_store.read_state(member.clone()).await?;
            if reads.get(&channel).is_some_and(|r| r.is_read(id)) {
                continue;
            }
            let (mut state, version) = match ob.jobs.record(keys::fallback(&member)).await? {
                Some(r) => (serde_json::from_slice::<UserState>(&r.value).unwrap_or_default(), r.version),
                None => (UserState::default(), 0),
            };
            if !state.owed.insert(notification.clone()) {
                continue;
            }
            changes.records.push(RecordWrite {
                key: keys::fallback(&member),
                expect: Expect::Version(version),
                value: Some(serde_json::to_vec(&state).expect("serialisable")),
            });
            changes.jobs.push(fallback::job(&member, now));
        }
        changes.records.push(RecordWrite {
            key: progress_key.clone(),
            expect: Expect::Version(progress_version),
            value: Some(last.into_bytes()),
        });
        match ob.jobs.submit(changes, now).await {
            // A member's fallback ran meanwhile: this page again, read afresh.
            Err(JobError::Conflict(_)) => continue,
            Err(e) => return Err(e),
            Ok(_) => ob.wake.notify_one(),
        }
    }
    // A large audience: on with the next pages at once, as a new claim.
    ob.jobs.finish(c.lease, After::Release { due: now_ms() }, Changes::default(), now_ms()).await
}

/// The next page of the notification's audience, after `after` in name order.
async fn audience(ob: &Outbound, channel: &Channel, after: &str) -> Result<Vec<String>, JobError> {
    if let Some(group) = channel.as_str().strip_prefix("$group/") {
        return Ok(ob.inbox_store.members(group.to_owned(), after.to_owned(), PAGE).await?);
    }
    known_users(ob, after, PAGE).await
}

/// Users Herald knows, in name order after `after`: those with a personal
/// inbox channel or a contact.
pub(crate) async fn known_users(ob: &Outbound, after: &str, limit: usize) -> Result<Vec<String>, JobError> {
    let mut users: Vec<String> = ob
        .jobs
        .records("contact/".into(), keys::contact(after), limit)
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix("contact/").map(String::from))
        .collect();
    let inboxes = ob.store.channels(Filter::parse("user/+").expect("valid")).await?;
    users.extend(inboxes.iter().filter_map(|(c, _)| c.inbox_owner()).filter(|u| *u > after).map(String::from));
    users.sort();
    users.dedup();
    users.truncate(limit);
    Ok(users)
}

/// For the sweep: group and everyone notifications whose fan-out is neither
/// done nor queued get a job (the dedupe key makes a queued one no more).
pub(crate) async fn reconcile(ob: &Outbound) -> Result<usize, JobError> {
    let mut channels = ob.store.channels(Filter::parse("$group/+").expect("valid")).await?;
    let all = inbox::all_channel();
    let head = ob.store.read(all.clone(), 0, 0).await?.window.head;
    channels.push((all, head));
    let mut jobs = Vec::new();
    for (channel, head) in channels {
        let (finished, _) = done(ob, &channel).await?;
        if head <= finished.upto {
            continue;
        }
        let mut after = finished.upto;
        loop {
            let page = ob.store.read(channel.clone(), after, 512).await?;
            let full = page.messages.len() == 512;
            for m in page.messages {
                after = m.id;
                if finished.is_read(m.id) || m.time < ob.fallback_since {
                    continue;
                }
                if let Spec::On { delay_ms, .. } = Spec::of(&m, &ob.config.fallback) {
                    jobs.push(Fanout::job(&channel, m.id, m.time + delay_ms));
                }
            }
            if !full {
                break;
            }
        }
    }
    let n = jobs.len();
    if n > 0 {
        ob.jobs.submit(Changes { jobs, records: vec![] }, now_ms()).await?;
        ob.wake.notify_one();
    }
    Ok(n)
}
