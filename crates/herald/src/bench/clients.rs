//! One real client per transport, each recording what it receives; the
//! HTTP transports speak Herald's routes or Nchan's (see `peer`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use mqtt_proto::{Pid, QoS, QosPid, TopicFilter, v3};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use super::{
    Target, Transport,
    http1::{Http1, split_url},
    peer::{Peer, http_date},
    progress,
    tally::{Recorder, Tally, now_us, parse_payload, payload},
};

/// One subscriber: where it listens, what it records, and how it says
/// "subscribed" (or that it failed).
struct Sub {
    channel: String,
    tally: Arc<Mutex<Tally>>,
    rec: Arc<Recorder>,
    ready: mpsc::Sender<anyhow::Result<()>>,
}

impl Sub {
    fn record(&self, text: &str) {
        if let Some((seq, t)) = parse_payload(text) {
            self.tally.lock().unwrap_or_else(|e| e.into_inner()).record(seq, t, &self.rec);
            progress::received();
        }
    }

    async fn ready(&self) -> anyhow::Result<()> {
        progress::connected();
        self.ready.send(Ok(())).await.context("nobody waits for subscribers")
    }
}

/// What the subscribers of a run share.
struct Ctx {
    peer: Peer,
    server: String,
    mqtt: String,
    /// For streams, which hold their connection for good: nothing to pool.
    /// (Long polls keep one keep-alive connection each, as a browser would:
    /// Nchan answers one message per request, and a new connection for each
    /// would run the machine out of loopback ports during a burst.)
    streams: reqwest::Client,
    /// Where Nchan long pollers start (If-Modified-Since; tag 0): a second
    /// before the channel's primer (see `prime_nchan`), so their first poll
    /// is answered at once with the primer, which says "connected", and from
    /// then on their cursor names a message that exists.
    nchan_since: String,
}

/// Starts one subscriber per tally, spread round-robin over `transports`, and
/// returns once all are subscribed.
pub(super) async fn subscribe_all(
    transports: &[Transport],
    target: &Target,
    channel: &str,
    tallies: &[Arc<Mutex<Tally>>],
    rec: &Arc<Recorder>,
) -> anyhow::Result<usize> {
    let nchan_since = http_date(now_us() / 1_000_000 - 1);
    if target.peer == Peer::Nchan && transports.contains(&Transport::Longpoll) && !tallies.is_empty() {
        prime_nchan(target, channel).await?;
    }
    let ctx = Arc::new(Ctx {
        peer: target.peer,
        server: target.server.clone(),
        mqtt: target.mqtt.clone(),
        streams: reqwest::Client::builder().pool_max_idle_per_host(0).build()?,
        nchan_since,
    });
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(1024);
    // At most this many connections are being set up at once: a burst of
    // thousands of connects would overflow the server's accept backlog
    // (see `--connect-concurrency`).
    let gate = Arc::new(tokio::sync::Semaphore::new(target.connect_concurrency.max(1)));
    for (i, tally) in tallies.iter().enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let (ready, mut signal) = mpsc::channel::<anyhow::Result<()>>(1);
        let ready_all = ready_tx.clone();
        tokio::spawn(async move {
            // The first signal (subscribed, or failed) releases the gate.
            if let Some(r) = signal.recv().await {
                drop(permit);
                let _ = ready_all.send(r).await;
            }
            while let Some(r) = signal.recv().await {
                let _ = ready_all.send(r).await;
            }
        });
        let sub = Sub { channel: channel.to_owned(), tally: tally.clone(), rec: rec.clone(), ready };
        let transport = transports[i % transports.len()];
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = run_one(transport, &ctx, &sub).await {
                let _ = sub.ready.send(Err(e.context(format!("{transport:?}")))).await;
            }
        });
    }
    drop(ready_tx);
    let mut ok = 0;
    while ok < tallies.len() {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => return Err(e.context("a subscriber failed")),
            Ok(None) | Err(_) => bail!("only {ok} of {} subscribers connected", tallies.len()),
        }
    }
    Ok(ok)
}

async fn run_one(transport: Transport, ctx: &Ctx, sub: &Sub) -> anyhow::Result<()> {
    let (peer, server, channel) = (ctx.peer, ctx.server.as_str(), sub.channel.as_str());
    match (transport, peer) {
        (Transport::Sse, _) => sse(&ctx.streams, &peer.sse_url(server, channel), sub).await,
        (Transport::Ws, Peer::Herald) => ws_herald(&peer.ws_url(server, channel), sub).await,
        (Transport::Ws, Peer::Nchan) => ws_nchan(&peer.ws_url(server, channel), sub).await,
        (Transport::Longpoll, Peer::Herald) => longpoll_herald(server, &peer.longpoll_url(server, channel), sub).await,
        (Transport::Longpoll, Peer::Nchan) => {
            longpoll_nchan(server, &peer.longpoll_url(server, channel), &ctx.nchan_since, sub).await
        }
        (Transport::Mqtt0, _) => mqtt(&ctx.mqtt, QoS::Level0, sub).await,
        (Transport::Mqtt1, _) => mqtt(&ctx.mqtt, QoS::Level1, sub).await,
    }
}

