//! The only code that touches MQTT bytes: framing packets off a byte stream and
//! translating between wire versions.
//!
//! The broker speaks MQTT 5 internally. A 3.1/3.1.1 client's packets are
//! lifted into their v5 form on the way in (properties empty, reason codes
//! "success") and lowered again on the way out, so session logic exists once.
//! Packet encoding and decoding is `mqtt-proto`'s.

use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Protocol, QoS,
    v3::{self, ConnectReturnCode, SubscribeReturnCode},
    v5::{
        self, ConnectReasonCode, DisconnectReasonCode, PubackReasonCode, PubcompReasonCode, PubrecReasonCode,
        PubrelReasonCode, RetainHandling, SubscribeReasonCode, SubscriptionOptions,
    },
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The protocol a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V3,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {0} bytes is over the maximum")]
    TooLarge(usize),
}

/// Frames packets off a byte stream. `next` is cancel-safe (bytes read are
/// kept in the buffer until a whole packet is there), so the connection can
/// wait for a packet in the same `select!` as everything else, without a
/// reader task and a channel of its own.
pub(crate) struct Framer<R> {
    rd: R,
    /// Bytes of a packet not yet whole; empty (no allocation) between packets.
    buf: BytesMut,
    /// Where an idle connection's next bytes land: most packets a device
    /// sends (PINGREQ, acks, small publishes) fit, and a waiting connection
    /// then holds no heap buffer (it held 272 bytes, heaptrack).
    first: [u8; FIRST_READ],
    max: usize,
}

const FIRST_READ: usize = 64;
/// Room reserved per read while a packet is being completed.
const READ_ROOM: usize = 256;

impl<R: AsyncRead + Unpin> Framer<R> {
    pub(crate) fn new(rd: R, max: usize) -> Self {
        Framer { rd, buf: BytesMut::new(), first: [0; FIRST_READ], max }
    }

