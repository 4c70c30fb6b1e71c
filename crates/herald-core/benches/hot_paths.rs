//! Micro-benchmarks of herald-core's hot paths: what every delivery, subscribe and
//! reconnect pays in the pure core, measured apart from sockets and the store.
//!
//! Run: `cargo bench -p herald-core --bench hot_paths -- --warm-up-time 1 --measurement-time 3`
//!
//! Only public APIs are used. The transports' own wire encoders are private to
//! herald-server, so the `encode` group uses small stand-ins written like them (see
//! `stand_in`); `Message::json` and the per-message cache are the real thing.

use std::{
    collections::BTreeMap,
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald_core::{Channel, CursorToken, Data, EventName, Filter, Hub, Message, Target, Wire};

/// A typical chat message: a short JSON object with an event name.
fn message() -> Message {
    let data = Data::json(Bytes::from_static(
        br#"{"user":"alice","text":"Hello everyone, the build is green again","ts":1732291200123,"mentions":[]}"#,
    ))
    .unwrap();
    let event = Some(EventName::parse("chat").unwrap());
    Message::new(Channel::parse("chat/room/42").unwrap(), 1_234_567, event, data, 1_732_291_200_123)
}

/// Encoders shaped like herald-server's (sse.rs, ws.rs, iframe.rs), which are not
/// public: same buffers, same passes over the bytes, close enough to price a
/// first encode. The JSON object they wrap is the real `Message::json`.
mod stand_in {
    use bytes::Bytes;
    use herald_core::Message;

    fn put_data(out: &mut Vec<u8>, data: &str) {
        for line in data.split(['\r', '\n']) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }

    fn put_event_and_data(out: &mut Vec<u8>, m: &Message, data: &str) {
        if let Some(ev) = &m.event {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(ev.as_str().as_bytes());
            out.push(b'\n');
        }
        put_data(out, data);
    }

    /// `Wire::SseEvent`: `id:`, `event:`, `data:` lines of the payload itself.
    pub(crate) fn sse_event(m: &Message) -> Bytes {
        let mut out = Vec::with_capacity(m.data.len() + 32);
        out.extend_from_slice(format!("id: {}\n", m.id).as_bytes());
        put_event_and_data(&mut out, m, &m.data.as_str());
        Bytes::from(out)
    }

    /// `Wire::SseBody`: `event:` and the message object as `data:`.
    pub(crate) fn sse_body(m: &Message) -> Bytes {
        let json = m.json();
        let mut out = Vec::with_capacity(json.len() + 32);
        put_event_and_data(&mut out, m, std::str::from_utf8(&json).unwrap());
        Bytes::from(out)
    }

    /// `Wire::SseData`: the message object as `data:` lines alone.
    pub(crate) fn sse_data(m: &Message) -> Bytes {
        let json = m.json();
        let mut out = Vec::with_capacity(json.len() + 16);
        put_data(&mut out, std::str::from_utf8(&json).unwrap());
        Bytes::from(out)
    }

    /// `Wire::WsFrame`: `{"type":"message",...}`.
    pub(crate) fn ws_frame(m: &Message) -> Bytes {
        let json = m.json();
        let mut out = Vec::with_capacity(json.len() + 17);
        out.extend_from_slice(b"{\"type\":\"message\",");
        out.extend_from_slice(&json[1..]);
        Bytes::from(out)
    }

    /// `Wire::HtmlScript`: the object with `<`, `>`, `&`, U+2028/9 escaped.
    pub(crate) fn html_script(m: &Message) -> Bytes {
        let json = m.json();
        let mut out = Vec::with_capacity(json.len() + 16);
        let mut i = 0;
        while i < json.len() {
            match json[i] {
                b'<' => out.extend_from_slice(b"\\u003c"),
                b'>' => out.extend_from_slice(b"\\u003e"),
                b'&' => out.extend_from_slice(b"\\u0026"),
                0xE2 if json.get(i + 1) == Some(&0x80) && matches!(json.get(i + 2), Some(0xA8 | 0xA9)) => {
                    out.extend_from_slice(if json[i + 2] == 0xA8 { b"\\u2028" } else { b"\\u2029" });
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        Bytes::from(out)
    }
}

/// One wire format's encoder, as `Message::encoded` takes it.
type Encoder = fn(&Message) -> Bytes;

/// Every delivery asks the message for its bytes in the subscriber's wire format.
/// The first subscriber of each format pays the encode (`first/*`, a fresh message
/// each time); every later one only reads the cache (`cached/*`): that is what one
/// more subscriber costs. Building and dropping the fresh message is not timed.
fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    let wires: [(&str, Wire, Encoder); 6] = [
        ("json", Wire::Json, |m| Bytes::from(m.write_json_object(Vec::new()))),
        ("sse_event", Wire::SseEvent, stand_in::sse_event),
        ("sse_body", Wire::SseBody, stand_in::sse_body),
        ("sse_data", Wire::SseData, stand_in::sse_data),
        ("ws_frame", Wire::WsFrame, stand_in::ws_frame),
        ("html_script", Wire::HtmlScript, stand_in::html_script),
    ];
    g.bench_function("first/json", |b| b.iter_batched_ref(message, |m| m.json(), BatchSize::SmallInput));
    for (name, wire, enc) in wires.iter().skip(1) {
        g.bench_function(format!("first/{name}"), |b| {
            b.iter_batched_ref(message, |m| m.encoded(*wire, enc), BatchSize::SmallInput)
        });
    }
    let m = message();
    for (_, wire, enc) in &wires {
        m.encoded(*wire, enc);
    }
    g.bench_function("cached/json", |b| b.iter(|| black_box(&m).json()));
    g.bench_function("cached/sse_event", |b| b.iter(|| black_box(&m).encoded(Wire::SseEvent, stand_in::sse_event)));
    g.finish();
}

/// Every publish and subscribe request parses its channel names; every
/// multi-channel subscribe parses filters; the hub matches each published message
/// against every wildcard subscription; grants are checked with `is_covered_by`.
fn channels_and_filters(c: &mut Criterion) {
    let mut g = c.benchmark_group("channel");
    g.bench_function("parse/short", |b| b.iter(|| Channel::parse(black_box("chat/room/42"))));
    let long = "org-7/team.backend/project~herald/env:prod/svc@eu-west/region_3/shard-17/events";
    g.bench_function("parse/8_segments", |b| b.iter(|| Channel::parse(black_box(long))));
    g.bench_function("parse/rejected", |b| b.iter(|| Channel::parse(black_box("chat/../admin"))));
    g.finish();

    let mut g = c.benchmark_group("filter");
    g.bench_function("parse/plus", |b| b.iter(|| Filter::parse(black_box("chat/+/messages"))));
    g.bench_function("parse/hash", |b| b.iter(|| Filter::parse(black_box("org-7/team.backend/#"))));
    let ch = Channel::parse("chat/room/42").unwrap();
    let dollar = Channel::parse("$SYS/broker/uptime").unwrap();
    let cases = [
        ("exact_hit", "chat/room/42", &ch),
        ("exact_miss", "chat/room/43", &ch),
        ("plus_hit", "chat/+/42", &ch),
        ("plus_miss", "chat/+", &ch),
        ("hash_hit", "chat/#", &ch),
        ("hash_all", "#", &ch),
        ("hash_dollar_refused", "#", &dollar),
    ];
    for (name, filter, channel) in cases {
        let f = Filter::parse(filter).unwrap();
        g.bench_function(format!("matches/{name}"), |b| b.iter(|| black_box(&f).matches(black_box(channel))));
    }
    let narrow = Filter::parse("chat/room/+").unwrap();
    let hash = Filter::parse("chat/#").unwrap();
    let plus = Filter::parse("chat/+/+").unwrap();
    let other = Filter::parse("news/#").unwrap();
    g.bench_function("is_covered_by/hash", |b| b.iter(|| black_box(&narrow).is_covered_by(black_box(&hash))));
    g.bench_function("is_covered_by/plus", |b| b.iter(|| black_box(&narrow).is_covered_by(black_box(&plus))));
    g.bench_function("is_covered_by/miss", |b| b.iter(|| black_box(&narrow).is_covered_by(black_box(&other))));
    g.finish();
}

/// A multi-channel SSE stream writes a cursor token with every event, and every
/// reconnect decodes one; their size grows with the number of channels.
fn cursor_tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("cursor_token");
    for n in [1usize, 8, 64] {
        let map: BTreeMap<Channel, u64> =
            (0..n).map(|i| (Channel::parse(&format!("chat/room/{i}")).unwrap(), 1_000_000 + i as u64 * 7919)).collect();
        let token = CursorToken(map);
        let text = token.encode();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("encode", n), &token, |b, t| b.iter(|| black_box(t).encode()));
        g.bench_with_input(BenchmarkId::new("decode", n), &text, |b, s| b.iter(|| CursorToken::decode(black_box(s))));
    }
    g.finish();
}

/// Publishes `ITERS` messages to mailboxes that start empty, timing only
/// `Hub::publish`, then drains every mailbox untimed so queues never fill (a full
/// queue takes the cheaper "lagged" path and would flatter the numbers).
fn time_publishes(hub: &Hub, subs: &mut [herald_core::Subscriber], batch: &[Arc<Message>], iters: u64) -> Duration {
    const CHUNK: u64 = 32;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let start = Instant::now();
        for _ in 0..n {
            hub.publish(black_box(batch));
        }
        total += start.elapsed();
        for s in subs.iter_mut() {
            while s.try_recv().is_some() {}
            debug_assert!(!s.take_lagged());
        }
        left -= n;
    }
    total
}

