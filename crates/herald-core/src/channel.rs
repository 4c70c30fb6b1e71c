//! Channel names: validation and the few questions asked of a name.
//!
//! A channel is `/`-separated segments of `[A-Za-z0-9_.~:@-]+`, never `.` or `..`
//! (so no path normalisation can turn one channel into another), at most 255 bytes.
//! The same string is the MQTT topic. Names starting with `$` are the server's own:
//! they are valid names, but clients may not publish to them.

use std::{fmt, sync::Arc};

/// Longest channel name, in bytes (the MQTT topic limit is larger; this keeps
/// names cheap to index and to carry in cursor tokens).
pub const MAX_CHANNEL_LEN: usize = 255;

/// A validated channel name. Cheap to clone: the text is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment,
    #[error("channel segment '{0}' is not allowed ('.' and '..' are reserved)")]
    DotSegment(String),
    #[error("channel name contains '{0}'; allowed are A-Z a-z 0-9 _ . ~ : @ - and '/' between segments")]
    BadChar(char),
}

/// True for the bytes allowed inside one segment.
pub(crate) fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'~' | b':' | b'@' | b'-')
}

/// Validates one segment (also used for user ids, which must be one segment).
pub fn validate_segment(seg: &str) -> Result<(), ChannelError> {
    if seg.is_empty() {
        return Err(ChannelError::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(ChannelError::DotSegment(seg.to_owned()));
    }
    if let Some(c) = seg.chars().find(|c| !(c.is_ascii() && is_segment_byte(*c as u8))) {
        return Err(ChannelError::BadChar(c));
    }
    Ok(())
}

impl Channel {
    /// Parses a client-supplied name. `$`-prefixed server names are accepted here
    /// (they can be read); use [`Channel::is_reserved`] to refuse publishing to them.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        let body = name.strip_prefix('$').unwrap_or(name);
        if body.is_empty() {
            return Err(ChannelError::EmptySegment);
        }
        for seg in body.split('/') {
            validate_segment(seg)?;
        }
        Ok(Channel(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Server-owned names (`$SYS/...`) are never written by clients.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The user id when this is a personal inbox, `user/{id}`.
    pub fn inbox_owner(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("user/")?;
        (!rest.contains('/')).then_some(rest)
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({:?})", &*self.0)
    }
}

impl std::borrow::Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_seed_names() {
        for ok in ["news", "chat/room/Default", "user/42", "a.b~c:d@e-f_g", "$SYS/uptime", "..a/b..", "..."] {
            assert!(Channel::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_could_alias_or_inject() {
        let cases = [
            ("", ChannelError::Empty),
            ("/a", ChannelError::EmptySegment),
            ("a/", ChannelError::EmptySegment),
            ("a//b", ChannelError::EmptySegment),
            ("a/./b", ChannelError::DotSegment(".".into())),
            ("a/../b", ChannelError::DotSegment("..".into())),
            ("..", ChannelError::DotSegment("..".into())),
            ("a b", ChannelError::BadChar(' ')),
            ("a+b", ChannelError::BadChar('+')),
            ("a/#", ChannelError::BadChar('#')),
            ("é", ChannelError::BadChar('é')),
            ("$", ChannelError::EmptySegment),
            ("a$", ChannelError::BadChar('$')),
        ];
        for (name, want) in cases {
            assert_eq!(Channel::parse(name).unwrap_err(), want, "{name:?}");
        }
        assert_eq!(Channel::parse(&"a".repeat(256)).unwrap_err(), ChannelError::TooLong);
        assert!(Channel::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn inbox_owner_is_only_a_direct_child_of_user() {
        assert_eq!(Channel::parse("user/42").unwrap().inbox_owner(), Some("42"));
        assert_eq!(Channel::parse("user/42/x").unwrap().inbox_owner(), None);
        assert_eq!(Channel::parse("users/42").unwrap().inbox_owner(), None);
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.~:@-]{1,12}".prop_filter("dot segments", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn every_well_formed_name_parses_and_round_trips(segs in prop::collection::vec(segment(), 1..8)) {
            let name = segs.join("/");
            prop_assume!(name.len() <= MAX_CHANNEL_LEN);
            let ch = Channel::parse(&name).unwrap();
            prop_assert_eq!(ch.as_str(), name.as_str());
            prop_assert_eq!(ch.segments().count(), segs.len());
        }

        #[test]
        fn any_forbidden_byte_is_refused(prefix in segment(), bad in "[^A-Za-z0-9_.~:@/-]", suffix in segment()) {
            let name = format!("{prefix}{bad}{suffix}");
            prop_assert!(Channel::parse(&name).is_err());
        }

        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = Channel::parse(&s);
        }
    }
}
