//! `herald bench`: a load generator for loopback only, bounded in count and
//! time. It measures a running server from the outside, with real clients of
//! each transport, and reads the server's CPU time and memory from /proc.
//!
//! - `fanout`: N subscribers of one channel, M messages of ~100 bytes each
//!   carrying a sequence number and the send time; reports deliveries per
//!   second, server CPU µs per delivery, latency p50/p99/max, and the lost,
//!   duplicated and out-of-order counts.
//! - `idle`: N connections that just stay; server memory per connection.
//! - `publish`: acknowledged, durable publishes per second with C concurrent
//!   publishers over HTTP.
//!
//! The same workloads run against peers: `--peer nchan` speaks Nchan's routes
//! (bench/nchan.conf) for SSE, WebSocket and long poll; MQTT runs publish over
//! MQTT (QoS 1, one at a time), so they measure any broker (`--mqtt ADDR`).
//! Each connection is a file, and one process may hold at most 20,000: larger
//! runs split the subscribers over processes on one `--channel`, each with
//! `--publisher none`, and one more with `--subscribers 0` publishes
//! (bench/compare.sh does this). Raise the soft limit first (`ulimit -n 20000`).
//!
//! Every report ends with one `summary key=value ...` line for scripts. On a
//! terminal a progress line (stderr) shows the run as it goes.

mod clients;
mod http1;
mod peer;
mod proc_stat;
mod progress;
mod report;
mod tally;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

use self::{
    clients::Via,
    peer::Peer,
    proc_stat::ProcStat,
    report::Summary,
    tally::{Recorder, Tally, now_us, payload},
};

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

impl Transport {
    fn is_mqtt(self) -> bool {
        matches!(self, Transport::Mqtt0 | Transport::Mqtt1)
    }
}

/// `sse,ws`: the names as given on the command line.
fn names(transports: &[Transport]) -> String {
    let name = |t: &Transport| t.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
    transports.iter().map(name).collect::<Vec<_>>().join(",")
}

#[derive(Args)]
pub(crate) struct Target {
    /// Server URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// MQTT address of the server (or of any MQTT broker).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// PID of the server, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Whose HTTP routes `--server` serves.
    #[arg(long, value_enum, default_value = "herald")]
    peer: Peer,
    /// Subscribers connecting at once. Beyond the server's accept backlog
    /// (Herald 128, Mosquitto 100), dropped SYNs cost a second each and the
    /// connect rate measures retransmits: several client processes together
    /// stay below it too.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
}

/// Who publishes a fan-out run's messages.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Publisher {
    /// Over MQTT when every transport is MQTT, else over HTTP.
    Auto,
    Http,
    Mqtt,
    /// Someone else: another `herald bench fanout --subscribers 0 --channel C`.
    None,
}

impl Publisher {
    fn via(self, transports: &[Transport]) -> Option<Via> {
        match self {
            Publisher::Auto if transports.iter().all(|t| t.is_mqtt()) => Some(Via::Mqtt),
            Publisher::Auto | Publisher::Http => Some(Via::Http),
            Publisher::Mqtt => Some(Via::Mqtt),
            Publisher::None => None,
        }
    }
}

#[derive(Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    target: Target,
    /// Transports, comma-separated (e.g. sse,ws,longpoll,mqtt0): subscribers
    /// are spread over them round-robin.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sse")]
    transport: Vec<Transport>,
    /// Subscribers; 0 only publishes (to subscribers of other processes).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Messages per second; 0 publishes in a burst.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Give up waiting for deliveries after this many seconds (counted from
    /// the moment all subscribers are connected).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// The channel; default, a fresh one per run. Several processes given
    /// the same one share a run.
    #[arg(long)]
    channel: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    publisher: Publisher,
    /// Retry a refused or failed publish (HTTP) until it is accepted, with an
    /// Idempotency-Key on Herald (Nchan has none), instead of giving up: for
    /// runs that fail the store on purpose. The retries are reported.
    #[arg(long)]
    retry: bool,
    /// Also write the latency histogram to this file, one `µs count` line per
    /// value, so that several processes' latencies merge into exact quantiles.
    #[arg(long)]
    latencies: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Transports, comma-separated, spread round-robin as in `fanout`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sse")]
    transport: Vec<Transport>,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The channel; default, a fresh one per run.
    #[arg(long)]
    channel: Option<String>,
    /// Keep the connections open this many seconds after reporting, so a
    /// script can read the server's memory with several processes connected.
    #[arg(long, default_value_t = 0)]
    hold: u64,
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

