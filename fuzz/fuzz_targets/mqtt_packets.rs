//! Packets the broker sends, built by `arbitrary` (structured, so every
//! packet type and property is reached without first finding its bytes).
//!
//! Checks that what the broker encodes for a v5 client decodes as the same
//! packet; that what it encodes for a v3 client is the v3 packet MQTT 3.1.1
//! defines for it (return codes mapped, a refused subscription 0x80); and
//! that extra subscription identifiers added to an encoded PUBLISH leave a
//! well-framed packet that carries them.
#![no_main]

use arbitrary::Arbitrary;
use herald_server::fuzz::mqtt::{self, Version};
use libfuzzer_sys::fuzz_target;
use mqtt_proto::{
    Pid, QoS, QosPid, TopicName, v3,
    v5::{self, ConnectReasonCode, SubscribeReasonCode},
};

#[derive(Arbitrary, Debug)]
struct Input {
    packet: v5::Packet,
    ids: Vec<u32>,
}

fuzz_target!(|input: Input| {
    let p = &input.packet;
    let server_packet = matches!(
        p,
        v5::Packet::Connack(_)
            | v5::Packet::Publish(_)
            | v5::Packet::Puback(_)
            | v5::Packet::Pubrec(_)
            | v5::Packet::Pubrel(_)
            | v5::Packet::Pubcomp(_)
            | v5::Packet::Suback(_)
            | v5::Packet::Unsuback(_)
            | v5::Packet::Pingresp
            | v5::Packet::Disconnect(_)
            | v5::Packet::Auth(_)
    );
    // What the broker sends is built from valid parts: packet ids from 1,
    // topics it received or channel names (mqtt-proto's `Arbitrary` makes
    // id 0 and topics with NUL or wildcards, which it would refuse to parse).
    if !server_packet || pid(p).is_some_and(|pid| pid.value() == 0) {
        return;
    }
    if let v5::Packet::Publish(publish) = p
        && (TopicName::is_invalid(&publish.topic_name)
            || publish.properties.response_topic.as_ref().is_some_and(|t| TopicName::is_invalid(t))
            // A payload marked UTF-8 is UTF-8: the broker refuses others on
            // the way in, and HTTP publishes carry no such mark.
            || (publish.properties.payload_is_utf8 == Some(true) && std::str::from_utf8(&publish.payload).is_err()))
    {
        return;
    }
    // A CONNACK's Maximum QoS is 0 or 1 (MQTT 5 section 3.2.2.3.4); the
    // broker sets none (it supports QoS 2), mqtt-proto would write 2.
    if let v5::Packet::Connack(c) = p
        && c.properties.max_qos == Some(QoS::Level2)
    {
        return;
    }
    let v5_bytes = mqtt::encode(Version::V5, p);
    if let Some(bytes) = &v5_bytes {
        assert_eq!(mqtt::whole_packet(bytes, usize::MAX), Ok(Some(bytes.len())));
        assert_eq!(mqtt::decode(Version::V5, bytes).as_ref(), Ok(p), "v5: {bytes:?}");
    }
    match (mqtt::encode(Version::V3, p), lowered(p)) {
        (Some(bytes), Some(want)) => {
            assert_eq!(mqtt::whole_packet(&bytes, usize::MAX), Ok(Some(bytes.len())));
            assert_eq!(v3::Packet::decode(&bytes).ok().flatten(), Some(want), "v3: {bytes:?}");
        }
        (None, None) => {}
        // mqtt-proto refuses to encode what breaks its limits either way.
        (None, Some(_)) if v5_bytes.is_none() => {}
        (got, want) => panic!("v3 form {got:?}, expected {want:?}"),
    }
    if let (v5::Packet::Publish(publish), Some(bytes)) = (p, v5_bytes) {
        subscription_ids(publish, bytes, &input.ids);
    }
});

fn pid(p: &v5::Packet) -> Option<Pid> {
    match p {
        v5::Packet::Publish(p) => match p.qos_pid {
            QosPid::Level0 => None,
            QosPid::Level1(pid) | QosPid::Level2(pid) => Some(pid),
        },
        v5::Packet::Puback(a) => Some(a.pid),
        v5::Packet::Pubrec(a) => Some(a.pid),
        v5::Packet::Pubrel(a) => Some(a.pid),
        v5::Packet::Pubcomp(a) => Some(a.pid),
        v5::Packet::Suback(s) => Some(s.pid),
        v5::Packet::Unsuback(u) => Some(u.pid),
        _ => None,
    }
}

