//! Cursors as clients send them: `since=`, `Last-Event-ID` (a plain id on a
//! single-channel stream, a cursor token `chat/a=5,news=12` on a
//! multi-channel one). Each line of the input is tried as each.
//!
//! Checks the id parser against its grammar (decimal digits, no sign, no
//! space, within u64), and that a token that decodes holds exactly the pairs
//! it was written with (the last id for a repeated channel), encodes to one
//! line, and round-trips through encode.
#![no_main]

use herald_core::{Channel, CursorToken, Since, cursor::parse_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        check_id(line);
        check_token(line);
    }
});

/// The id a string is by the grammar: `[0-9]+` with a value within u64.
fn grammar_id(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
}

fn check_id(s: &str) {
    assert_eq!(parse_id(s).ok(), grammar_id(s), "{s:?}");
    match Since::parse(s) {
        Ok(Since::Now) => assert_eq!(s, "now"),
        Ok(Since::After(n)) => assert_eq!(Some(n), grammar_id(s)),
        Err(_) => assert!(s != "now" && grammar_id(s).is_none(), "{s:?}"),
    }
}

fn check_token(s: &str) {
    let grammar: Option<Vec<(&str, u64)>> = if s.is_empty() {
        Some(Vec::new())
    } else {
        s.split(',')
            .map(|pair| {
                let (ch, id) = pair.split_once('=')?;
                Channel::parse(ch).ok()?;
                Some((ch, grammar_id(id)?))
            })
            .collect()
    };
    let Ok(token) = CursorToken::decode(s) else {
        assert!(grammar.is_none(), "refused a well-formed token: {s:?}");
        return;
    };
    let pairs = grammar.expect("accepted only a well-formed token");
    for (ch, id) in &pairs {
        let last = pairs.iter().rev().find(|(c, _)| c == ch).map(|(_, id)| *id);
        assert_eq!(token.0.get(*ch).copied(), last, "{ch} in {s:?} (had {id})");
    }
    assert!(token.0.keys().all(|ch| pairs.iter().any(|(c, _)| *c == ch.as_str())), "nothing added");
    let encoded = token.encode();
    assert!(!encoded.contains(['\r', '\n']), "one line, for an SSE id field");
    assert_eq!(CursorToken::encode_cursors(token.0.iter().map(|(c, id)| (c, *id))), encoded);
    assert_eq!(CursorToken::decode(&encoded).as_ref(), Ok(&token), "{s:?} re-encoded as {encoded:?}");
}
