//! Built-in moderation rules (`[[moderation.rules]]`): per channel pattern,
//! the first rule whose channels match applies (as history rules do). A rule
//! looks at a message's text: a text payload as it is, a JSON payload's
//! string values (keys and numbers are structure, not words); binary
//! payloads have no text and pass.
//!
//! - `words`: whole words, in any case (`\b` on either side); a word with CJK
//!   characters matches anywhere, as CJK text puts no spaces between words.
//! - `patterns`: regular expressions (the `regex` crate: linear time, so no
//!   pattern can be made to take exponential time by a message).
//! - `max_links`: `http(s)://` and `www.` links.
//! - `max_chars`: characters of text.
//!
//! `action = "reject"` refuses the publish naming the check that failed;
//! `"mask"` replaces each offending word, match or extra link with as many
//! `*` and cuts text past `max_chars`, and the message goes on.

use herald_core::{Channel, Data, DataKind, Filter};
use regex::Regex;

use crate::config::{ModerationRule, RuleAction};

/// Why a publish was refused: the failed check (`words`, `pattern`,
/// `links`, `length`, or `webhook`) and a reason for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub rule: &'static str,
    pub reason: String,
}

/// What the rules did to a publish they let through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Masked {
    /// The checks that masked something, for the counters.
    pub by: Vec<&'static str>,
}

pub struct Rule {
    channels: Vec<Filter>,
    words: Option<Regex>,
    patterns: Option<Regex>,
    max_links: usize,
    max_chars: usize,
    action: RuleAction,
}

pub struct Rules(Vec<Rule>);

fn links() -> &'static Regex {
    static LINKS: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    LINKS.get_or_init(|| Regex::new(r#"(?i)\b(?:https?://|www\.)[^\s<>"']+"#).expect("a valid pattern"))
}

impl Rules {
    pub fn new(rules: &[ModerationRule]) -> Result<Rules, String> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::new(r).map_err(|e| format!("[[moderation.rules]] #{}: {e}", i + 1)))
            .collect::<Result<_, _>>()
            .map(Rules)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the first rule covering `channel`: the data to store (the
    /// same, or masked) or why it is refused.
    pub fn apply(&self, channel: &Channel, data: Data, masked: &mut Masked) -> Result<Data, Rejection> {
        match self.0.iter().find(|r| r.channels.iter().any(|f| f.matches(channel))) {
            Some(rule) => rule.apply(data, masked),
            None => Ok(data),
        }
    }
}

impl Rule {
    fn new(r: &ModerationRule) -> Result<Rule, String> {
        if r.channels.is_empty() {
            return Err("'channels' names no channel pattern".into());
        }
        let channels = r
            .channels
            .iter()
            .map(|c| Filter::parse(c).map_err(|e| format!("channel pattern '{c}': {e}")))
            .collect::<Result<_, _>>()?;
        let words = match r.words.iter().map(|w| w.trim()).filter(|w| !w.is_empty()).collect::<Vec<_>>() {
            w if w.is_empty() => None,
            w => {
                let alternatives: Vec<String> = w.iter().map(|w| word_pattern(w)).collect();
                Some(Regex::new(&format!("(?i){}", alternatives.join("|"))).map_err(|e| format!("words: {e}"))?)
            }
        };
        let patterns = match r.patterns.as_slice() {
            [] => None,
            ps => {
                for p in ps {
                    Regex::new(p).map_err(|e| format!("pattern '{p}': {e}"))?;
                }
                let joined: Vec<String> = ps.iter().map(|p| format!("(?:{p})")).collect();
                Some(Regex::new(&joined.join("|")).map_err(|e| format!("patterns: {e}"))?)
            }
        };
        Ok(Rule { channels, words, patterns, max_links: r.max_links, max_chars: r.max_chars, action: r.action })
    }

    fn apply(&self, data: Data, masked: &mut Masked) -> Result<Data, Rejection> {
        match data.kind() {
            DataKind::Binary => Ok(data),
            DataKind::Text => {
                let mut texts = vec![data.as_str().into_owned()];
                if !self.check(&mut texts, masked)? {
                    return Ok(data);
                }
                Ok(Data::text(texts.pop().expect("one text")))
            }
            DataKind::Json => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(data.bytes()).expect("Data::Json holds valid JSON");
                let mut texts = Vec::new();
                collect_strings(&mut value, &mut |s| texts.push(std::mem::take(s)));
                let changed = self.check(&mut texts, masked);
                let mut back = texts.into_iter();
                collect_strings(&mut value, &mut |s| *s = back.next().expect("as many as taken"));
                if !changed? {
                    return Ok(data);
                }
                let bytes = serde_json::to_vec(&value).expect("a Value serialises");
                Ok(Data::json(bytes.into()).expect("valid JSON"))
            }
        }
    }

    /// Checks the texts in order; with `mask`, rewrites them. `Ok(true)`
    /// when something was masked.
    fn check(&self, texts: &mut [String], masked: &mut Masked) -> Result<bool, Rejection> {
        let mask = self.action == RuleAction::Mask;
        let mut changed = false;
        for (re, rule, what) in [(&self.words, "words", "a word"), (&self.patterns, "pattern", "text")] {
            let Some(re) = re else { continue };
            for t in texts.iter_mut() {
                let Some(found) = re.find(t) else { continue };
                if !mask {
                    return Err(Rejection {
                        rule,
                        reason: format!("{what} this channel does not allow: '{}'", found.as_str()),
                    });
                }
                *t = stars(re, t, |_| true);
                changed = true;
                add(masked, rule);
            }
        }
        if self.max_links > 0 {
            let count: usize = texts.iter().map(|t| links().find_iter(t).count()).sum();
            if count > self.max_links {
                if !mask {
                    return Err(Rejection {
                        rule: "links",
                        reason: format!("{count} links; this channel allows at most {}", self.max_links),
                    });
                }
                let mut seen = 0;
                for t in texts.iter_mut() {
                    *t = stars(links(), t, |_| {
                        seen += 1;
                        seen > self.max_links
                    });
                }
                changed = true;
                add(masked, "links");
            }
        }
        if self.max_chars > 0 {
            let count: usize = texts.iter().map(|t| t.chars().count()).sum();
            if count > self.max_chars {
                if !mask {
                    return Err(Rejection {
                        rule: "length",
                        reason: format!("{count} characters; this channel allows at most {}", self.max_chars),
                    });
                }
                let mut budget = self.max_chars;
                for t in texts.iter_mut() {
                    let keep = t.char_indices().nth(budget).map_or(t.len(), |(i, _)| i);
                    budget -= t[..keep].chars().count();
                    t.truncate(keep);
                }
                changed = true;
                add(masked, "length");
            }
        }
        Ok(changed)
    }
}