/// Both servers send the response head once the subscription is in place.
async fn sse(http: &reqwest::Client, url: &str, sub: &Sub) -> anyhow::Result<()> {
    let res = http.get(url).header("accept", "text/event-stream").send().await?;
    if !res.status().is_success() {
        bail!("SSE: {}", res.status());
    }
    sub.ready().await?;
    let mut events = res.bytes_stream().eventsource();
    while let Some(Ok(e)) = events.next().await {
        sub.record(&e.data);
    }
    Ok(())
}

async fn ws_herald(url: &str, sub: &Sub) -> anyhow::Result<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    let subscribe = format!("{{\"type\":\"subscribe\",\"channel\":\"{}\",\"since\":\"now\"}}", sub.channel);
    socket.send(tokio_tungstenite::tungstenite::Message::text(subscribe)).await?;
    let mut subscribed = false;
    while let Some(Ok(frame)) = socket.next().await {
        let Ok(text) = frame.to_text() else { continue };
        if !subscribed && text.contains("\"subscribed\"") {
            subscribed = true;
            sub.ready().await?;
        } else if text.starts_with("{\"type\":\"message\"") {
            sub.record(text);
        }
    }
    Ok(())
}

/// Nchan subscribes the socket during the upgrade and sends each message as
/// one text frame holding just the published body.
async fn ws_nchan(url: &str, sub: &Sub) -> anyhow::Result<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    sub.ready().await?;
    while let Some(Ok(frame)) = socket.next().await {
        if let Ok(text) = frame.to_text() {
            sub.record(text);
        }
    }
    Ok(())
}

/// One page of Herald's poll answer: only what the bench reads.
#[derive(serde::Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    messages: Vec<PolledMessage<'a>>,
    next: u64,
}

#[derive(serde::Deserialize)]
struct PolledMessage<'a> {
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

async fn longpoll_herald(server: &str, url: &str, sub: &Sub) -> anyhow::Result<()> {
    let (_, path) = split_url(url)?;
    let mut http = Http1::new(server)?;
    let first = http.request("GET", &format!("{path}?since=now"), &[], b"").await?;
    let mut next = serde_json::from_slice::<Page>(&first.body).context("the first poll's answer")?.next;
    sub.ready().await?;
    loop {
        let res = http.request("GET", &format!("{path}?since={next}&wait=30&limit=1000"), &[], b"").await?;
        match res.status {
            200 => {
                let page: Page = serde_json::from_slice(&res.body).context("a poll's answer")?;
                for m in &page.messages {
                    sub.record(m.data.get());
                }
                next = page.next;
            }
            304 => {}
            s => bail!("long poll: {s}"),
        }
    }
}

/// Nchan's long poll answers one message per request. Its cursor is the
/// message's time (Last-Modified, in seconds) and its tag within that second
/// (Etag), sent back as If-Modified-Since and If-None-Match.
async fn longpoll_nchan(server: &str, url: &str, since: &str, sub: &Sub) -> anyhow::Result<()> {
    let (_, path) = split_url(url)?;
    let mut http = Http1::new(server)?;
    let (mut since, mut tag) = (since.to_owned(), "0".to_string());
    let mut ready = false;
    loop {
        let res = http.request("GET", path, &[("if-modified-since", &since), ("if-none-match", &tag)], b"").await?;
        match res.status {
            200 => {
                since = res.header("last-modified").context("Nchan answer without Last-Modified")?.to_owned();
                tag = res.header("etag").context("Nchan answer without Etag")?.to_owned();
                sub.record(&String::from_utf8_lossy(&res.body));
                if !ready {
                    ready = true;
                    sub.ready().await?;
                }
            }
            // Nothing new before nchan_subscriber_timeout: ask again.
            304 | 408 => {}
            s => bail!("Nchan long poll: {s}"),
        }
    }
}

/// Publishes one message that is not a bench payload before Nchan long
/// pollers subscribe (their first answer). Nchan 1.3.6 aborts (spool.c:479, `spool->msg_status ==
/// MSG_INVALID`; nchan issues #534, #720) when many long polls ask for a
/// message after a cursor on a channel that has none; with the primer there
/// is always one.
async fn prime_nchan(target: &Target, channel: &str) -> anyhow::Result<()> {
    let res =
        reqwest::Client::new().post(Peer::Nchan.publish_url(&target.server, channel)).body("primer").send().await?;
    if !res.status().is_success() {
        bail!("priming the Nchan channel: {}", res.status());
    }
    Ok(())
}

