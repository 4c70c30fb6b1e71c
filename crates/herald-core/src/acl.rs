//! Who may do what: the permission rules, as pure functions of a [`Principal`].
//!
//! An API key (or open development mode) may do anything. A user, identified
//! by a token, may subscribe to channels its `channels` patterns cover, publish
//! where its `publish` patterns match, always read its own inbox `user/{sub}`,
//! and never read another user's inbox, whatever patterns it holds: a wildcard
//! subscription that could reach other inboxes is allowed only as far as the
//! grant covers it, and every message is checked with [`Principal::may_read`]
//! before delivery. Only API keys write to inboxes.

use crate::{channel::Channel, filter::Filter, hub::Target};

#[derive(Debug, Clone)]
pub enum Principal {
    /// An API key, or open development mode.
    Admin,
    User(Grant),
}

/// What a user's token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub sub: String,
    pub subscribe: Vec<Filter>,
    pub publish: Vec<Filter>,
    /// When the token expires, ms since the epoch.
    pub expires_at: Option<i64>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin)
    }

    pub fn user(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::User(g) => Some(&g.sub),
        }
    }

    pub fn expires_at(&self) -> Option<i64> {
        match self {
            Principal::Admin => None,
            Principal::User(g) => g.expires_at,
        }
    }

    /// Whether a message on `channel` may be delivered to this principal.
    pub fn may_read(&self, channel: &Channel) -> bool {
        let Principal::User(g) = self else { return true };
        if let Some(owner) = channel.inbox_owner() {
            return owner == g.sub;
        }
        !channel.is_reserved() && g.subscribe.iter().any(|p| p.matches(channel))
    }

    /// Whether this principal may subscribe to `target` at all. For a filter,
    /// each delivered message is still checked with [`Principal::may_read`].
    pub fn may_subscribe(&self, target: &Target) -> bool {
        match (self, target) {
            (Principal::Admin, _) => true,
            (_, Target::Channel(c)) => self.may_read(c),
            (Principal::User(g), Target::Filter(f)) => g.subscribe.iter().any(|p| f.is_covered_by(p)),
        }
    }

    pub fn may_publish(&self, channel: &Channel) -> bool {
        match self {
            Principal::Admin => !channel.is_reserved(),
            Principal::User(g) => {
                channel.inbox_owner().is_none()
                    && !channel.is_reserved()
                    && g.publish.iter().any(|p| p.matches(channel))
            }
        }
    }

    /// Reading or marking `user`'s inbox through the inbox API.
    pub fn may_access_inbox(&self, user: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::User(g) => g.sub == user,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(sub: &str, subscribe: &[&str], publish: &[&str]) -> Principal {
        Principal::User(Grant {
            sub: sub.into(),
            subscribe: subscribe.iter().map(|p| Filter::parse(p).unwrap()).collect(),
            publish: publish.iter().map(|p| Filter::parse(p).unwrap()).collect(),
            expires_at: None,
        })
    }
    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }
    fn filter(s: &str) -> Target {
        Target::Filter(Filter::parse(s).unwrap())
    }

    #[test]
    fn own_inbox_always_others_never() {
        let b = user("b", &["#", "user/+", "user/a"], &["#"]);
        assert!(b.may_read(&ch("user/b")));
        assert!(!b.may_read(&ch("user/a")), "an explicit grant of user/a does not open a's inbox");
        assert!(b.may_subscribe(&Target::Channel(ch("user/b"))));
        assert!(!b.may_subscribe(&Target::Channel(ch("user/a"))));
        assert!(b.may_subscribe(&filter("user/+")), "allowed, but filtered per message");
        assert!(!b.may_publish(&ch("user/b")), "only API keys write to inboxes");
        assert!(!b.may_publish(&ch("user/a")));
        assert!(b.may_access_inbox("b") && !b.may_access_inbox("a"));
        let none = user("n", &[], &[]);
        assert!(none.may_read(&ch("user/n")), "no grant needed for one's own inbox");
    }

    #[test]
    fn grants_bound_subscriptions_and_publishing() {
        let u = user("u", &["chat/#"], &["chat/room/+"]);
        assert!(u.may_subscribe(&Target::Channel(ch("chat/room/x"))));
        assert!(u.may_subscribe(&filter("chat/room/+")));
        assert!(!u.may_subscribe(&filter("#")));
        assert!(!u.may_subscribe(&Target::Channel(ch("news"))));
        assert!(u.may_publish(&ch("chat/room/x")));
        assert!(!u.may_publish(&ch("chat/lobby/x/y")));
        assert!(!u.may_read(&ch("$SYS/x")));
        assert!(Principal::Admin.may_publish(&ch("user/a")));
        assert!(!Principal::Admin.may_publish(&ch("$all")), "$ channels are written by the server itself");
    }
}
