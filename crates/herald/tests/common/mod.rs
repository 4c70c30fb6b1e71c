//! The black-box harness: runs the real `herald` binary on port 0 and talks to
//! it with real clients (reqwest, an SSE parser, a WebSocket client).
#![allow(dead_code, unreachable_pub)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::Value;

/// A running server process. Dropping it kills the process.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub addr: String,
    /// The MQTT listener, `127.0.0.1:PORT`.
    pub mqtt: String,
    pub data: PathBuf,
    /// `http://ADDR/metrics` when `HERALD_METRICS_LISTEN` was set.
    pub metrics_url: Option<String>,
    env: Vec<(String, String)>,
    /// Extra arguments after `serve` (e.g. `--log-format json`).
    args: Vec<String>,
    /// Where stderr (the logs) goes, when kept ([`Server::start_opts`]).
    log: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

/// How to start a server beyond its environment.
#[derive(Default)]
pub struct Opts<'a> {
    /// `herald.toml` text, for what the environment cannot set (rule lists).
    pub config: Option<&'a str>,
    /// Keep stderr (the log) in a file, read by [`Server::log`].
    pub capture_log: bool,
    /// Extra arguments after `serve` (e.g. `--log-format json`).
    pub args: &'a [&'a str],
}

impl Server {
    /// A server with its own fresh data directory.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// A server with `HERALD_*` settings, e.g. `("HERALD_SSE_HEARTBEAT", "200ms")`.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        Self::start_opts(env, Opts::default())
    }

    /// A server whose logs (stderr) are kept in a file, read with
    /// [`Server::log`]; `args` go after `serve`.
    pub fn start_logged(env: &[(&str, &str)], args: &[&str]) -> Server {
        Self::start_opts(env, Opts { args, capture_log: true, ..Opts::default() })
    }

    /// A server with settings, a configuration file and/or its log kept.
    pub fn start_opts(env: &[(&str, &str)], opts: Opts<'_>) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(toml) = opts.config {
            let path = dir.path().join("herald.toml");
            std::fs::write(&path, toml).expect("write herald.toml");
            env.push(("HERALD_CONFIG".into(), path.display().to_string()));
        }
        let log = opts.capture_log.then(|| dir.path().join("stderr.log"));
        let mut s = Server {
            child: None,
            url: String::new(),
            addr: String::new(),
            mqtt: "127.0.0.1:0".into(),
            data,
            metrics_url: None,
            env,
            args: opts.args.iter().map(|a| a.to_string()).collect(),
            log,
            _dir: Some(dir),
        };
        s.spawn("127.0.0.1:0");
        s
    }

    /// Everything the server logged so far (started with `capture_log`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().expect("started with capture_log")).unwrap_or_default()
    }

    fn spawn(&mut self, http: &str) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--http", http, "--mqtt", &self.mqtt, "--data"])
            .arg(&self.data)
            .args(&self.args)
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(path) = &self.log {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("log file");
            cmd.stderr(file);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read the listening line");
        let url = line
            .trim()
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        self.url = url.to_string();
        self.addr = url.trim_start_matches("http://").to_string();
        let mut line = String::new();
        reader.read_line(&mut line).expect("read the MQTT line");
        if let Some(addr) = line.trim().strip_prefix("herald mqtt listening on ") {
            // A restart keeps the port.
            self.mqtt = addr.to_string();
        }
        if self.env.iter().any(|(k, v)| k == "HERALD_METRICS_LISTEN" && !v.is_empty()) {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read the metrics line");
            let url = line.trim().strip_prefix("herald metrics listening on ");
            self.metrics_url = Some(url.unwrap_or_else(|| panic!("unexpected metrics line {line:?}")).to_string());
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill").arg("-TERM").arg(c.id().to_string()).status().expect("kill -TERM");
        c.wait().expect("wait")
    }

    /// Starts again on the same data directory and the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        let addr = self.addr.clone();
        self.spawn(&addr);
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/api/ws", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// A client whose connections come from `ip` (a loopback address other than
/// 127.0.0.1: each is a different client to the server's limits).
pub fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .local_address(ip.parse::<std::net::IpAddr>().expect("an address"))
        .build()
        .unwrap()
}

/// A raw TCP connection to `addr` from `ip`, with a receive buffer of
/// `rcvbuf` bytes when given (a client that will stop reading).
pub async fn tcp_from(ip: &str, addr: &str, rcvbuf: Option<u32>) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    socket.bind(format!("{ip}:0").parse().unwrap()).expect("bind the source address");
    socket.connect(addr.parse().expect("a socket address")).await.expect("connect")
}

/// Waits (bounded: 10 s) until `check` holds for the server's stats, and
/// returns them.
pub async fn until_stats(s: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let v = stats(s).await;
            if check(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // polling the stats: nothing to block on
        }
    })
    .await
    .unwrap_or_else(|_| panic!("stats never showed {what}"))
}

/// `GET /api/stats`.
pub async fn stats(s: &Server) -> Value {
    let (status, v) = get_json(s, "/api/stats").await;
    assert_eq!(status, 200, "stats: {v}");
    v
}

/// Publishes text data; returns the id.
pub async fn publish(s: &Server, channel: &str, data: &str) -> u64 {
    let res = client().post(format!("{}/api/channels/{channel}", s.url)).body(data.to_string()).send().await.unwrap();
    assert_eq!(res.status(), 200, "publish to {channel}");
    res.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

/// Publishes JSON data with an event name; returns the id.
pub async fn publish_json(s: &Server, channel: &str, event: Option<&str>, data: &Value) -> u64 {
    let mut url = format!("{}/api/channels/{channel}", s.url);
    if let Some(e) = event {
        url = format!("{url}?event={e}");
    }
    let res = client().post(url).json(data).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

/// Opens an SSE stream at `path` (with extra headers) and returns its events.
pub async fn sse(s: &Server, path: &str, headers: &[(&str, &str)]) -> impl Stream<Item = Event> + Unpin + use<> {
    let mut req = client().get(format!("{}{path}", s.url)).header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200, "SSE {path}");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    Box::pin(res.bytes_stream().eventsource().map(|e| e.expect("well-formed SSE")))
}

/// The next event within 10 s (a hang fails the test instead of stalling it).
pub async fn next_event(events: &mut (impl Stream<Item = Event> + Unpin)) -> Option<Event> {
    tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("an SSE event within 10s")
}

/// GET returning (status, JSON body or Null).
pub async fn get_json(s: &Server, path: &str) -> (u16, Value) {
    let res = client().get(format!("{}{path}", s.url)).send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub fn data_dir(s: &Server) -> &Path {
    &s.data
}
