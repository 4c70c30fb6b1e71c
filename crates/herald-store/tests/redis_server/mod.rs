//! A real `redis-server` (Debian's package) on a free loopback port, for the
//! tests: one per test, stopped when dropped (a server kept in a static
//! would outlive the test process).
#![allow(dead_code, unreachable_pub)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server with extra `redis-server` arguments.
    pub fn start(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let child = spawn(port, dir.path(), extra);
        let server = RedisServer { port, child, _dir: dir };
        server.wait_ready();
        server
    }

    /// Restarts the server on the same port and directory (what it kept
    /// depends on its persistence settings), after `kill -9`.
    pub fn kill_and_restart(&mut self, extra: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, self._dir.path(), extra);
        self.wait_ready();
    }

    /// Stops the server (`kill -9`).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `redis-cli` against the server and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is installed (Debian's redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until the server answers PING (it binds the port a moment
    /// after the process starts).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG")) {
                    return;
                }
            }
            std::thread::yield_now();
        }
        panic!("redis-server on port {} did not answer", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", dir.to_str().expect("utf-8 path")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/test installs Debian's redis-server)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A Redis Cluster of `masters` masters (no replicas) on loopback, each a
/// real `redis-server`, formed with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                let dir = tempfile::tempdir().expect("temp dir");
                // The cluster bus listens on the port + 10000: both must be free.
                let port = loop {
                    let p = free_port();
                    if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                        break p;
                    }
                };
                let child =
                    spawn(port, dir.path(), &["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
                let server = RedisServer { port, child, _dir: dir };
                server.wait_ready();
                server
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed (Debian's redis-tools)");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes };
        // Formed when every node says so (the nodes agree over their bus).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster.nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::yield_now();
        }
        cluster
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
