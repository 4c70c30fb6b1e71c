//! WebSocket frames as a client sends them: the first byte picks the message
//! size limit and how the rest arrives in reads; the rest is the stream.
//!
//! Checks that the messages (and the error ending them) are the same however
//! the bytes arrive; that every message keeps RFC 6455's rules (text is
//! UTF-8, control payloads at most 125 bytes, close codes that may be sent,
//! nothing over the limit); that an idle receiver holds no buffer and a
//! length claimed by a header is never reserved in advance; that each
//! message re-encoded (whole, or in fragments with a ping between them)
//! reads back the same; and that the close frame the server writes fits a
//! control frame with its reason cut at a character boundary.
#![no_main]

use herald_fuzz::{client_frame, split};
use herald_server::fuzz::websocket::{self, MAX_RESERVE, Message, Receiver};
use libfuzzer_sys::fuzz_target;

const LIMITS: [usize; 8] = [0, 1, 2, 125, 126, 1000, 65_536, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else { return };
    let max = LIMITS[usize::from(ctl & 7)];
    let whole = read(&[stream], max);
    assert_eq!(read(&split(stream, ctl >> 3), max), whole, "one read or many, the same messages");
    let key = [ctl, 0x5A, ctl.rotate_left(3), 0xA5];
    for m in whole.iter().filter_map(|r| r.as_ref().ok()) {
        check_message(m, max);
        round_trip(m, max, key);
    }
    let reason = String::from_utf8_lossy(stream);
    close_frame(u16::from_be_bytes([ctl, stream.first().copied().unwrap_or(0)]), &reason, key);
});

/// Every message the stream holds, then the error that ended it (if any).
fn read(chunks: &[&[u8]], max: usize) -> Vec<Result<Message, u16>> {
    let mut rx = Receiver::new(max);
    let mut out = Vec::new();
    let mut pushed = 0;
    for chunk in chunks {
        rx.push(chunk);
        pushed += chunk.len();
        loop {
            let next = rx.parse();
            let (len, capacity) = rx.buffered();
            if len == 0 {
                assert_eq!(capacity, 0, "an idle receiver keeps no buffer");
            }
            assert!(capacity <= 2 * (pushed + MAX_RESERVE), "reserved {capacity} for {pushed} bytes read");
            match next {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => break,
                Err(code) => {
                    out.push(Err(code));
                    return out;
                }
            }
        }
    }
    out
}

fn check_message(m: &Message, max: usize) {
    match m {
        Message::Text(t) => {
            assert!(std::str::from_utf8(t).is_ok(), "text is UTF-8");
            assert!(t.len() <= max);
        }
        Message::Binary(b) => assert!(b.len() <= max),
        Message::Ping(p) => assert!(p.len() <= 125),
        Message::Pong | Message::Close(None) => {}
        Message::Close(Some(code)) => {
            assert!(matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999), "close code {code}")
        }
    }
}

fn round_trip(m: &Message, max: usize, key: [u8; 4]) {
    let (opcode, payload) = match m {
        Message::Text(t) => (0x1, t.clone()),
        Message::Binary(b) => (0x2, b.clone()),
        Message::Ping(p) => (0x9, p.clone()),
        Message::Pong => (0xA, Vec::new()),
        Message::Close(None) => (0x8, Vec::new()),
        Message::Close(Some(code)) => (0x8, websocket::close_payload(*code, "")),
    };
    let whole = client_frame(&websocket::frame(opcode, &payload), true, key);
    assert_eq!(read(&[&whole], max), vec![Ok(m.clone())], "re-encoded whole");
    if opcode < 0x8 {
        // Two fragments with a ping between them: the ping comes first.
        let (a, b) = payload.split_at(payload.len() / 2);
        let mut frames = client_frame(&websocket::frame(opcode, a), false, key);
        frames.extend(client_frame(&websocket::frame(0x9, b"between"), true, key));
        frames.extend(client_frame(&websocket::frame(0x0, b), true, key));
        assert_eq!(read(&[&frames], max), vec![Ok(Message::Ping(b"between".to_vec())), Ok(m.clone())], "fragmented");
    }
}

/// The server's close frame: at most 125 bytes of payload, the code, then
/// the longest prefix of the reason that fits and ends on a character.
fn close_frame(code: u16, reason: &str, key: [u8; 4]) {
    let payload = websocket::close_payload(code, reason);
    assert!(payload.len() <= 125);
    assert_eq!(payload[..2], code.to_be_bytes());
    let cut = std::str::from_utf8(&payload[2..]).expect("cut at a character boundary");
    assert!(reason.starts_with(cut));
    assert!(cut.len() == reason.len() || cut.len() > 123 - 4, "as much of the reason as fits");
    let frame = client_frame(&websocket::frame(0x8, &payload), true, key);
    let got = read(&[&frame], 0);
    if matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        assert_eq!(got, vec![Ok(Message::Close(Some(code)))]);
    } else {
        assert_eq!(got, vec![Err(1002)], "a code that may not be sent is refused");
    }
}
