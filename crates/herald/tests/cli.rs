//! The command line: `herald publish` and `herald subscribe`, which follows a
//! channel and resumes by itself when the server restarts.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;
use serde_json::{Value, json};

fn herald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

#[tokio::test]
async fn publish_prints_the_id_and_reports_errors() {
    let s = Server::start();
    let out = herald()
        .args(["publish", "news", r#"{"t":"hello"}"#, "--event", "headline", "--server", &s.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"channel":"news","id":1}));
    let (_, page) = get_json(&s, "/api/channels/news/messages").await;
    assert_eq!(page["messages"][0]["data"], json!({"t":"hello"}), "JSON objects are sent as JSON");
    assert_eq!(page["messages"][0]["event"], "headline");
    let out = herald().args(["publish", "bad channel", "x", "--server", &s.url]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_channel"));
}

#[tokio::test]
async fn subscribe_follows_and_resumes_after_a_restart() {
    let mut s = Server::start();
    publish(&s, "c", "1").await;
    let mut child = herald()
        .args(["subscribe", "c", "--count", "4", "--server", &s.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let line = |rx: &mpsc::Receiver<String>| -> Value {
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(20)).expect("a line from herald subscribe")).unwrap()
    };
    assert_eq!(line(&rx), json!({"id":1,"data":1}));
    publish(&s, "c", "two").await;
    assert_eq!(line(&rx), json!({"id":2,"data":"two"}));
    // The server goes away and comes back; meanwhile nothing is printed.
    s.kill9();
    s.restart();
    publish(&s, "c", "three").await;
    publish(&s, "c", "four").await;
    assert_eq!(line(&rx), json!({"id":3,"data":"three"}));
    assert_eq!(line(&rx), json!({"id":4,"data":"four"}));
    let status = child.wait().unwrap();
    assert!(status.success(), "--count 4 exits after four messages");
}

/// With auth configured, both commands take `--token` (or HERALD_TOKEN): an
/// API key publishes, a user token subscribes within its grant, and without
/// one the server's refusal is printed and the command fails.
#[tokio::test]
async fn publish_and_subscribe_with_credentials() {
    const SECRET: &str = "cli-test-secret-0123456789";
    let s = Server::start_with(&[("HERALD_AUTH_JWT_SECRET", SECRET), ("HERALD_AUTH_API_KEYS", "cli-key")]);
    let out = herald().args(["publish", "news", "no token", "--server", &s.url]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing_token"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = herald().args(["publish", "news", "hello", "--server", &s.url, "--token", "cli-key"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let minted = herald()
        .args(["token", "--sub", "u", "--channels", "news"])
        .env("HERALD_AUTH_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let user = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let out = herald()
        .args(["subscribe", "news", "--count", "1", "--server", &s.url])
        .env("HERALD_TOKEN", &user)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"id":1,"data":"hello"}));
    let out = herald().args(["subscribe", "other", "--server", &s.url, "--token", &user]).output().unwrap();
    assert!(!out.status.success(), "outside the grant: refused, not retried");
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"), "{}", String::from_utf8_lossy(&out.stderr));
}
