//! Idempotency keys: what every store keeps to answer a repeated publish with
//! its first receipt instead of storing it twice. The fingerprint tells a
//! retry (same request) from a key reused for something else; the receipt is
//! kept as text, `channel=id` pairs in order (channel names never contain `=`
//! or `,`).

use herald_core::{Channel, CursorToken, NewMessage, cursor::parse_id};

use crate::Receipt;

/// A fingerprint of what a publish asks for: channels, event names and
/// payloads (FNV-1a over each, with lengths so that no two requests run
/// together the same way). Not cryptographic: it only has to tell an honest
/// retry from a different request under the same key.
pub fn fingerprint(batch: &[NewMessage]) -> u64 {
    let mut h = Fnv::default();
    for m in batch {
        h.field(m.channel.as_str().as_bytes());
        h.field(m.event.as_ref().map_or(&b"\0"[..], |e| e.as_str().as_bytes()));
        h.field(&[m.data.kind() as u8]);
        h.field(m.data.bytes());
    }
    h.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn field(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The receipt as cursor tokens write their pairs (order and repeats kept).
pub(crate) fn encode_receipt(receipt: &Receipt) -> String {
    CursorToken::encode_cursors(receipt.iter().map(|(ch, id)| (ch, *id)))
}

pub(crate) fn decode_receipt(s: &str) -> Option<Receipt> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (ch, id) = pair.rsplit_once('=')?;
            Some((Channel::parse(ch).ok()?, parse_id(id).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::Data;

    fn msg(ch: &str, text: &str) -> NewMessage {
        NewMessage { channel: Channel::parse(ch).unwrap(), event: None, data: Data::text(text), meta: None }
    }

    #[test]
    fn receipts_round_trip_in_order() {
        let r = vec![
            (Channel::parse("b").unwrap(), 7),
            (Channel::parse("a/x").unwrap(), 1),
            (Channel::parse("b").unwrap(), 8),
        ];
        assert_eq!(decode_receipt(&encode_receipt(&r)), Some(r));
        assert_eq!(decode_receipt("a=x"), None);
    }

    #[test]
    fn fingerprints_tell_requests_apart() {
        assert_eq!(fingerprint(&[msg("a", "x")]), fingerprint(&[msg("a", "x")]));
        assert_ne!(fingerprint(&[msg("a", "x")]), fingerprint(&[msg("a", "y")]));
        assert_ne!(fingerprint(&[msg("ab", "c")]), fingerprint(&[msg("a", "bc")]));
        assert_ne!(fingerprint(&[msg("a", "x"), msg("b", "x")]), fingerprint(&[msg("b", "x"), msg("a", "x")]));
    }
}
