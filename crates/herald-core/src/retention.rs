//! History retention: how many messages and for how long each channel keeps,
//! chosen per channel by the first matching pattern rule.

use crate::{channel::Channel, filter::Filter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many messages (the latest ones). 0 keeps none: the
    /// channel is live-only, though ids still advance and are never reused.
    pub size: u64,
    /// Drop messages older than this many milliseconds; `None` keeps them forever.
    pub ttl_ms: Option<u64>,
}

impl Default for Retention {
    /// DESIGN.md's defaults: 1000 messages, 24 hours.
    fn default() -> Self {
        Retention { size: 1000, ttl_ms: Some(24 * 3600 * 1000) }
    }
}

impl Retention {
    /// The oldest time (ms) a message may have and still be retained at `now`.
    pub fn cutoff(&self, now_ms: i64) -> i64 {
        match self.ttl_ms {
            Some(ttl) => now_ms.saturating_sub(ttl as i64),
            None => i64::MIN,
        }
    }
}

/// The default retention plus rules tried in order.
#[derive(Debug, Clone, Default)]
pub struct RetentionRules {
    pub default: Retention,
    pub rules: Vec<(Filter, Retention)>,
}

impl RetentionRules {
    pub fn for_channel(&self, channel: &Channel) -> Retention {
        self.rules.iter().find(|(f, _)| f.matches(channel)).map_or(self.default, |(_, r)| *r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_wins() {
        let chat = Retention { size: 100, ttl_ms: None };
        let rules = RetentionRules {
            default: Retention::default(),
            rules: vec![
                (Filter::parse("chat/room/+").unwrap(), chat),
                (Filter::parse("chat/#").unwrap(), Retention { size: 1, ttl_ms: None }),
            ],
        };
        assert_eq!(rules.for_channel(&Channel::parse("chat/room/Default").unwrap()), chat);
        assert_eq!(rules.for_channel(&Channel::parse("chat/x/y").unwrap()).size, 1);
        assert_eq!(rules.for_channel(&Channel::parse("news").unwrap()), Retention::default());
        assert_eq!(chat.cutoff(5), i64::MIN);
        assert_eq!(Retention::default().cutoff(86_400_000 + 7), 7);
    }
}
