//! `herald bench`: a load generator for loopback only, bounded in count and
//! time. It measures a running server (or one it starts itself) from the
//! outside, with real clients of each transport, and reads the server's CPU
//! time and memory from /proc.
//!
//! - `fanout`: N subscribers of one channel, M messages of ~100 bytes each
//!   carrying a sequence number and the send time; reports deliveries per
//!   second, server CPU µs per delivery, latency p50/p99/max, and the lost,
//!   duplicated and out-of-order counts.
//! - `idle`: N connections that just stay; server memory per connection.
//! - `publish`: acknowledged, durable publishes per second with C concurrent
//!   publishers over HTTP.
//!
//! MQTT runs publish over MQTT (QoS 1, one at a time), so the same command
//! measures any MQTT broker side by side (`--mqtt ADDR --pid ITS_PID`). Each
//! connection is a file: raise the soft limit first (`ulimit -n 20000`).

mod clients;
mod proc_stat;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

use self::proc_stat::ProcStat;

#[derive(Subcommand)]
pub(crate) enum Bench {
    /// N subscribers of one channel receive M published messages.
    Fanout(FanoutArgs),
    /// N idle connections; server memory per connection.
    Idle(IdleArgs),
    /// Acknowledged (durable) publishes per second with C concurrent publishers.
    Publish(PublishArgs),
}

#[derive(Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    target: Target,
    /// Concurrent publishers, each on its own keep-alive HTTP connection.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Publishes in all.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Channels the publishes are spread over.
    #[arg(long, default_value_t = 64)]
    channels: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Transport {
    Sse,
    Ws,
    Longpoll,
    Mqtt0,
    Mqtt1,
}

#[derive(Args)]
pub(crate) struct Target {
    /// Server URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// MQTT address of the server.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// PID of the server, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Messages per second; 0 publishes in a burst.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
}

pub(crate) async fn run(b: Bench) -> anyhow::Result<()> {
    match b {
        Bench::Fanout(a) => fanout(a).await,
        Bench::Idle(a) => idle(a).await,
        Bench::Publish(a) => publish(a).await,
    }
}

fn check_loopback(t: &Target) -> anyhow::Result<()> {
    let host = t.server.trim_start_matches("http://").split([':', '/']).next().unwrap_or("");
    let mqtt_host = t.mqtt.split(':').next().unwrap_or("");
    for h in [host, mqtt_host] {
        let ok = h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !ok {
            bail!("herald bench only targets loopback addresses (got '{h}')");
        }
    }
    Ok(())
}

/// What every subscriber records.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) received: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) last_seq: Option<u64>,
    pub(crate) seen: Vec<bool>,
}

impl Tally {
    pub(crate) fn new(messages: usize) -> Self {
        Tally { seen: vec![false; messages], ..Default::default() }
    }

    /// Records one delivery of `seq` sent at `sent_us` (µs since the epoch).
    pub(crate) fn record(&mut self, seq: u64, sent_us: u64, hist: &Mutex<Histogram<u64>>) {
        self.received += 1;
        let Some(slot) = self.seen.get_mut(seq as usize) else { return };
        if *slot {
            self.duplicates += 1;
            return;
        }
        *slot = true;
        if self.last_seq.is_some_and(|l| seq < l) {
            self.out_of_order += 1;
        }
        self.last_seq = Some(seq);
        let latency = now_us().saturating_sub(sent_us).max(1);
        let _ = hist.lock().unwrap_or_else(|e| e.into_inner()).record(latency);
    }

    pub(crate) fn unique(&self) -> u64 {
        self.seen.iter().filter(|s| **s).count() as u64
    }
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// The ~100-byte payload: sequence number, send time, padding.
pub(crate) fn payload(seq: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"t\":{}", now_us());
    let pad = 100usize.saturating_sub(head.len() + 9);
    format!("{head},\"p\":\"{}\"}}", "x".repeat(pad))
}

