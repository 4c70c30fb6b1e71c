//! What a user is owed: the notifications still unread after their delay,
//! sent at most once per `min_interval` (what falls due meanwhile waits and
//! goes together, as one digest).
//!
//! One `fallback` job per user (its dedupe key is the user) runs this when
//! something may have fallen due. The decision itself ([`plan`]) is pure: the
//! user's fallback state, their notifications, their read marks and the time
//! in; the sends and the new state out. The job then writes the new state
//! (compare-and-set, so two nodes never both send), the deliveries and its own
//! next run in one store write: a crash before it repeats the decision, never
//! a send.
//!
//! The state (`fallback/{user}` record) is how far this went: the
//! notifications of `user/{user}` dealt with (sent, read in time, turned off,
//! too old, no longer retained), the group and everyone notifications a
//! fan-out found unread and not yet sent (`owed`), and the last send.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use herald_core::{
    Channel, Message,
    inbox::{self, NOTIFICATION_EVENT, ReadState},
};
use herald_store::{Changes, Expect, JobError, NewJob, RecordWrite};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Outbound, deliver::Delivery, keys};
use crate::config::{FallbackConfig, FallbackMethod, Via, parse_duration};

/// Most notifications of `user/{user}` one decision reads; more are taken by
/// the next run, at once.
const READ_LIMIT: usize = 1000;

/// What a notification asks of the fallback: its own `fallback` field when
/// it was sent with one, else the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Spec {
    Off,
    On { delay_ms: i64, channels: Vec<Via> },
}

impl Spec {
    /// From a stored notification.
    pub(crate) fn of(m: &Message, config: &FallbackConfig) -> Spec {
        if m.event.as_ref().is_none_or(|e| e.as_str() != NOTIFICATION_EVENT) {
            return Spec::Off;
        }
        let field = serde_json::from_slice::<Value>(m.data.bytes())
            .ok()
            .and_then(|mut v| v.get_mut("fallback").map(Value::take));
        let mut delay_ms = config.delay.as_millis() as i64;
        let mut channels = config.channels.clone();
        match field {
            Some(Value::Bool(false)) => return Spec::Off,
            Some(Value::Object(o)) => {
                if let Some(d) = o.get("delay").and_then(Value::as_str).and_then(|d| parse_duration(d).ok()) {
                    delay_ms = d.as_millis() as i64;
                }
                if let Some(list) = o.get("channels").and_then(Value::as_array) {
                    channels = list.iter().filter_map(|c| c.as_str().and_then(Via::parse)).collect();
                }
            }
            _ => {}
        }
        if channels.is_empty() { Spec::Off } else { Spec::On { delay_ms, channels } }
    }

    /// Parses the `fallback` field of `POST /api/notifications` into the
    /// form stored with the notification.
    pub(crate) fn request(v: &Value) -> Result<Value, String> {
        match v {
            Value::Bool(false) => Ok(Value::Bool(false)),
            Value::Bool(true) => Ok(json!({})),
            Value::Object(o) => {
                let mut out = serde_json::Map::new();
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("delay", Value::String(d)) => {
                            parse_duration(d)?;
                            out.insert(k.clone(), v.clone());
                        }
                        ("channels", Value::Array(list)) if !list.is_empty() => {
                            for c in list {
                                c.as_str()
                                    .and_then(Via::parse)
                                    .ok_or_else(|| format!("fallback channel {c} is not \"webhook\" or \"email\""))?;
                            }
                            out.insert(k.clone(), v.clone());
                        }
                        ("delay", _) => return Err("fallback delay must be a duration like \"5m\"".into()),
                        ("channels", _) => return Err("fallback channels must be a non-empty list".into()),
                        _ => return Err(format!("unknown fallback field '{k}' (delay, channels)")),
                    }
                }
                Ok(Value::Object(out))
            }
            _ => Err("fallback must be false, true or {\"delay\":..,\"channels\":[..]}".into()),
        }
    }
}