fn add(masked: &mut Masked, rule: &'static str) {
    if !masked.by.contains(&rule) {
        masked.by.push(rule);
    }
}

/// `text` with the matches of `re` that `pick` chooses replaced by a `*` per character.
fn stars(re: &Regex, text: &str, mut pick: impl FnMut(&str) -> bool) -> String {
    re.replace_all(text, |c: &regex::Captures<'_>| {
        let m = &c[0];
        if pick(m) { "*".repeat(m.chars().count()) } else { m.to_owned() }
    })
    .into_owned()
}

/// A word as a pattern: whole word (a boundary where the word begins or
/// ends with a word character), or anywhere when it has CJK characters.
fn word_pattern(word: &str) -> String {
    let escaped = regex::escape(word);
    if word.chars().any(is_cjk) {
        return format!("(?:{escaped})");
    }
    let wordy = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let start = if wordy(word.chars().next()) { r"\b" } else { "" };
    let end = if wordy(word.chars().last()) { r"\b" } else { "" };
    format!("(?:{start}{escaped}{end})")
}

/// Han, kana, Hangul and their punctuation: scripts written without spaces
/// between words.
fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{1100}'..='\u{11FF}' | '\u{2E80}'..='\u{2FDF}' | '\u{3000}'..='\u{30FF}' | '\u{3100}'..='\u{31FF}'
        | '\u{3200}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}' | '\u{A960}'..='\u{A97F}' | '\u{AC00}'..='\u{D7FF}'
        | '\u{F900}'..='\u{FAFF}' | '\u{FF00}'..='\u{FFEF}' | '\u{20000}'..='\u{3FFFF}')
}