    /// The next whole packet (fixed header included); one over `max` bytes is
    /// refused from its header, before its body is read.
    pub(crate) async fn next(&mut self) -> Result<Bytes, ReadError> {
        loop {
            if let Some(len) = whole_packet(&self.buf, self.max)? {
                let packet = self.buf.split_to(len).freeze();
                if self.buf.is_empty() {
                    // Let go of the allocation the packet now owns.
                    self.buf = BytesMut::new();
                }
                return Ok(packet);
            }
            let read = if self.buf.is_empty() {
                let n = self.rd.read(&mut self.first).await?;
                self.buf.extend_from_slice(&self.first[..n]);
                n
            } else {
                if self.buf.capacity() - self.buf.len() < READ_ROOM {
                    self.buf.reserve(READ_ROOM);
                }
                self.rd.read_buf(&mut self.buf).await?
            };
            if read == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// The read half back, to drain it after a close.
    pub(crate) fn into_inner(self) -> R {
        self.rd
    }
}

/// The length of the first packet in `buf` when it is all there.
pub(crate) fn whole_packet(buf: &[u8], max: usize) -> Result<Option<usize>, ReadError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + remaining;
            if total > max {
                return Err(ReadError::TooLarge(total));
            }
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(ReadError::BadLength)
}

/// The version a CONNECT packet asks for, from its protocol level byte.
pub(crate) fn connect_version(packet: &[u8]) -> Option<Version> {
    // Fixed header, then a 2-byte length and the protocol name.
    let mut i = 1;
    while packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let name_len = usize::from(u16::from_be_bytes([*packet.get(i + 1)?, *packet.get(i + 2)?]));
    match packet.get(i + 3 + name_len)? {
        3 | 4 => Some(Version::V3),
        5 => Some(Version::V5),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed packet: {0}")]
pub(crate) struct DecodeError(pub(crate) String);

/// Decodes a packet as v5, lifting v3 packets.
/// Whether a framed packet is a PUBLISH (type 3), without decoding it.
pub(crate) fn is_publish(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|b| b >> 4 == 3)
}

pub(crate) fn decode(version: Version, bytes: &[u8]) -> Result<v5::Packet, DecodeError> {
    match version {
        Version::V5 => match v5::Packet::decode(bytes) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(DecodeError("truncated".into())),
            Err(e) => Err(DecodeError(format!("{e:?}"))),
        },
        Version::V3 => match v3::Packet::decode(bytes) {
            Ok(Some(p)) => Ok(lift(p)),
            Ok(None) => Err(DecodeError("truncated".into())),
            Err(e) => Err(DecodeError(format!("{e:?}"))),
        },
    }
}

/// Encodes a v5 packet for the connection's version; `None` when the packet
/// has no v3 form (AUTH) and is not sent.
pub(crate) fn encode(version: Version, packet: &v5::Packet) -> Option<Vec<u8>> {
    let bytes = match (version, packet) {
        // mqtt-proto writes a v3 SUBACK failure as 3, not 0x80; write it here.
        (Version::V3, v5::Packet::Suback(s)) => v3_suback(s),
        (Version::V5, _) => packet.encode().ok()?.as_ref().to_vec(),
        (Version::V3, _) => lower(packet)?.encode().ok()?.as_ref().to_vec(),
    };
    Some(bytes)
}

fn v3_suback(s: &v5::Suback) -> Vec<u8> {
    let mut body = s.pid.value().to_be_bytes().to_vec();
    body.extend(s.topics.iter().map(|c| match c {
        SubscribeReasonCode::GrantedQoS0 => 0x00,
        SubscribeReasonCode::GrantedQoS1 => 0x01,
        SubscribeReasonCode::GrantedQoS2 => 0x02,
        _ => 0x80,
    }));
    let mut out = vec![0x90];
    put_var_int(&mut out, body.len());
    out.extend(body);
    out
}

fn put_var_int(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn var_int(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut n = 0usize;
    for i in 0..4 {
        let b = *bytes.get(at + i)?;
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

/// Adds subscription identifiers to an encoded MQTT 5 PUBLISH (mqtt-proto
/// carries one): each becomes property 0x0B at the end of the properties,
/// and both lengths are rewritten.
pub(crate) fn add_subscription_ids(packet: Vec<u8>, ids: &[u32]) -> Option<Vec<u8>> {
    if ids.is_empty() {
        return Some(packet);
    }
    let (_, len_bytes) = var_int(&packet, 1)?;
    let header_end = 1 + len_bytes;
    let topic_len = usize::from(u16::from_be_bytes([*packet.get(header_end)?, *packet.get(header_end + 1)?]));
    let qos = (packet[0] >> 1) & 0b11;
    let props_at = header_end + 2 + topic_len + if qos > 0 { 2 } else { 0 };
    let (props_len, props_len_bytes) = var_int(&packet, props_at)?;
    let props_end = props_at + props_len_bytes + props_len;
    let mut extra = Vec::new();
    for id in ids {
        extra.push(0x0B);
        put_var_int(&mut extra, *id as usize);
    }
    let mut props = packet.get(props_at + props_len_bytes..props_end)?.to_vec();
    props.extend(extra);
    let mut body = packet.get(header_end..props_at)?.to_vec();
    put_var_int(&mut body, props.len());
    body.extend(props);
    body.extend_from_slice(packet.get(props_end..)?);
    let mut out = vec![packet[0]];
    put_var_int(&mut out, body.len());
    out.extend(body);
    Some(out)
}

fn lift(p: v3::Packet) -> v5::Packet {
    use v5::Packet as P5;
    match p {
        v3::Packet::Connect(c) => P5::Connect(v5::Connect {
            protocol: c.protocol,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            properties: Default::default(),
            client_id: c.client_id,
            last_will: c.last_will.map(|w| v5::LastWill {
                qos: w.qos,
                retain: w.retain,
                topic_name: w.topic_name,
                payload: w.message,
                properties: Default::default(),
            }),
            username: c.username,
            password: c.password,
        }),
        v3::Packet::Publish(p) => P5::Publish(v5::Publish {
            dup: p.dup,
            retain: p.retain,
            qos_pid: p.qos_pid,
            topic_name: p.topic_name,
            payload: p.payload,
            properties: Default::default(),
        }),
        v3::Packet::Puback(pid) => P5::Puback(v5::Puback::new_success(pid)),
        v3::Packet::Pubrec(pid) => P5::Pubrec(v5::Pubrec::new_success(pid)),
        v3::Packet::Pubrel(pid) => P5::Pubrel(v5::Pubrel::new_success(pid)),
        v3::Packet::Pubcomp(pid) => P5::Pubcomp(v5::Pubcomp::new_success(pid)),
        v3::Packet::Subscribe(s) => P5::Subscribe(v5::Subscribe {
            pid: s.pid,
            properties: Default::default(),
            topics: s
                .topics
                .into_iter()
                .map(|(f, qos)| {
                    let opts = SubscriptionOptions {
                        max_qos: qos,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: RetainHandling::SendAtSubscribe,
                    };
                    (f, opts)
                })
                .collect(),
        }),
        v3::Packet::Unsubscribe(u) => {
            P5::Unsubscribe(v5::Unsubscribe { pid: u.pid, properties: Default::default(), topics: u.topics })
        }
        v3::Packet::Pingreq => P5::Pingreq,
        v3::Packet::Pingresp => P5::Pingresp,
        v3::Packet::Disconnect => P5::Disconnect(v5::Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnect,
            properties: Default::default(),
        }),
        // Server-to-client packets arriving from a client: a protocol error
        // the session reports; lifted into something it will refuse.
        v3::Packet::Connack(_) | v3::Packet::Suback(_) | v3::Packet::Unsuback(_) => P5::Pingresp,
    }
}

fn lower(p: &v5::Packet) -> Option<v3::Packet> {
    use v3::Packet as P3;
    Some(match p {
        v5::Packet::Connack(c) => P3::Connack(v3::Connack {
            session_present: c.session_present,
            code: match c.reason_code {
                ConnectReasonCode::Success => ConnectReturnCode::Accepted,
                ConnectReasonCode::UnsupportedProtocolVersion => ConnectReturnCode::UnacceptableProtocolVersion,
                ConnectReasonCode::ClientIdentifierNotValid => ConnectReturnCode::IdentifierRejected,
                ConnectReasonCode::BadUserNameOrPassword => ConnectReturnCode::BadUserNameOrPassword,
                ConnectReasonCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
                _ => ConnectReturnCode::ServerUnavailable,
            },
        }),
        v5::Packet::Publish(p) => P3::Publish(v3::Publish {
            dup: p.dup,
            retain: p.retain,
            qos_pid: p.qos_pid,
            topic_name: p.topic_name.clone(),
            payload: p.payload.clone(),
        }),
        v5::Packet::Puback(a) => P3::Puback(a.pid),
        v5::Packet::Pubrec(a) => P3::Pubrec(a.pid),
        v5::Packet::Pubrel(a) => P3::Pubrel(a.pid),
        v5::Packet::Pubcomp(a) => P3::Pubcomp(a.pid),
        v5::Packet::Suback(s) => P3::Suback(v3::Suback {
            pid: s.pid,
            topics: s
                .topics
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::GrantedQoS0 => SubscribeReturnCode::MaxLevel0,
                    SubscribeReasonCode::GrantedQoS1 => SubscribeReturnCode::MaxLevel1,
                    SubscribeReasonCode::GrantedQoS2 => SubscribeReturnCode::MaxLevel2,
                    _ => SubscribeReturnCode::Failure,
                })
                .collect(),
        }),
        v5::Packet::Unsuback(u) => P3::Unsuback(u.pid),
        v5::Packet::Pingresp => P3::Pingresp,
        // v3 has no server DISCONNECT and no AUTH: the connection just closes.
        _ => return None,
    })
}

/// Builders for the acknowledgements the broker sends.
pub(crate) fn puback(pid: mqtt_proto::Pid, code: PubackReasonCode) -> v5::Packet {
    v5::Packet::Puback(v5::Puback::new(pid, code))
}

pub(crate) fn pubrec(pid: mqtt_proto::Pid, code: PubrecReasonCode) -> v5::Packet {
    v5::Packet::Pubrec(v5::Pubrec::new(pid, code))
}

pub(crate) fn pubrel(pid: mqtt_proto::Pid) -> v5::Packet {
    v5::Packet::Pubrel(v5::Pubrel::new(pid, PubrelReasonCode::Success))
}

pub(crate) fn pubcomp(pid: mqtt_proto::Pid, code: PubcompReasonCode) -> v5::Packet {
    v5::Packet::Pubcomp(v5::Pubcomp::new(pid, code))
}

pub(crate) fn qos_u8(q: QoS) -> u8 {
    q as u8
}

/// Whether the CONNECT's protocol name and level form one we speak.
pub(crate) fn supported(p: Protocol) -> bool {
    matches!(p, Protocol::V310 | Protocol::V311 | Protocol::V500)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_proto::QosPid;

    #[tokio::test]
    async fn the_framer_returns_whole_packets_however_the_bytes_arrive() {
        // A PINGREQ, then a PUBLISH whose bytes come in three reads.
        let publish = [0x30, 5, 0, 1, b't', b'h', b'i'];
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut f = Framer::new(rx, 1024);
        use tokio::io::AsyncWriteExt;
        tx.write_all(&[0xc0, 0, publish[0]]).await.unwrap();
        assert_eq!(&f.next().await.unwrap()[..], [0xc0, 0]);
        let rest = tokio::spawn(async move {
            tx.write_all(&publish[1..3]).await.unwrap();
            tokio::task::yield_now().await;
            tx.write_all(&publish[3..]).await.unwrap();
            tx
        });
        assert_eq!(&f.next().await.unwrap()[..], publish);
        drop(rest.await.unwrap());
        assert!(matches!(f.next().await, Err(ReadError::Closed)));
    }

    #[tokio::test]
    async fn the_framer_refuses_oversize_and_malformed_lengths_from_the_header() {
        let mut f = Framer::new(&[0x30, 0xff, 0x01][..], 64); // 2 + 255 bytes
        assert!(matches!(f.next().await, Err(ReadError::TooLarge(258))));
        let mut f = Framer::new(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01][..], 1 << 30);
        assert!(matches!(f.next().await, Err(ReadError::BadLength)));
    }