/// Every committed message goes through `Hub::publish`, once per matching
/// subscriber: an `Arc` clone and a `try_send` into its mailbox. Reported per
/// subscriber (throughput = N elements), so the per-enqueue cost is the time
/// divided by N.
fn hub_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_fanout");
    let batch = [Arc::new(message())];
    let channel = batch[0].channel.clone();
    for n in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        // Subscribers of the channel itself (the hub's exact map).
        let hub = Hub::new(1024);
        let mut subs: Vec<_> = (0..n)
            .map(|_| {
                let mut s = hub.subscriber();
                s.add(Target::Channel(channel.clone()));
                s
            })
            .collect();
        g.bench_function(BenchmarkId::new("exact", n), |b| {
            b.iter_custom(|iters| time_publishes(&hub, &mut subs, &batch, iters))
        });
        // The same, with the subscribers' side included: publish, then each
        // subscriber takes its message out (what a delivery loop does).
        g.bench_function(BenchmarkId::new("exact_with_recv", n), |b| {
            b.iter(|| {
                hub.publish(black_box(&batch));
                for s in subs.iter_mut() {
                    black_box(s.try_recv());
                }
            })
        });
        drop(subs);
        // Wildcard subscribers: the hub scans every filter and matches each.
        let hub = Hub::new(1024);
        let mut subs: Vec<_> = (0..n)
            .map(|_| {
                let mut s = hub.subscriber();
                s.add(Target::Filter(Filter::parse("chat/+/42").unwrap()));
                s
            })
            .collect();
        g.bench_function(BenchmarkId::new("filter", n), |b| {
            b.iter_custom(|iters| time_publishes(&hub, &mut subs, &batch, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, encode, channels_and_filters, cursor_tokens, hub_fanout);
criterion_main!(benches);