fn tallies(subscribers: usize, messages: usize) -> Vec<Arc<Mutex<Tally>>> {
    (0..subscribers).map(|_| Arc::new(Mutex::new(Tally::new(messages)))).collect()
}

/// Connects every subscriber, then says so on stdout (`ready N`): a script
/// running several client processes waits for that line from each.
async fn connect(
    transports: &[Transport],
    target: &Target,
    channel: &str,
    tallies: &[Arc<Mutex<Tally>>],
    rec: &Arc<Recorder>,
) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let n = clients::subscribe_all(transports, target, channel, tallies, rec).await.context("subscribing")?;
    let took = start.elapsed();
    eprintln!("{n} subscribers connected in {:.2}s", took.as_secs_f64());
    println!("ready {n}");
    Ok((n, took))
}

/// Sums over subscribers.
#[derive(Default)]
struct Counts {
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
}

impl Counts {
    fn sum(tallies: &[Arc<Mutex<Tally>>]) -> Self {
        let mut c = Counts::default();
        for t in tallies {
            let t = t.lock().unwrap_or_else(|e| e.into_inner());
            c.unique += t.unique;
            c.duplicates += t.duplicates;
            c.out_of_order += t.out_of_order;
        }
        c
    }
}

async fn wait_for_deliveries(tallies: &[Arc<Mutex<Tally>>], expected: u64, deadline: Instant) {
    while Counts::sum(tallies).unique < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    check_loopback(&a.target)?;
    let channel = a.channel.clone().unwrap_or_else(|| format!("bench/fanout/{}", now_us()));
    let rec = Arc::new(Recorder::new());
    let tallies = tallies(a.subscribers, a.messages);
    let via = a.publisher.via(&a.transport);
    let progress = progress::Progress::start(progress::Expect {
        connections: a.subscribers as u64,
        sent: if via.is_some() { a.messages as u64 } else { 0 },
        received: (a.messages * a.subscribers) as u64,
    });
    let (ready, connect_time) = connect(&a.transport, &a.target, &channel, &tallies, &rec).await?;

    let server_before = a.target.pid.map(ProcStat::read).transpose()?;
    let tool_before = ProcStat::read_self()?;
    let start = Instant::now();
    let mut retries = 0;
    if let Some(via) = via {
        retries = clients::publish(&a.target, &channel, a.messages, a.rate, via, a.retry).await?;
    }
    let publish_time = start.elapsed();
    let expected = (a.messages * a.subscribers) as u64;
    wait_for_deliveries(&tallies, expected, start + Duration::from_secs(a.timeout)).await;
    let elapsed = start.elapsed();
    let server_after = a.target.pid.map(ProcStat::read).transpose()?;
    let tool_cpu = ProcStat::read_self()?.cpu_us - tool_before.cpu_us;
    drop(progress);

    let counts = Counts::sum(&tallies);
    // From the first message sent to the last received: exact, and known
    // even when another process published.
    let window = rec.window_secs().unwrap_or(elapsed.as_secs_f64());
    let hist = rec.hist();
    let ms = |v: u64| (!hist.is_empty()).then_some(v as f64 / 1000.0);
    let (p50, p99, max) = (ms(hist.value_at_quantile(0.5)), ms(hist.value_at_quantile(0.99)), ms(hist.max()));
    println!("peer             {}", a.target.peer.name());
    println!("transport        {}", names(&a.transport));
    println!("subscribers      {}", a.subscribers);
    println!(
        "messages         {} ({})",
        a.messages,
        if a.rate == 0 { "burst".to_string() } else { format!("{}/s", a.rate) }
    );
    println!("connect rate     {:.0}/s", ready as f64 / connect_time.as_secs_f64());
    if via.is_some() {
        println!("publish time     {:.3} s", publish_time.as_secs_f64());
    }
    println!(
        "deliveries       {} of {expected} in {window:.3} s: {:.0}/s",
        counts.unique,
        counts.unique as f64 / window
    );
    println!("lost             {}", expected - counts.unique.min(expected));
    println!("duplicated       {}", counts.duplicates);
    println!("out of order     {}", counts.out_of_order);
    println!("latency p50      {:.2} ms", p50.unwrap_or(0.0));
    println!("latency p99      {:.2} ms", p99.unwrap_or(0.0));
    println!("latency max      {:.2} ms", max.unwrap_or(0.0));
    // Another process's publishing would be counted here too: server CPU
    // belongs to the run that publishes.
    let server_cpu = match (server_before, server_after, via) {
        (Some(b), Some(a), Some(_)) => Some((a.cpu_us - b.cpu_us) as f64),
        _ => None,
    };
    let per_delivery = server_cpu.filter(|_| counts.unique > 0).map(|c| c / counts.unique as f64);
    match (server_cpu, per_delivery) {
        (Some(cpu), Some(per)) => println!("server cpu       {:.3} s, {per:.2} µs per delivery", cpu / 1e6),
        (Some(cpu), None) => println!("server cpu       {:.3} s", cpu / 1e6),
        _ => {}
    }
    if let Some(after) = server_after {
        println!("server rss       {:.1} MB", after.rss_kb as f64 / 1024.0);
    }
    println!("bench tool cpu   {:.3} s", tool_cpu as f64 / 1e6);
    Summary::new("fanout")
        .add("peer", a.target.peer.name())
        .add("transport", names(&a.transport))
        .add("subscribers", a.subscribers)
        .add("messages", a.messages)
        .add("rate", a.rate)
        .add("ready", ready)
        .num("connect_s", Some(connect_time.as_secs_f64()), 3)
        .num("connect_per_s", Some(ready as f64 / connect_time.as_secs_f64()), 0)
        .num("publish_s", via.map(|_| publish_time.as_secs_f64()), 3)
        .add("deliveries", counts.unique)
        .add("expected", expected)
        .num("window_s", Some(window), 3)
        .num("per_s", Some(counts.unique as f64 / window), 0)
        .add("lost", expected - counts.unique.min(expected))
        .add("dup", counts.duplicates)
        .add("ooo", counts.out_of_order)
        .add("retries", retries)
        .num("p50_ms", p50, 2)
        .num("p99_ms", p99, 2)
        .num("max_ms", max, 2)
        .num("server_cpu_s", server_cpu.map(|c| c / 1e6), 3)
        .num("server_us_per_delivery", per_delivery, 2)
        .num("server_rss_mb", server_after.map(|s| s.rss_kb as f64 / 1024.0), 1)
        .num("tool_cpu_s", Some(tool_cpu as f64 / 1e6), 3)
        .print();
    drop(hist);
    if let Some(path) = &a.latencies {
        rec.write_latencies(path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    check_loopback(&a.target)?;
    let channel = a.channel.clone().unwrap_or_else(|| format!("bench/idle/{}", now_us()));
    let before = a.target.pid.map(ProcStat::read).transpose()?;
    let rec = Arc::new(Recorder::new());
    let tallies = tallies(a.connections, 0);
    let progress =
        progress::Progress::start(progress::Expect { connections: a.connections as u64, ..Default::default() });
    let (n, connect_time) = connect(&a.transport, &a.target, &channel, &tallies, &rec).await?;
    drop(progress);
    let rate = n as f64 / connect_time.as_secs_f64();
    println!("peer             {}", a.target.peer.name());
    println!("transport        {}", names(&a.transport));
    println!("connections      {n}");
    println!("connect rate     {rate:.0}/s");
    let mut summary = Summary::new("idle");
    summary.add("peer", a.target.peer.name()).add("transport", names(&a.transport)).add("connections", n);
    summary.num("connect_per_s", Some(rate), 0);
    if let (Some(pid), Some(before)) = (a.target.pid, before) {
        // Let the server settle its buffers before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = ProcStat::read(pid)?;
        let per_kb = (after.rss_kb as f64 - before.rss_kb as f64) / n.max(1) as f64;
        let mb = |kb: u64| kb as f64 / 1024.0;
        println!("server rss       {:.1} MB -> {:.1} MB", mb(before.rss_kb), mb(after.rss_kb));
        println!("memory per conn  {per_kb:.2} KB");
        summary.num("rss_before_mb", Some(mb(before.rss_kb)), 1).num("rss_after_mb", Some(mb(after.rss_kb)), 1);
        summary.num("kb_per_conn", Some(per_kb), 2);
    }
    summary.print();
    if a.hold > 0 {
        tokio::time::sleep(Duration::from_secs(a.hold)).await;
    }
    Ok(())
}

async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    check_loopback(&a.target)?;
    let prefix = format!("bench/publish/{}", now_us());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")));
    let server_before = a.target.pid.map(ProcStat::read).transpose()?;
    let tool_before = ProcStat::read_self()?;
    let progress = progress::Progress::start(progress::Expect { sent: a.messages as u64, ..Default::default() });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.publishers.max(1) {
        let (next, hist, prefix, server, peer) =
            (next.clone(), hist.clone(), prefix.clone(), a.target.server.clone(), a.target.peer);
        let (total, channels) = (a.messages, a.channels.max(1));
        tasks.push(tokio::spawn(async move {
            let mut http = http1::Http1::new(&server)?;
            loop {
                let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seq >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let sent = Instant::now();
                let url = peer.publish_url(&server, &format!("{prefix}/{}", seq % channels));
                clients::post_json(&mut http, &url, &payload(seq)).await.with_context(|| format!("publish {seq}"))?;
                let _ = hist.lock().unwrap_or_else(|e| e.into_inner()).record(sent.elapsed().as_micros().max(1) as u64);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    drop(progress);
    let server_after = a.target.pid.map(ProcStat::read).transpose()?;
    let hist = hist.lock().unwrap_or_else(|e| e.into_inner());
    let per_s = a.messages as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (hist.value_at_quantile(0.5) as f64 / 1000.0, hist.value_at_quantile(0.99) as f64 / 1000.0);
    println!("publishers       {}", a.publishers);
    println!("acknowledged     {} in {:.3} s: {per_s:.0}/s", a.messages, elapsed.as_secs_f64());
    println!("ack latency p50  {p50:.2} ms");
    println!("ack latency p99  {p99:.2} ms");
    let server_cpu = server_before.zip(server_after).map(|(b, a)| (a.cpu_us - b.cpu_us) as f64);
    if let Some(cpu) = server_cpu {
        println!("server cpu       {:.3} s, {:.2} µs per publish", cpu / 1e6, cpu / a.messages as f64);
    }
    let tool = ProcStat::read_self()?.cpu_us - tool_before.cpu_us;
    println!("bench tool cpu   {:.3} s", tool as f64 / 1e6);
    Summary::new("publish")
        .add("peer", a.target.peer.name())
        .add("publishers", a.publishers)
        .add("messages", a.messages)
        .num("per_s", Some(per_s), 0)
        .num("p50_ms", Some(p50), 2)
        .num("p99_ms", Some(p99), 2)
        .num("server_us_per_publish", server_cpu.map(|c| c / a.messages as f64), 2)
        .num("tool_cpu_s", Some(tool as f64 / 1e6), 3)
        .print();
    Ok(())
}