async fn mqtt(addr: &str, qos: QoS, sub: &Sub) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connect = v3::Packet::Connect(v3::Connect::new(client_id("bench").into(), 0));
    tcp.write_all(connect.encode()?.as_ref()).await?;
    let filter = TopicFilter::try_from(sub.channel.as_str()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let subscribe = v3::Packet::Subscribe(v3::Subscribe::new(Pid::try_from(1)?, vec![(filter, qos)]));
    tcp.write_all(subscribe.encode()?.as_ref()).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut subscribed = false;
    loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut acks = Vec::new();
        while let Some(len) = whole_packet(&buf) {
            let packet = v3::Packet::decode(&buf[..len]).ok().flatten();
            buf.drain(..len);
            match packet {
                Some(v3::Packet::Suback(_)) if !subscribed => {
                    subscribed = true;
                    sub.ready().await?;
                }
                Some(v3::Packet::Publish(p)) => {
                    sub.record(&String::from_utf8_lossy(&p.payload));
                    if let QosPid::Level1(pid) = p.qos_pid {
                        acks.extend_from_slice(v3::Packet::Puback(pid).encode()?.as_ref());
                    }
                }
                _ => {}
            }
        }
        if !acks.is_empty() {
            tcp.write_all(&acks).await?;
        }
    }
}

/// A client id unique in this run (two clients with one id would take each
/// other's session over).
fn client_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The length of the first whole MQTT packet in `buf`, if it is all there.
fn whole_packet(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// How the messages of a run are published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Via {
    /// HTTP POST to the server's publish route (Herald's or Nchan's).
    Http,
    /// MQTT QoS 1, waiting for each PUBACK: works against any MQTT broker.
    Mqtt,
}

/// Publishes `messages` payloads one after another (so sequence order is id
/// order), in a burst or at `rate` per second. With `retry`, a publish that
/// fails is sent again (Herald: with an Idempotency-Key) until accepted;
/// answers how many retries that took.
pub(super) async fn publish(
    target: &Target,
    channel: &str,
    messages: usize,
    rate: u32,
    via: Via,
    retry: bool,
) -> anyhow::Result<u64> {
    if via == Via::Mqtt {
        return publish_mqtt(&target.mqtt, channel, messages, rate).await.map(|()| 0);
    }
    let url = target.peer.publish_url(&target.server, channel);
    let mut http = Http1::new(&target.server)?;
    let start = Instant::now();
    let mut retries = 0;
    for seq in 0..messages {
        if rate > 0 {
            tokio::time::sleep_until((start + Duration::from_secs_f64(seq as f64 / f64::from(rate))).into()).await;
        }
        if !retry {
            post_json(&mut http, &url, &payload(seq)).await.with_context(|| format!("publish {seq}"))?;
            continue;
        }
        let key = format!("{channel}/{seq}");
        let headers: &[(&str, &str)] = match target.peer {
            super::peer::Peer::Herald => &[("content-type", "application/json"), ("idempotency-key", &key)],
            _ => &[("content-type", "application/json")],
        };
        let (_, path) = split_url(&url)?;
        // Made once: a retry is the same request. (Made anew, its timestamp
        // differed, and a retry of a publish Redis had applied before it
        // died was rightly refused as an idempotency conflict, for ever.)
        let body = payload(seq);
        loop {
            match http.request("POST", path, headers, body.as_bytes()).await {
                Ok(res) if (200..300).contains(&res.status) => break,
                // Refused for what it is: sending it again will not help.
                Ok(res) if (400..500).contains(&res.status) && res.status != 429 => {
                    bail!("publish {seq}: {} {}", res.status, String::from_utf8_lossy(&res.body))
                }
                _ => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    Ok(retries)
}

/// POSTs a JSON body and checks that it was accepted.
pub(super) async fn post_json(http: &mut Http1, url: &str, body: &str) -> anyhow::Result<()> {
    let (_, path) = split_url(url)?;
    let res = http.request("POST", path, &[("content-type", "application/json")], body.as_bytes()).await?;
    if !(200..300).contains(&res.status) {
        bail!("{}: {}", res.status, String::from_utf8_lossy(&res.body));
    }
    progress::sent();
    Ok(())
}

async fn publish_mqtt(addr: &str, channel: &str, messages: usize, rate: u32) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connect = v3::Packet::Connect(v3::Connect::new(client_id("bench-pub").into(), 0));
    tcp.write_all(connect.encode()?.as_ref()).await?;
    let topic = mqtt_proto::TopicName::try_from(channel).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let start = Instant::now();
    for seq in 0..messages {
        if rate > 0 {
            tokio::time::sleep_until((start + Duration::from_secs_f64(seq as f64 / f64::from(rate))).into()).await;
        }
        let pid = Pid::try_from((seq % 65_535 + 1) as u16)?;
        let p = v3::Packet::Publish(v3::Publish::new(QosPid::Level1(pid), topic.clone(), payload(seq).into()));
        tcp.write_all(p.encode()?.as_ref()).await?;
        // Wait for this publish's PUBACK (the CONNACK comes first).
        'acked: loop {
            while let Some(len) = whole_packet(&buf) {
                let packet = v3::Packet::decode(&buf[..len]).ok().flatten();
                buf.drain(..len);
                if matches!(packet, Some(v3::Packet::Puback(p)) if p == pid) {
                    progress::sent();
                    break 'acked;
                }
            }
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                bail!("the broker closed the publishing connection");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(())
}
