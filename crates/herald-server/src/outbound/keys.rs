//! The names outbound delivery uses in the `JobStore`: job kinds, dedupe
//! keys and record keys, in one place so no two uses collide.
//!
//! Records: `contact/{user}` (the user's addresses), `fallback/{user}` (how
//! far the user's fallback got), `sent/{user}` (the last deliveries made for
//! the user), `fanout/{channel}` (group notifications whose fan-out is done),
//! `fanout-run/{notification}` (a fan-out under way: the last member done),
//! `forward/{rule}/{channel}` (the last message forwarded), `since/...` (when
//! a feature was first on), `disabled/{url}` (an endpoint that answered 410).

use sha2::{Digest, Sha256};

/// Job kinds.
pub(crate) const FALLBACK: &str = "fallback";
pub(crate) const FANOUT: &str = "fanout";
pub(crate) const DELIVER: &str = "deliver";
pub(crate) const PUBLISH: &str = "publish";

/// The endpoint of `notification.unread` events (`[webhooks] url`), as
/// opposed to a forwarding rule's (named by its id).
pub(crate) const NOTIFY: &str = "webhooks";

pub(crate) fn contact(user: &str) -> String {
    format!("contact/{user}")
}

/// The user's fallback state (a record), and the dedupe key of the user's
/// pending fallback job: one per user.
pub(crate) fn fallback(user: &str) -> String {
    format!("fallback/{user}")
}

pub(crate) fn sent(user: &str) -> String {
    format!("sent/{user}")
}

pub(crate) fn fanout(channel: &str) -> String {
    format!("fanout/{channel}")
}

/// A fan-out's progress record, and the dedupe key of its job.
pub(crate) fn fanout_run(notification: &str) -> String {
    format!("fanout-run/{notification}")
}

pub(crate) fn forward(rule: &str, channel: &str) -> String {
    format!("forward/{rule}/{channel}")
}

pub(crate) fn since(what: &str) -> String {
    format!("since/{what}")
}

pub(crate) fn disabled(url: &str) -> String {
    format!("disabled/{url}")
}

/// A rule's id: its pattern and URL, hashed (changing either starts a new
/// rule that forwards only what comes after it).
pub(crate) fn rule_id(pattern: &str, url: &str) -> String {
    let digest = Sha256::new().chain_update(pattern).chain_update([0]).chain_update(url).finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A new delivery id (`webhook-id`, the local part of a Message-ID): 128
/// random bits, so ids from different stores or nodes never meet.
pub(crate) fn delivery_id() -> String {
    format!("msg_{:032x}", fastrand::u128(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_are_stable_and_tell_rules_apart() {
        assert_eq!(rule_id("chat/#", "http://a"), rule_id("chat/#", "http://a"));
        assert_ne!(rule_id("chat/#", "http://a"), rule_id("chat/#", "http://b"));
        assert_ne!(rule_id("a", "bc"), rule_id("ab", "c"), "the parts are separated");
        assert_eq!(rule_id("x", "y").len(), 16);
        assert_ne!(delivery_id(), delivery_id());
    }
}
