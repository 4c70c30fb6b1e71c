//! One real client per transport, each recording what it receives.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use mqtt_proto::{Pid, QoS, QosPid, TopicFilter, v3};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use super::{Tally, Target, Transport, parse_payload};

type Hist = Arc<Mutex<Histogram<u64>>>;

/// Starts one subscriber per tally and returns once all are subscribed.
pub(super) async fn subscribe_all(
    transport: Transport,
    target: &Target,
    channel: &str,
    tallies: &[Arc<Mutex<Tally>>],
    hist: &Hist,
) -> anyhow::Result<usize> {
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(1024);
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    // At most this many connections are being set up at once: a burst of
    // thousands of connects would overflow the server's accept backlog.
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    for tally in tallies {
        let (tally, hist, ready_all) = (tally.clone(), hist.clone(), ready_tx.clone());
        let permit = gate.clone().acquire_owned().await?;
        let (ready, mut signal) = mpsc::channel::<anyhow::Result<()>>(1);
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
        let (server, mqtt_addr, channel, http) =
            (target.server.clone(), target.mqtt.clone(), channel.to_owned(), http.clone());
        tokio::spawn(async move {
            let r = match transport {
                Transport::Sse => sse(&http, &server, &channel, tally, hist, &ready).await,
                Transport::Ws => ws(&server, &channel, tally, hist, &ready).await,
                Transport::Longpoll => longpoll(&http, &server, &channel, tally, hist, &ready).await,
                Transport::Mqtt0 => mqtt(&mqtt_addr, &channel, QoS::Level0, tally, hist, &ready).await,
                Transport::Mqtt1 => mqtt(&mqtt_addr, &channel, QoS::Level1, tally, hist, &ready).await,
            };
            if let Err(e) = r {
                let _ = ready.send(Err(e)).await;
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

fn record(text: &str, tally: &Mutex<Tally>, hist: &Hist) {
    if let Some((seq, t)) = parse_payload(text) {
        tally.lock().unwrap_or_else(|e| e.into_inner()).record(seq, t, hist);
    }
}

async fn sse(
    http: &reqwest::Client,
    server: &str,
    channel: &str,
    tally: Arc<Mutex<Tally>>,
    hist: Hist,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let res = http.get(format!("{server}/api/channels/{channel}/events?since=now")).send().await?;
    if !res.status().is_success() {
        bail!("SSE: {}", res.status());
    }
    ready.send(Ok(())).await?;
    let mut events = res.bytes_stream().eventsource();
    while let Some(Ok(e)) = events.next().await {
        record(&e.data, &tally, &hist);
    }
    Ok(())
}

async fn ws(
    server: &str,
    channel: &str,
    tally: Arc<Mutex<Tally>>,
    hist: Hist,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let url = format!("{}/api/ws", server.replacen("http://", "ws://", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    let sub = format!("{{\"type\":\"subscribe\",\"channel\":\"{channel}\",\"since\":\"now\"}}");
    socket.send(tokio_tungstenite::tungstenite::Message::text(sub)).await?;
    let mut subscribed = false;
    while let Some(Ok(frame)) = socket.next().await {
        let Ok(text) = frame.to_text() else { continue };
        if !subscribed && text.contains("\"subscribed\"") {
            subscribed = true;
            ready.send(Ok(())).await?;
        } else if text.starts_with("{\"type\":\"message\"") {
            record(text, &tally, &hist);
        }
    }
    Ok(())
}

async fn longpoll(
    http: &reqwest::Client,
    server: &str,
    channel: &str,
    tally: Arc<Mutex<Tally>>,
    hist: Hist,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let base = format!("{server}/api/channels/{channel}/messages");
    let first: serde_json::Value = http.get(format!("{base}?since=now")).send().await?.json().await?;
    let mut next = first["next"].as_u64().context("next")?;
    ready.send(Ok(())).await?;
    loop {
        let res = http.get(format!("{base}?since={next}&wait=30&limit=1000")).send().await?;
        if res.status() == 304 {
            continue;
        }
        let page: serde_json::Value = res.json().await?;
        for m in page["messages"].as_array().into_iter().flatten() {
            record(&m["data"].to_string(), &tally, &hist);
        }
        next = page["next"].as_u64().unwrap_or(next);
    }
}

async fn mqtt(
    addr: &str,
    channel: &str,
    qos: QoS,
    tally: Arc<Mutex<Tally>>,
    hist: Hist,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connect = v3::Packet::Connect(v3::Connect::new(client_id("bench").into(), 0));
    tcp.write_all(connect.encode()?.as_ref()).await?;
    let filter = TopicFilter::try_from(channel).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let sub = v3::Packet::Subscribe(v3::Subscribe::new(Pid::try_from(1)?, vec![(filter, qos)]));
    tcp.write_all(sub.encode()?.as_ref()).await?;
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
        loop {
            let Some(len) = whole_packet(&buf) else { break };
            let packet = v3::Packet::decode(&buf[..len]).ok().flatten();
            buf.drain(..len);
            match packet {
                Some(v3::Packet::Suback(_)) if !subscribed => {
                    subscribed = true;
                    ready.send(Ok(())).await?;
                }
                Some(v3::Packet::Publish(p)) => {
                    record(&String::from_utf8_lossy(&p.payload), &tally, &hist);
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

/// Publishes `messages` payloads one after another (so sequence order is id
/// order), in a burst or at `rate` per second: over HTTP, or over MQTT QoS 1
/// (waiting for each PUBACK) when `via_mqtt`, which also works against any
/// MQTT broker for side-by-side runs.
pub(super) async fn publish(
    target: &Target,
    channel: &str,
    messages: usize,
    rate: u32,
    via_mqtt: bool,
) -> anyhow::Result<()> {
    if via_mqtt {
        return publish_mqtt(&target.mqtt, channel, messages, rate).await;
    }
    let http = reqwest::Client::new();
    let url = format!("{}/api/channels/{channel}", target.server);
    let start = Instant::now();
    for seq in 0..messages {
        if rate > 0 {
            tokio::time::sleep_until((start + Duration::from_secs_f64(seq as f64 / f64::from(rate))).into()).await;
        }
        let res = http.post(&url).header("content-type", "application/json").body(super::payload(seq)).send().await?;
        if !res.status().is_success() {
            bail!("publish {seq}: {}", res.status());
        }
    }
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
        let p = v3::Packet::Publish(v3::Publish::new(QosPid::Level1(pid), topic.clone(), super::payload(seq).into()));
        tcp.write_all(p.encode()?.as_ref()).await?;
        // Wait for this publish's PUBACK (the CONNACK comes first).
        'acked: loop {
            while let Some(len) = whole_packet(&buf) {
                let packet = v3::Packet::decode(&buf[..len]).ok().flatten();
                buf.drain(..len);
                if matches!(packet, Some(v3::Packet::Puback(p)) if p == pid) {
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