/// A user's fallback state, the `fallback/{user}` record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UserState {
    /// `user/{user}` notifications dealt with, as read marks are kept.
    #[serde(with = "read_state")]
    pub(crate) handled: ReadState,
    /// Group and everyone notifications found unread by their fan-out and
    /// not sent yet (notification ids, `{channel}:{id}`).
    #[serde(default)]
    pub(crate) owed: BTreeSet<String>,
    /// When the last digest went (ms; 0: never).
    #[serde(default)]
    pub(crate) last_sent: i64,
}

mod read_state {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(r: &ReadState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&r.encode())
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ReadState, D::Error> {
        let s = String::deserialize(d)?;
        ReadState::decode(&s).ok_or_else(|| serde::de::Error::custom("not a read state"))
    }
}

/// A notification a decision looks at: the message and what it asks.
#[derive(Debug, Clone)]
pub(crate) struct Note {
    pub(crate) msg: Arc<Message>,
    pub(crate) spec: Spec,
}

/// An owed group or everyone notification, as found again at decision time.
#[derive(Debug, Clone)]
pub(crate) struct Owed {
    pub(crate) id: String,
    /// `None` when it is gone from the history or no longer the user's
    /// (they left the group); `Some((note, read))` otherwise.
    pub(crate) found: Option<(Note, bool)>,
}

/// Everything a decision looks at.
pub(crate) struct Inputs<'a> {
    pub(crate) now: i64,
    /// Notifications older than this were sent before fallback was on.
    pub(crate) since: i64,
    pub(crate) min_interval_ms: i64,
    pub(crate) state: &'a UserState,
    /// `user/{user}` notifications after `state.handled.upto`, oldest first.
    pub(crate) personal: &'a [Note],
    /// The oldest id `user/{user}` still retains.
    pub(crate) first_retained: u64,
    /// The user's read marks on `user/{user}`.
    pub(crate) read: Option<&'a ReadState>,
    pub(crate) owed: &'a [Owed],
}

/// A decision.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// To send now, as one digest per distinct channel list.
    pub(crate) send: Vec<Note>,
    pub(crate) state: UserState,
    /// When to decide again (something is not due yet, or waits out the
    /// interval).
    pub(crate) next: Option<i64>,
}

impl Plan {
    /// When a fallback job should run for this user: now if this decision
    /// would change anything, else when it next could.
    pub(crate) fn wake_at(&self, before: &UserState, now: i64) -> Option<i64> {
        if !self.send.is_empty() || self.state != *before { Some(now) } else { self.next }
    }
}

pub(crate) fn plan(i: Inputs<'_>) -> Plan {
    let mut state = i.state.clone();
    // What the history no longer holds cannot be sent.
    if i.first_retained > 1 {
        state.handled.mark_all(i.first_retained - 1);
    }
    let mut due: Vec<Note> = Vec::new();
    let mut later: Option<i64> = None;
    let mut wait = |at: i64| later = Some(later.map_or(at, |l: i64| l.min(at)));
    for n in i.personal {
        let id = n.msg.id;
        if state.handled.is_read(id) {
            continue;
        }
        let read = i.read.is_some_and(|r| r.is_read(id));
        match &n.spec {
            Spec::On { delay_ms, .. } if !read && n.msg.time >= i.since => {
                let at = n.msg.time + delay_ms;
                if at <= i.now { due.push(n.clone()) } else { wait(at) }
            }
            _ => state.handled.mark([id]),
        }
    }
    let mut due_owed = Vec::new();
    for o in i.owed {
        match &o.found {
            Some((n @ Note { spec: Spec::On { delay_ms, .. }, .. }, false)) => {
                let at = n.msg.time + delay_ms;
                if at <= i.now { due_owed.push((o.id.clone(), n.clone())) } else { wait(at) }
            }
            _ => {
                state.owed.remove(&o.id);
            }
        }
    }
    let allowed = if state.last_sent == 0 { i64::MIN } else { state.last_sent.saturating_add(i.min_interval_ms) };
    if due.is_empty() && due_owed.is_empty() {
        return Plan { send: Vec::new(), state, next: later.map(|l| l.max(allowed)) };
    }
    if i.now < allowed {
        // Due, but the user had a digest too recently: all of it waits.
        return Plan { send: Vec::new(), state, next: Some(allowed) };
    }
    state.handled.mark(due.iter().map(|n| n.msg.id));
    for (id, _) in &due_owed {
        state.owed.remove(id);
    }
    state.last_sent = i.now;
    let mut send = due;
    send.extend(due_owed.into_iter().map(|(_, n)| n));
    Plan { send, state, next: later.map(|l| l.max(i.now.saturating_add(i.min_interval_ms))) }
}