/// Reads `seq` and `t` back out of a payload (or a message object around it).
pub(crate) fn parse_payload(text: &str) -> Option<(u64, u64)> {
    let num = |key: &str| -> Option<u64> {
        let i = text.find(key)? + key.len();
        let rest = &text[i..];
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Some((num("\"seq\":")?, num("\"t\":")?))
}

async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    check_loopback(&a.target)?;
    let channel = format!("bench/fanout/{}", now_us());
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")));
    let tallies: Vec<Arc<Mutex<Tally>>> =
        (0..a.subscribers).map(|_| Arc::new(Mutex::new(Tally::new(a.messages)))).collect();
    let connect_start = Instant::now();
    let ready =
        clients::subscribe_all(a.transport, &a.target, &channel, &tallies, &hist).await.context("subscribing")?;
    let connect_time = connect_start.elapsed();
    eprintln!("{} subscribers connected in {:.2}s", ready, connect_time.as_secs_f64());

    let server_before = a.target.pid.map(ProcStat::read).transpose()?;
    let tool_before = ProcStat::read_self()?;
    let start = Instant::now();
    let via_mqtt = matches!(a.transport, Transport::Mqtt0 | Transport::Mqtt1);
    clients::publish(&a.target, &channel, a.messages, a.rate, via_mqtt).await?;
    let publish_time = start.elapsed();
    let expected = (a.messages * a.subscribers) as u64;
    let deadline = start + Duration::from_secs(a.timeout);
    loop {
        let unique: u64 = tallies.iter().map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).unique()).sum();
        if unique >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    let server_after = a.target.pid.map(ProcStat::read).transpose()?;
    let tool_after = ProcStat::read_self()?;

    let mut unique = 0;
    let mut dup = 0;
    let mut ooo = 0;
    for t in &tallies {
        let t = t.lock().unwrap_or_else(|e| e.into_inner());
        unique += t.unique();
        dup += t.duplicates;
        ooo += t.out_of_order;
    }
    let hist = hist.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |v: u64| v as f64 / 1000.0;
    println!("transport        {:?}", a.transport);
    println!("subscribers      {}", a.subscribers);
    println!(
        "messages         {} ({})",
        a.messages,
        if a.rate == 0 { "burst".to_string() } else { format!("{}/s", a.rate) }
    );
    println!("publish time     {:.3} s", publish_time.as_secs_f64());
    println!(
        "deliveries       {unique} of {expected} in {:.3} s: {:.0}/s",
        elapsed.as_secs_f64(),
        unique as f64 / elapsed.as_secs_f64()
    );
    println!("lost             {}", expected - unique.min(expected));
    println!("duplicated       {dup}");
    println!("out of order     {ooo}");
    println!("latency p50      {:.2} ms", ms(hist.value_at_quantile(0.5)));
    println!("latency p99      {:.2} ms", ms(hist.value_at_quantile(0.99)));
    println!("latency max      {:.2} ms", ms(hist.max()));
    if let (Some(b), Some(a)) = (server_before, server_after) {
        let cpu = a.cpu_us - b.cpu_us;
        println!(
            "server cpu       {:.3} s, {:.2} µs per delivery",
            cpu as f64 / 1e6,
            cpu as f64 / unique.max(1) as f64
        );
        println!("server rss       {:.1} MB", a.rss_kb as f64 / 1024.0);
    }
    let tool_cpu = tool_after.cpu_us - tool_before.cpu_us;
    println!("bench tool cpu   {:.3} s", tool_cpu as f64 / 1e6);
    Ok(())
}

async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    check_loopback(&a.target)?;
    let pid = a.target.pid.context("--pid of the server is needed to read its memory")?;
    let channel = format!("bench/idle/{}", now_us());
    let before = ProcStat::read(pid)?;
    let start = Instant::now();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("hist")));
    let tallies: Vec<Arc<Mutex<Tally>>> = (0..a.connections).map(|_| Arc::new(Mutex::new(Tally::new(0)))).collect();
    let n = clients::subscribe_all(a.transport, &a.target, &channel, &tallies, &hist).await?;
    let connect = start.elapsed();
    // Let the server settle its buffers before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ProcStat::read(pid)?;
    let per = (after.rss_kb as f64 - before.rss_kb as f64) * 1024.0 / n as f64;
    println!("transport        {:?}", a.transport);
    println!("connections      {n}");
    println!("connect rate     {:.0}/s", n as f64 / connect.as_secs_f64());
    println!("server rss       {:.1} MB -> {:.1} MB", before.rss_kb as f64 / 1024.0, after.rss_kb as f64 / 1024.0);
    println!("memory per conn  {:.2} KB", per / 1024.0);
    Ok(())
}

async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    check_loopback(&a.target)?;
    let prefix = format!("bench/publish/{}", now_us());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")));
    let server_before = a.target.pid.map(ProcStat::read).transpose()?;
    let tool_before = ProcStat::read_self()?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.publishers.max(1) {
        let (next, hist, prefix, server) = (next.clone(), hist.clone(), prefix.clone(), a.target.server.clone());
        let (total, channels) = (a.messages, a.channels.max(1));
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seq >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let sent = Instant::now();
                let res = http
                    .post(format!("{server}/api/channels/{prefix}/{}", seq % channels))
                    .header("content-type", "application/json")
                    .body(payload(seq))
                    .send()
                    .await?;
                if !res.status().is_success() {
                    bail!("publish {seq}: {}", res.status());
                }
                let _ = hist.lock().unwrap_or_else(|e| e.into_inner()).record(sent.elapsed().as_micros().max(1) as u64);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let server_after = a.target.pid.map(ProcStat::read).transpose()?;
    let hist = hist.lock().unwrap_or_else(|e| e.into_inner());
    println!("publishers       {}", a.publishers);
    println!(
        "acknowledged     {} in {:.3} s: {:.0}/s",
        a.messages,
        elapsed.as_secs_f64(),
        a.messages as f64 / elapsed.as_secs_f64()
    );
    println!("ack latency p50  {:.2} ms", hist.value_at_quantile(0.5) as f64 / 1000.0);
    println!("ack latency p99  {:.2} ms", hist.value_at_quantile(0.99) as f64 / 1000.0);
    if let (Some(b), Some(a2)) = (server_before, server_after) {
        let cpu = a2.cpu_us - b.cpu_us;
        println!("server cpu       {:.3} s, {:.2} µs per publish", cpu as f64 / 1e6, cpu as f64 / a.messages as f64);
    }
    let tool = ProcStat::read_self()?.cpu_us - tool_before.cpu_us;
    println!("bench tool cpu   {:.3} s", tool as f64 / 1e6);
    Ok(())
}
