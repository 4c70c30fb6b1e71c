//! Channel names and filters: the input's lines are a filter, a channel and
//! a second filter (each line is also tried as the other kinds).
//!
//! Checks each parser against the grammar its module states (a channel is
//! `/`-separated segments of `[A-Za-z0-9_.~:@-]+`, never `.` or `..`, at
//! most 255 bytes, `$` only in front; a filter also has `+` segments and a
//! last `#`); that what parses displays as the same string and is a valid
//! MQTT topic or filter; that a channel is the exact filter of itself; that
//! matching agrees with the broker's raw MQTT matcher, a filter that starts
//! with a wildcard never matches a `$` channel, every match starts with the
//! literal prefix, and coverage is sound (what a filter matches, a filter
//! covering it matches too).
#![no_main]

use herald_core::{Channel, Filter, channel::MAX_CHANNEL_LEN};
use herald_server::fuzz::mqtt::topic_matches;
use libfuzzer_sys::fuzz_target;
use mqtt_proto::{TopicFilter, TopicName};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let (a, b, c) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    for s in [a, b, c] {
        check_channel(s);
        check_filter(s);
    }
    let (Ok(f), Ok(ch)) = (Filter::parse(a), Channel::parse(b)) else { return };
    let m = f.matches(&ch);
    assert_eq!(m, topic_matches(a, b), "{a} on {b}: as the MQTT matcher");
    if m {
        assert!(b.starts_with(&f.literal_prefix()), "{b} matched by {a} but not under '{}'", f.literal_prefix());
        if b.starts_with('$') {
            assert!(!a.starts_with('+') && !a.starts_with('#'), "{a} matched the server's {b}");
        }
    }
    if let Ok(p) = Filter::parse(c)
        && f.is_covered_by(&p)
        && m
    {
        assert!(p.matches(&ch), "{a} is covered by {c} but {b} escapes it");
    }
});

fn segment_ok(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.~:@-".contains(&b))
}

fn check_channel(s: &str) {
    let grammar =
        !s.is_empty() && s.len() <= MAX_CHANNEL_LEN && s.strip_prefix('$').unwrap_or(s).split('/').all(segment_ok);
    let Ok(ch) = Channel::parse(s) else {
        assert!(!grammar, "refused a channel the grammar allows: {s:?}");
        return;
    };
    assert!(grammar, "accepted a channel the grammar refuses: {s:?}");
    assert_eq!(ch.to_string(), s);
    assert_eq!(ch.segments().collect::<Vec<_>>(), s.split('/').collect::<Vec<_>>());
    assert!(!ch.segments().any(|seg| seg == "." || seg == ".."));
    assert_eq!(ch.is_reserved(), s.starts_with('$'));
    let owner = s.strip_prefix("user/").filter(|u| !u.contains('/'));
    assert_eq!(ch.inbox_owner(), owner);
    assert!(TopicName::try_from(s).is_ok(), "a channel is an MQTT topic: {s:?}");
    let exact = Filter::exact(&ch);
    assert_eq!(Filter::parse(s).as_ref(), Ok(&exact), "a channel is a filter of itself");
    assert!(!exact.is_wildcard() && exact.matches(&ch));
    assert_eq!(exact.as_channel(), Some(ch));
}

fn check_filter(s: &str) {
    let segs: Vec<&str> = s.split('/').collect();
    let grammar = !s.is_empty()
        && s.len() <= MAX_CHANNEL_LEN
        && segs.iter().enumerate().all(|(i, seg)| match *seg {
            "#" => i + 1 == segs.len(),
            "+" => true,
            lit if i == 0 => segment_ok(lit.strip_prefix('$').unwrap_or(lit)),
            lit => segment_ok(lit),
        });
    let Ok(f) = Filter::parse(s) else {
        assert!(!grammar, "refused a filter the grammar allows: {s:?}");
        return;
    };
    assert!(grammar, "accepted a filter the grammar refuses: {s:?}");
    assert_eq!(f.to_string(), s);
    // MQTT 5 (section 4.8.2) reserves `$share/` for shared subscriptions;
    // as a Herald filter it names the server-owned channels under `$share`.
    if !s.starts_with("$share/") {
        assert!(TopicFilter::try_from(s).is_ok(), "a filter is an MQTT filter: {s:?}");
    }
    assert_eq!(f.is_wildcard(), segs.iter().any(|seg| *seg == "+" || *seg == "#"));
    assert_eq!(f.as_channel().is_some(), !f.is_wildcard());
    assert!(f.is_covered_by(&f));
    assert!(s.starts_with(&f.literal_prefix()));
}