/// Calls `f` on every string value of a JSON document, in document order.
fn collect_strings(v: &mut serde_json::Value, f: &mut impl FnMut(&mut String)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| collect_strings(x, f)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| collect_strings(x, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> Rules {
        let c = crate::config::Config::from_toml(toml).unwrap();
        Rules::new(&c.moderation.rules).unwrap()
    }

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    fn text(r: &Rules, channel: &str, t: &str) -> Result<String, Rejection> {
        r.apply(&ch(channel), Data::text(t), &mut Masked::default()).map(|d| d.as_str().into_owned())
    }

    #[test]
    fn words_are_whole_words_in_any_case_and_cjk_words_match_inside_text() {
        let r = rules("[[moderation.rules]]\nchannels = [\"chat/#\"]\nwords = [\"darn\", \"c++\", \"笨蛋\"]\n");
        assert_eq!(text(&r, "chat/a", "DARN it").unwrap_err().rule, "words");
        assert!(text(&r, "chat/a", "darned good").is_ok(), "not a whole word");
        assert!(text(&r, "chat/a", "I like c++!").is_err());
        assert!(text(&r, "chat/a", "你是笨蛋吗").is_err(), "no spaces around CJK words");
        assert!(text(&r, "news", "darn").is_ok(), "no rule covers news");
        let e = text(&r, "chat/a", "oh Darn").unwrap_err();
        assert!(e.reason.contains("Darn"), "{e:?}");
    }

    #[test]
    fn first_matching_rule_wins_and_json_strings_are_checked_and_masked() {
        let r = rules(
            "[[moderation.rules]]\nchannels = [\"chat/room/quiet\"]\nmax_chars = 5\n\
             [[moderation.rules]]\nchannels = [\"chat/#\"]\nwords = [\"spam\"]\npatterns = [\"\\\\d{4}-\\\\d{4}\"]\naction = \"mask\"\n",
        );
        assert!(text(&r, "chat/room/quiet", "spam").is_ok(), "the first rule (length only) applies");
        assert_eq!(text(&r, "chat/room/quiet", "too long").unwrap_err().rule, "length");
        let mut masked = Masked::default();
        let json = Data::json(r#"{"from":"spam","msg":"Spam, call 5555-1234","n":7}"#.into()).unwrap();
        let out = r.apply(&ch("chat/x"), json, &mut masked).unwrap();
        let v: serde_json::Value = serde_json::from_slice(out.bytes()).unwrap();
        assert_eq!(v, serde_json::json!({"from":"****","msg":"****, call *********","n":7}));
        assert_eq!(masked.by, ["words", "pattern"]);
        let clean = Data::json(r#"{"msg":"hello"}"#.into()).unwrap();
        assert_eq!(r.apply(&ch("chat/x"), clean.clone(), &mut Masked::default()).unwrap(), clean, "untouched bytes");
    }

    #[test]
    fn links_and_length_reject_or_mask() {
        let r = rules("[[moderation.rules]]\nchannels = [\"#\"]\nmax_links = 1\nmax_chars = 40\n");
        assert!(text(&r, "a", "see https://example.com").is_ok());
        let e = text(&r, "a", "https://a.example and www.b.example").unwrap_err();
        assert_eq!((e.rule, e.reason.as_str()), ("links", "2 links; this channel allows at most 1"));
        assert_eq!(text(&r, "a", &"é".repeat(41)).unwrap_err().rule, "length");
        let m = rules("[[moderation.rules]]\nchannels = [\"#\"]\nmax_links = 1\nmax_chars = 35\naction = \"mask\"\n");
        assert_eq!(text(&m, "a", "https://a.example www.b.example").unwrap(), "https://a.example *************");
        assert_eq!(text(&m, "a", &"é".repeat(41)).unwrap(), "é".repeat(35));
        // Binary payloads have no text to look at.
        let bin = Data::sniff(vec![0xff, 0xfe, 0x00].into());
        assert_eq!(m.apply(&ch("a"), bin.clone(), &mut Masked::default()).unwrap(), bin);
    }

    #[test]
    fn bad_rules_are_refused_naming_them() {
        let bad = |toml: &str| crate::config::Config::from_toml(toml).unwrap_err().to_string();
        assert!(bad("[[moderation.rules]]\nchannels = [\"a/#/b\"]\n").contains("#1"));
        assert!(bad("[[moderation.rules]]\nchannels = [\"a\"]\npatterns = [\"(\"]\n").contains("pattern '('"));
        assert!(bad("[[moderation.rules]]\nchannels = []\n").contains("channels"));
    }
}