/// What a decision found about a user: the inputs it read and its version
/// of the state record.
pub(crate) struct Assessment {
    pub(crate) plan: Plan,
    pub(crate) before: UserState,
    pub(crate) version: u64,
}

/// Reads what a decision for `user` needs and plans.
pub(crate) async fn assess(ob: &Outbound, user: &str, now: i64) -> Result<Assessment, JobError> {
    let channel = inbox::user_channel(user).ok_or_else(|| bad_user(user))?;
    let record = ob.jobs.record(keys::fallback(user)).await?;
    let (before, version) = match record {
        Some(r) => (serde_json::from_slice(&r.value).unwrap_or_default(), r.version),
        None => (UserState::default(), 0),
    };
    let page = ob.store.read(channel.clone(), before.handled.upto, READ_LIMIT).await?;
    let more = page.messages.len() == READ_LIMIT;
    let personal: Vec<Note> =
        page.messages.into_iter().map(|m| Note { spec: Spec::of(&m, &ob.config.fallback), msg: m }).collect();
    let reads = ob.inbox_store.read_state(user.to_owned()).await?;
    let owed = find_owed(ob, user, &before, &reads).await?;
    let mut plan = plan(Inputs {
        now,
        since: ob.fallback_since,
        min_interval_ms: ob.config.fallback.min_interval.as_millis() as i64,
        state: &before,
        personal: &personal,
        first_retained: page.window.first,
        read: reads.get(&channel),
        owed: &owed,
    });
    if more {
        plan.next = Some(now);
    }
    Ok(Assessment { plan, before, version })
}

/// The owed group notifications, found again: still retained, still the
/// user's (joined before it), and whether read by now.
async fn find_owed(
    ob: &Outbound,
    user: &str,
    state: &UserState,
    reads: &HashMap<Channel, ReadState>,
) -> Result<Vec<Owed>, JobError> {
    if state.owed.is_empty() {
        return Ok(Vec::new());
    }
    let groups = ob.inbox_store.groups_of(user.to_owned()).await?;
    let sources = inbox::sources(user, &groups);
    let mut out = Vec::with_capacity(state.owed.len());
    for id in &state.owed {
        let mut found = None;
        if let Some((channel, n)) = inbox::parse_notification_id(id)
            && sources.iter().any(|s| s.channel == channel && n > s.floor)
            && let Some(m) = ob.store.read(channel.clone(), n - 1, 1).await?.messages.into_iter().next()
            && m.id == n
        {
            let read = reads.get(&channel).is_some_and(|r| r.is_read(n));
            found = Some((Note { spec: Spec::of(&m, &ob.config.fallback), msg: m }, read));
        }
        out.push(Owed { id: id.clone(), found });
    }
    Ok(out)
}

fn bad_user(user: &str) -> JobError {
    JobError::Store(herald_store::StoreError::Backend(format!("'{user}' is not a user id")))
}

/// A `fallback` job: decides for `user` and returns what to write with its
/// completion: the new state, the deliveries, the next run.
pub(crate) async fn decide(ob: &Outbound, user: &str, now: i64) -> Result<Changes, JobError> {
    let Assessment { plan, before, version } = assess(ob, user, now).await?;
    let mut changes = Changes::default();
    if plan.state != before {
        let value = serde_json::to_vec(&plan.state).expect("serialisable");
        changes.records.push(RecordWrite {
            key: keys::fallback(user),
            expect: Expect::Version(version),
            value: Some(value),
        });
    }
    if !plan.send.is_empty() {
        let unread = ob.inbox.count(user).await?;
        for d in deliveries(&ob.config.fallback, user, unread, &plan.send, now) {
            changes.jobs.push(d.job(now));
        }
    }
    if let Some(at) = plan.next {
        changes.jobs.push(job(user, at));
    }
    Ok(changes)
}