    #[test]
    fn v3_suback_refusal_is_0x80() {
        let s = v5::Suback {
            pid: mqtt_proto::Pid::try_from(1).unwrap(),
            properties: Default::default(),
            topics: vec![SubscribeReasonCode::NotAuthorized, SubscribeReasonCode::GrantedQoS1],
        };
        assert_eq!(encode(Version::V3, &v5::Packet::Suback(s)).unwrap(), [0x90, 4, 0, 1, 0x80, 0x01]);
    }

    #[test]
    fn extra_subscription_ids_decode() {
        let mut p = v5::Publish::new(
            QosPid::Level1(mqtt_proto::Pid::try_from(7).unwrap()),
            mqtt_proto::TopicName::try_from("a/b").unwrap(),
            bytes::Bytes::from_static(b"hi"),
        );
        p.properties.subscription_id = Some(v5::VarByteInt::try_from(2).unwrap());
        let bytes = v5::Packet::Publish(p).encode().unwrap().as_ref().to_vec();
        let more = add_subscription_ids(bytes.clone(), &[300]).unwrap();
        // (mqtt-proto's own decoder refuses a repeated property, which MQTT 5
        // allows for this one, so the packet is checked field by field.)
        let (remaining, n) = var_int(&more, 1).unwrap();
        assert_eq!(1 + n + remaining, more.len(), "remaining length rewritten");
        let props_at = 1 + n + 2 + 3 + 2;
        let (props_len, m) = var_int(&more, props_at).unwrap();
        let props = &more[props_at + m..props_at + m + props_len];
        assert_eq!(props, [0x0B, 0x02, 0x0B, 0xAC, 0x02], "both identifiers, 300 as a variable-length integer");
        assert_eq!(&more[props_at + m + props_len..], b"hi", "the payload follows unchanged");
        assert!(more.windows(3).any(|w| w == [0x0B, 0xAC, 0x02]), "id 300 as a variable-length integer");
    }
}
