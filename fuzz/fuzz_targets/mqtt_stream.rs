//! MQTT bytes as a client sends them: the first byte picks the packet size
//! limit and how the rest arrives in reads; the rest is the stream.
//!
//! Checks that the connection's framer returns the same packets however the
//! bytes arrive, and exactly the packets (or the error) the MQTT fixed
//! header describes; that the CONNECT's version sniffing agrees with the
//! decoder; and that every packet that decodes re-encodes to one that
//! decodes the same (v5 as is, v3 through the lift to v5 and back).
#![no_main]

use herald_fuzz::split;
use herald_server::fuzz::mqtt::{self, FrameEnd, Version};
use libfuzzer_sys::fuzz_target;
use mqtt_proto::{Protocol, v3, v5};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else { return };
    let max = match ctl >> 5 {
        0 => usize::MAX,
        t => 1 << (2 * t + 2), // 16 bytes to 64 KiB
    };
    let (packets, end) = mqtt::frame(&split(stream, ctl & 0x1F), max);
    assert_eq!((&packets, end), (&reference_frames(stream, max).0, reference_frames(stream, max).1));
    assert_eq!(mqtt::frame(&[stream], max), (packets.clone(), end), "one read or many, the same packets");
    for p in &packets {
        check_packet(p);
    }
});

/// The packets in `stream` by the letter of the fixed header (MQTT 5 section
/// 2.1.4: a remaining length of one to four bytes, seven bits each).
fn reference_frames(stream: &[u8], max: usize) -> (Vec<Vec<u8>>, FrameEnd) {
    let mut out = Vec::new();
    let mut rest = stream;
    loop {
        let mut remaining = 0usize;
        let mut header = 1;
        loop {
            let Some(&b) = rest.get(header) else { return (out, FrameEnd::Closed) };
            remaining += usize::from(b & 0x7F) << (7 * (header - 1));
            header += 1;
            if b & 0x80 == 0 {
                break;
            }
            if header == 5 {
                return (out, FrameEnd::BadLength);
            }
        }
        let total = header + remaining;
        if total > max {
            return (out, FrameEnd::TooLarge(total));
        }
        if rest.len() < total {
            return (out, FrameEnd::Closed);
        }
        out.push(rest[..total].to_vec());
        rest = &rest[total..];
    }
}

fn check_packet(bytes: &[u8]) {
    let sniffed = mqtt::connect_version(bytes);
    for version in [Version::V3, Version::V5] {
        let Ok(packet) = mqtt::decode(version, bytes) else { continue };
        if let v5::Packet::Connect(c) = &packet {
            let from_level = match c.protocol {
                Protocol::V500 => Version::V5,
                Protocol::V310 | Protocol::V311 => Version::V3,
            };
            assert_eq!(sniffed, Some(from_level), "the sniffed version is the CONNECT's");
        }
        match version {
            Version::V5 => v5_round_trip(&packet),
            Version::V3 => v3_round_trip(bytes, &packet),
        }
    }
}

/// What the broker would send back of a v5 packet decodes as the packet.
fn v5_round_trip(packet: &v5::Packet) {
    let Some(encoded) = mqtt::encode(Version::V5, packet) else { return };
    assert_eq!(mqtt::whole_packet(&encoded, usize::MAX), Ok(Some(encoded.len())));
    assert_eq!(mqtt::decode(Version::V5, &encoded).as_ref(), Ok(packet), "v5 re-encoded: {encoded:?}");
}

/// A v3 packet lifted to v5 says what the v3 packet said: lowered again it
/// is the same v3 packet; lifted packets with no v3 form going out (client
/// packets) are valid v5 packets that round-trip, and a CONNECT keeps every
/// field v3 has.
fn v3_round_trip(bytes: &[u8], lifted: &v5::Packet) {
    let raw = v3::Packet::decode(bytes).expect("decoded once").expect("whole");
    match (&raw, lifted) {
        // Server packets from a client: lifted into one the session refuses.
        (v3::Packet::Connack(_) | v3::Packet::Suback(_) | v3::Packet::Unsuback(_), v5::Packet::Pingresp) => {}
        (v3::Packet::Connect(c3), v5::Packet::Connect(c5)) => {
            assert_eq!(
                (c3.protocol, c3.clean_session, c3.keep_alive, &c3.client_id, &c3.username, &c3.password),
                (c5.protocol, c5.clean_start, c5.keep_alive, &c5.client_id, &c5.username, &c5.password)
            );
            let will3 = c3.last_will.as_ref().map(|w| (w.qos, w.retain, &w.topic_name, &w.message));
            let will5 = c5.last_will.as_ref().map(|w| (w.qos, w.retain, &w.topic_name, &w.payload));
            assert_eq!(will3, will5);
            assert_eq!(c5.properties, Default::default());
        }
        (_, lifted) => match mqtt::encode(Version::V3, lifted) {
            Some(lowered) => {
                assert_eq!(v3::Packet::decode(&lowered).ok().flatten().as_ref(), Some(&raw), "lowered: {lowered:?}")
            }
            None => v5_round_trip(lifted),
        },
    }
}