/// The v3 packet MQTT 3.1.1 has for a v5 one the broker sends, or `None`
/// (DISCONNECT and AUTH: a v3 connection just closes).
fn lowered(p: &v5::Packet) -> Option<v3::Packet> {
    Some(match p {
        v5::Packet::Connack(c) => v3::Packet::Connack(v3::Connack {
            session_present: c.session_present,
            code: match c.reason_code {
                ConnectReasonCode::Success => v3::ConnectReturnCode::Accepted,
                ConnectReasonCode::UnsupportedProtocolVersion => v3::ConnectReturnCode::UnacceptableProtocolVersion,
                ConnectReasonCode::ClientIdentifierNotValid => v3::ConnectReturnCode::IdentifierRejected,
                ConnectReasonCode::BadUserNameOrPassword => v3::ConnectReturnCode::BadUserNameOrPassword,
                ConnectReasonCode::NotAuthorized => v3::ConnectReturnCode::NotAuthorized,
                _ => v3::ConnectReturnCode::ServerUnavailable,
            },
        }),
        v5::Packet::Publish(p) => v3::Packet::Publish(v3::Publish {
            dup: p.dup,
            retain: p.retain,
            qos_pid: p.qos_pid,
            topic_name: p.topic_name.clone(),
            payload: p.payload.clone(),
        }),
        v5::Packet::Puback(a) => v3::Packet::Puback(a.pid),
        v5::Packet::Pubrec(a) => v3::Packet::Pubrec(a.pid),
        v5::Packet::Pubrel(a) => v3::Packet::Pubrel(a.pid),
        v5::Packet::Pubcomp(a) => v3::Packet::Pubcomp(a.pid),
        v5::Packet::Suback(s) => v3::Packet::Suback(v3::Suback {
            pid: s.pid,
            topics: s
                .topics
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::GrantedQoS0 => v3::SubscribeReturnCode::MaxLevel0,
                    SubscribeReasonCode::GrantedQoS1 => v3::SubscribeReturnCode::MaxLevel1,
                    SubscribeReasonCode::GrantedQoS2 => v3::SubscribeReturnCode::MaxLevel2,
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        }),
        v5::Packet::Unsuback(u) => v3::Packet::Unsuback(u.pid),
        v5::Packet::Pingresp => v3::Packet::Pingresp,
        _ => return None,
    })
}

/// Identifiers as a SUBSCRIBE carries them (1 to 268,435,455).
fn subscription_ids(publish: &v5::Publish, bytes: Vec<u8>, raw: &[u32]) {
    let ids: Vec<u32> = raw.iter().take(8).map(|i| i % 268_435_455 + 1).collect();
    let out = mqtt::add_subscription_ids(bytes.clone(), &ids).expect("an encoded PUBLISH takes identifiers");
    if ids.is_empty() {
        assert_eq!(out, bytes);
        return;
    }
    assert_eq!(mqtt::whole_packet(&out, usize::MAX), Ok(Some(out.len())), "framed: {out:?}");
    assert!(out.ends_with(&publish.payload), "the payload follows unchanged");
    // Each identifier costs its property byte and its variable-length bytes;
    // the two lengths may each grow by a byte or two.
    let added: usize = ids.iter().map(|&i| 1 + var_len(i)).sum();
    assert!((bytes.len() + added..=bytes.len() + added + 6).contains(&out.len()));
    if ids.len() == 1 && publish.properties.subscription_id.is_none() {
        // One identifier and none before: mqtt-proto reads it back (it
        // refuses a repeated property, which MQTT 5 allows for this one).
        let mut want = publish.clone();
        want.properties.subscription_id = Some(v5::VarByteInt::try_from(ids[0]).expect("in range"));
        assert_eq!(mqtt::decode(Version::V5, &out), Ok(v5::Packet::Publish(want)));
    }
}

fn var_len(n: u32) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}