/// The `fallback` job of `user`, due `at`.
pub(crate) fn job(user: &str, at: i64) -> NewJob {
    NewJob {
        kind: keys::FALLBACK.into(),
        key: Some(keys::fallback(user)),
        due: at,
        payload: serde_json::to_vec(&json!({ "user": user })).expect("serialisable"),
    }
}

/// The deliveries of one digest: one per distinct channel list among the
/// notifications (usually one), by `method`: the first channel with the rest
/// to follow if it fails (`first`), or every channel at once (`all`).
pub(crate) fn deliveries(config: &FallbackConfig, user: &str, unread: u64, send: &[Note], now: i64) -> Vec<Delivery> {
    let mut by_channels: Vec<(Vec<Via>, Vec<&Note>)> = Vec::new();
    for n in send {
        let Spec::On { channels, .. } = &n.spec else { continue };
        match by_channels.iter_mut().find(|(c, _)| c == channels) {
            Some((_, notes)) => notes.push(n),
            None => by_channels.push((channels.clone(), vec![n])),
        }
    }
    let mut out = Vec::new();
    for (channels, notes) in by_channels {
        let digest = super::deliver::Digest::of(user, unread, &notes, now);
        match config.method {
            FallbackMethod::First => out.push(Delivery::new(channels[0], channels[1..].to_vec(), digest)),
            FallbackMethod::All => out.extend(channels.iter().map(|v| Delivery::new(*v, Vec::new(), digest.clone()))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Data, EventName};

    const MIN: i64 = 60_000;

    fn note(id: u64, time: i64, delay_ms: i64) -> Note {
        let m = Message::new(
            inbox::user_channel("u").unwrap(),
            id,
            Some(EventName::from_trusted(NOTIFICATION_EVENT)),
            Data::text(format!("n{id}")),
            time,
        );
        Note { msg: Arc::new(m), spec: Spec::On { delay_ms, channels: vec![Via::Email] } }
    }

    fn run(state: &UserState, personal: &[Note], read: Option<&ReadState>, now: i64) -> Plan {
        plan(Inputs { now, since: 0, min_interval_ms: 60 * MIN, state, personal, first_retained: 1, read, owed: &[] })
    }

    fn ids(p: &Plan) -> Vec<u64> {
        p.send.iter().map(|n| n.msg.id).collect()
    }

    #[test]
    fn nothing_before_the_delay_then_the_first_at_it() {
        let notes = [note(1, 0, 10 * MIN)];
        let p = run(&UserState::default(), &notes, None, 5 * MIN);
        assert!(p.send.is_empty());
        assert_eq!(p.next, Some(10 * MIN));
        assert_eq!(p.state, UserState::default());
        let p = run(&UserState::default(), &notes, None, 10 * MIN);
        assert_eq!(ids(&p), [1]);
        assert_eq!((p.state.handled.upto, p.state.last_sent, p.next), (1, 10 * MIN, None));
    }

    #[test]
    fn read_in_time_sends_nothing_and_is_dealt_with() {
        let notes = [note(1, 0, 10 * MIN), note(2, MIN, 10 * MIN)];
        let mut read = ReadState::default();
        read.mark([1]);
        let p = run(&UserState::default(), &notes, Some(&read), 10 * MIN);
        assert!(p.send.is_empty(), "1 was read, 2 is not due");
        assert_eq!((p.state.handled.upto, p.next), (1, Some(11 * MIN)));
        assert_eq!(p.wake_at(&UserState::default(), 10 * MIN), Some(10 * MIN), "a changed state is written now");
    }

    #[test]
    fn what_falls_due_within_the_interval_waits_and_goes_as_one_digest() {
        let notes: Vec<Note> = (1..=6).map(|i| note(i, (i as i64 - 1) * MIN, 10 * MIN)).collect();
        // The first goes at its delay, alone.
        let p = run(&UserState::default(), &notes, None, 10 * MIN);
        assert_eq!(ids(&p), [1]);
        assert_eq!(p.next, Some(70 * MIN), "the rest wait for the interval");
        // Run early (a sweep, a new notification): nothing, same wait.
        let early = run(&p.state, &notes[1..], None, 20 * MIN);
        assert!(early.send.is_empty());
        assert_eq!(early.next, Some(70 * MIN));
        // At the end of the interval: the other five in one digest.
        let q = run(&p.state, &notes[1..], None, 70 * MIN);
        assert_eq!(ids(&q), [2, 3, 4, 5, 6]);
        assert_eq!((q.state.handled.upto, q.state.last_sent, q.next), (6, 70 * MIN, None));
    }

    #[test]
    fn turned_off_too_old_and_trimmed_are_dealt_with_unsent() {
        let mut off = note(6, 0, MIN);
        off.spec = Spec::Off;
        let notes = [note(5, 0, MIN), off, note(7, 10 * MIN, MIN)];
        let p = plan(Inputs {
            now: 20 * MIN,
            since: 5 * MIN,
            min_interval_ms: 0,
            state: &UserState::default(),
            personal: &notes,
            first_retained: 5,
            read: None,
            owed: &[],
        });
        assert_eq!(ids(&p), [7], "5 predates fallback, 6 is off, 1-4 are no longer retained");
        assert_eq!(p.state.handled.upto, 7);
    }

    #[test]
    fn a_shorter_delay_after_a_longer_one_goes_first() {
        let notes = [note(1, 0, 60 * MIN), note(2, MIN, 5 * MIN)];
        let p = run(&UserState::default(), &notes, None, 6 * MIN);
        assert_eq!(ids(&p), [2]);
        assert_eq!(p.state.handled, ReadState { upto: 0, ids: [2].into() });
        assert_eq!(p.next, Some(66 * MIN), "1 at its delay, but not within the interval");
    }

    #[test]
    fn owed_group_notifications_join_the_digest_unless_read_or_gone() {
        let mut g = note(3, 0, MIN);
        g.msg = Arc::new(Message::new(
            inbox::group_channel("g").unwrap(),
            3,
            Some(EventName::from_trusted(NOTIFICATION_EVENT)),
            Data::text("g"),
            0,
        ));
        let state =
            UserState { owed: ["$group/g:3", "$group/g:4", "$all:9"].map(String::from).into(), ..Default::default() };
        let owed = [
            Owed { id: "$group/g:3".into(), found: Some((g.clone(), false)) },
            Owed { id: "$group/g:4".into(), found: Some((g, true)) },
            Owed { id: "$all:9".into(), found: None },
        ];
        let p = plan(Inputs {
            now: 2 * MIN,
            since: 0,
            min_interval_ms: MIN,
            state: &state,
            personal: &[note(1, 0, MIN)],
            first_retained: 1,
            read: None,
            owed: &owed,
        });
        assert_eq!(p.send.iter().map(|n| n.msg.channel.to_string()).collect::<Vec<_>>(), ["user/u", "$group/g"]);
        assert!(p.state.owed.is_empty(), "sent, read, or gone: none owed any more");
    }

    #[test]
    fn the_fallback_field_of_a_request() {
        assert_eq!(Spec::request(&json!(false)), Ok(json!(false)));
        assert_eq!(Spec::request(&json!({"delay": "5m", "channels": ["email"]})).unwrap()["delay"], "5m");
        assert!(Spec::request(&json!({"delay": "soon"})).is_err());
        assert!(Spec::request(&json!({"channels": ["sms"]})).is_err());
        assert!(Spec::request(&json!({"channels": []})).is_err());
        assert!(Spec::request(&json!({"dleay": "5m"})).is_err());
        assert!(Spec::request(&json!("5m")).is_err());
        let config = FallbackConfig::default();
        let stored = |f: Value| {
            let data = Data::json(json!({"title": "t", "fallback": f}).to_string().into()).unwrap();
            let ev = Some(EventName::from_trusted(NOTIFICATION_EVENT));
            Spec::of(&Message::new(inbox::all_channel(), 1, ev, data, 0), &config)
        };
        assert_eq!(stored(json!(false)), Spec::Off);
        assert_eq!(stored(json!({"delay": "5m"})), Spec::On { delay_ms: 300_000, channels: config.channels.clone() });
        assert_eq!(stored(json!({"channels": ["email"]})), Spec::On { delay_ms: 600_000, channels: vec![Via::Email] });
    }
}
