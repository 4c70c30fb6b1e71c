//! Channel filters in MQTT syntax: `+` matches one segment, a trailing `#` matches
//! any number of segments (including none). They select channels for multi-channel
//! subscriptions, retention rules and (later) permissions.
//!
//! As in MQTT, a filter that starts with a wildcard never matches a `$` channel,
//! so `#` does not leak server-owned channels.

use crate::channel::{Channel, ChannelError, MAX_CHANNEL_LEN, validate_segment};
use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    text: Box<str>,
    parts: Box<[Part]>,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Part {
    Literal(Box<str>),
    One,
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filter is empty")]
    Empty,
    #[error("filter is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("'#' must be the whole last segment of a filter")]
    MisplacedHash,
    #[error("'+' must be a whole segment of a filter")]
    MisplacedPlus,
    #[error(transparent)]
    Segment(#[from] ChannelError),
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        if text.is_empty() {
            return Err(FilterError::Empty);
        }
        if text.len() > MAX_CHANNEL_LEN {
            return Err(FilterError::TooLong);
        }
        let segs: Vec<&str> = text.split('/').collect();
        let mut parts = Vec::with_capacity(segs.len());
        for (i, seg) in segs.iter().enumerate() {
            let part = match *seg {
                "#" if i + 1 == segs.len() => Part::Rest,
                "#" => return Err(FilterError::MisplacedHash),
                "+" => Part::One,
                s if s.contains('#') => return Err(FilterError::MisplacedHash),
                s if s.contains('+') => return Err(FilterError::MisplacedPlus),
                s => {
                    let body = if i == 0 { s.strip_prefix('$').unwrap_or(s) } else { s };
                    validate_segment(body)?;
                    Part::Literal(s.into())
                }
            };
            parts.push(part);
        }
        Ok(Filter { text: text.into(), parts: parts.into() })
    }

    /// A filter equal to one channel name.
    pub fn exact(channel: &Channel) -> Self {
        let parts = channel.segments().map(|s| Part::Literal(s.into())).collect();
        Filter { text: channel.as_str().into(), parts }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The channel this filter names when it has no wildcard.
    pub fn as_channel(&self) -> Option<Channel> {
        if self.is_wildcard() { None } else { Channel::parse(&self.text).ok() }
    }

    pub fn is_wildcard(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Literal(_)))
    }

    /// The literal text before the first wildcard: every matching channel starts
    /// with it, which lets a store narrow a scan by prefix.
    pub fn literal_prefix(&self) -> String {
        let mut out = String::new();
        for part in self.parts.iter() {
            match part {
                Part::Literal(s) => {
                    out.push_str(s);
                    out.push('/');
                }
                _ => break,
            }
        }
        // No trailing '/': `chat/#` also matches `chat` itself.
        out.pop();
        out
    }

    /// True when every channel this filter matches is matched by `other` too:
    /// the test for "may this grant subscribe to that filter".
    pub fn is_covered_by(&self, other: &Filter) -> bool {
        // A leading wildcard never matches `$` channels (see `matches_str`).
        let dollar = matches!(self.parts.first(), Some(Part::Literal(s)) if s.starts_with('$'));
        if dollar && !matches!(other.parts.first(), Some(Part::Literal(_))) {
            return false;
        }
        covers(&other.parts, &self.parts)
    }

    pub fn matches(&self, channel: &Channel) -> bool {
        self.matches_str(channel.as_str())
    }

    pub fn matches_str(&self, channel: &str) -> bool {
        if channel.starts_with('$') && !matches!(self.parts.first(), Some(Part::Literal(_))) {
            return false;
        }
        let mut segs = channel.split('/');
        for part in self.parts.iter() {
            match part {
                Part::Rest => return true,
                Part::One => {
                    if segs.next().is_none() {
                        return false;
                    }
                }
                Part::Literal(lit) => {
                    if segs.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        segs.next().is_none()
    }
}

/// Whether pattern `p` matches every channel that `f` matches.
fn covers(p: &[Part], f: &[Part]) -> bool {
    match (p.first(), f.first()) {
        (Some(Part::Rest), _) => true,
        (None, None) => true,
        (Some(Part::One), Some(Part::One | Part::Literal(_))) => covers(&p[1..], &f[1..]),
        (Some(Part::Literal(a)), Some(Part::Literal(b))) if a == b => covers(&p[1..], &f[1..]),
        _ => false,
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", &*self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(filter: &str, channel: &str) -> bool {
        Filter::parse(filter).unwrap().matches(&Channel::parse(channel).unwrap())
    }

    #[test]
    fn mqtt_matching_rules() {
        assert!(m("chat/room/+", "chat/room/Default"));
        assert!(!m("chat/room/+", "chat/room"));
        assert!(!m("chat/room/+", "chat/room/a/b"));
        assert!(m("chat/#", "chat"), "# also matches the parent level");
        assert!(m("chat/#", "chat/room/a/b"));
        assert!(m("#", "news"));
        assert!(m("+/+", "a/b"));
        assert!(!m("+", "a/b"));
        assert!(m("news", "news"));
        assert!(!m("news", "newsy"));
        assert!(!m("#", "$SYS/x"), "$ channels are not matched by a leading wildcard");
        assert!(!m("+/x", "$SYS/x"));
        assert!(m("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in ["", "a/#/b", "a#", "a+/b", "a//b", "a/../b", "a b"] {
            assert!(Filter::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn coverage() {
        let c = |f: &str, p: &str| Filter::parse(f).unwrap().is_covered_by(&Filter::parse(p).unwrap());
        assert!(c("chat/room/a", "chat/#"));
        assert!(c("chat/+/a", "chat/#"));
        assert!(c("chat/#", "chat/#"));
        assert!(c("chat", "chat/#"));
        assert!(c("chat/room/+", "chat/+/+"));
        assert!(!c("chat/#", "chat/+"));
        assert!(!c("chat/+", "chat/room"));
        assert!(!c("#", "chat/#"));
        assert!(!c("$SYS/x", "#"));
        assert!(c("$SYS/x", "$SYS/#"));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        assert_eq!(Filter::parse("chat/room/+").unwrap().literal_prefix(), "chat/room");
        assert_eq!(Filter::parse("#").unwrap().literal_prefix(), "");
        assert_eq!(Filter::parse("a/b").unwrap().literal_prefix(), "a/b");
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-c]{1,2}"
    }

    proptest! {
        /// A filter made from a channel by replacing segments with `+`, or cutting
        /// the tail with `#`, always matches that channel; an exact filter matches
        /// exactly itself.
        #[test]
        fn wildcards_match_the_channel_they_were_made_from(
            segs in prop::collection::vec(segment(), 1..6),
            plus in prop::collection::vec(any::<bool>(), 6),
            cut in 0usize..6,
            other in prop::collection::vec(segment(), 1..6),
        ) {
            let ch = Channel::parse(&segs.join("/")).unwrap();
            let mut parts: Vec<String> = segs.iter().zip(&plus).map(|(s, p)| if *p { "+".into() } else { s.clone() }).collect();
            prop_assert!(Filter::parse(&parts.join("/")).unwrap().matches(&ch));
            let cut = cut.min(parts.len());
            parts.truncate(cut);
            parts.push("#".into());
            prop_assert!(Filter::parse(&parts.join("/")).unwrap().matches(&ch));
            let other = Channel::parse(&other.join("/")).unwrap();
            prop_assert_eq!(Filter::exact(&ch).matches(&other), ch == other);
        }

        /// Coverage is sound: whatever `f` matches, a pattern covering it matches too.
        #[test]
        fn coverage_implies_matching(
            f in prop::collection::vec(prop_oneof!["[ab]", Just("+".to_string())], 1..4),
            f_rest in any::<bool>(),
            p in prop::collection::vec(prop_oneof!["[ab]", Just("+".to_string())], 0..4),
            p_rest in any::<bool>(),
            channel in prop::collection::vec("[ab]", 1..6),
        ) {
            let mut f = f;
            if f_rest { f.push("#".into()); }
            let mut p = p;
            if p_rest || p.is_empty() { p.push("#".into()); }
            let f = Filter::parse(&f.join("/")).unwrap();
            let p = Filter::parse(&p.join("/")).unwrap();
            let ch = Channel::parse(&channel.join("/")).unwrap();
            if f.is_covered_by(&p) && f.matches(&ch) {
                prop_assert!(p.matches(&ch), "{f} covered by {p} but {ch} escapes");
            }
            prop_assert!(f.is_covered_by(&f));
        }

        #[test]
        fn every_match_starts_with_the_literal_prefix(
            filter in prop::collection::vec(prop_oneof!["[a-c]", Just("+".to_string())], 1..5),
            channel in prop::collection::vec(segment(), 1..6),
        ) {
            let f = Filter::parse(&filter.join("/")).unwrap();
            let ch = Channel::parse(&channel.join("/")).unwrap();
            if f.matches(&ch) {
                prop_assert!(ch.as_str().starts_with(&f.literal_prefix()));
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = Filter::parse(&s);
        }
    }
}
