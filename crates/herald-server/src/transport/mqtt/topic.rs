//! MQTT topic rules the broker needs beyond Herald's channels: matching for
//! topics that are not valid channel names (empty levels such as `/a`, spaces,
//! non-ASCII), which MQTT clients may use among themselves.

/// MQTT filter matching on raw topic strings: `+` one level, trailing `#` any
/// number (including the parent), and no leading wildcard matches a `$` topic.
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            lit => {
                if t.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// `$share/{group}/{filter}` split into (group, filter).
pub(crate) fn shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, f) = rest.split_once('/')?;
    (!group.is_empty() && !f.is_empty()).then_some((group, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_matching() {
        assert!(matches("/#", "/TopicA"));
        assert!(matches("/+", "/TopicA"));
        assert!(matches("+/+", "/TopicA"));
        assert!(matches("#", "/TopicA"));
        assert!(!matches("+", "/TopicA"));
        assert!(matches("TopicA/#", "TopicA"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert_eq!(shared("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(shared("$share//a"), None);
    }
}
