//! Durability: every acknowledged publish survives `kill -9` and a graceful
//! shutdown under load, and ids continue without reuse after a restart on the
//! same data directory.

mod clients;
mod common;

use std::sync::{Arc, Mutex};

use clients::raw_mqtt::{closed_by_server, raw_connected};
use common::*;
use serde_json::Value;

/// What the publishers had acknowledged: (data, id).
type Acked = Arc<Mutex<Vec<(String, u64)>>>;

/// 16 publishers over 4 channels that keep publishing until the server goes.
fn start_publishers(url: &str) -> (Acked, Vec<tokio::task::JoinHandle<()>>) {
    let acked: Acked = Arc::default();
    let mut tasks = Vec::new();
    for p in 0..16 {
        let url = url.to_owned();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0.. {
                let channel = format!("c{}", p % 4);
                let res = c.post(format!("{url}/api/channels/{channel}")).body(format!("{p}/{i}")).send().await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap();
                        acked.lock().unwrap().push((format!("{p}/{i}"), v["id"].as_u64().unwrap()));
                    }
                    _ => break, // the server is gone (or going: 503)
                }
            }
        }));
    }
    (acked, tasks)
}

async fn wait_for_acks(acked: &Acked, n: usize) {
    while acked.lock().unwrap().len() < n {
        tokio::task::yield_now().await;
    }
}

/// After a restart: every acknowledged publish is stored under its id, and
/// each channel's ids continue after the highest stored one.
async fn assert_all_kept(s: &Server, acked: &Acked) {
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    let mut stored = std::collections::HashMap::new();
    for ch in 0..4 {
        let (_, page) = get_json(s, &format!("/api/channels/c{ch}/messages?since=0&limit=1000")).await;
        for m in page["messages"].as_array().unwrap() {
            stored.insert(m["data"].as_str().unwrap().to_string(), m["id"].as_u64().unwrap());
        }
    }
    for (data, id) in &acked {
        assert_eq!(stored.get(data), Some(id), "acknowledged message {data} (id {id}) lost or renumbered");
    }
    for ch in 0..4 {
        let (_, page) = get_json(s, &format!("/api/channels/c{ch}/messages?since=0&limit=1000")).await;
        let head = page["next"].as_u64().unwrap();
        let id = publish(s, &format!("c{ch}"), "after restart").await;
        assert_eq!(id, head + 1, "c{ch} continues after {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9() {
    let mut s = Server::start();
    let (acked, tasks) = start_publishers(&s.url);
    // Killed under the publishers' feet once a good number were acknowledged.
    wait_for_acks(&acked, 400).await;
    s.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    s.restart();
    assert_all_kept(&s, &acked).await;
}

/// SIGTERM under load: a waiting long poll and an MQTT 5 connection are
/// ended cleanly (304; DISCONNECT 0x8B "server shutting down"), the process
/// exits 0, and every publish acknowledged before it went is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_ends_every_connection_and_keeps_every_acknowledged_publish() {
    let mut s = Server::start();
    let poll = tokio::spawn(client().get(format!("{}/api/channels/quiet/messages?since=now&wait=30", s.url)).send());
    let mut mqtt = raw_connected(&s, 5, "until-shutdown", 0).await;
    let (acked, tasks) = start_publishers(&s.url);
    wait_for_acks(&acked, 200).await;
    let (mut s, exit) = tokio::task::spawn_blocking(move || {
        let exit = s.stop();
        (s, exit)
    })
    .await
    .unwrap();
    assert!(exit.success(), "{exit}");
    let told = closed_by_server(&mut mqtt).await;
    assert!(told.len() >= 3 && told[0] == 0xe0 && told[2] == 0x8b, "DISCONNECT 0x8B expected, got {told:x?}");
    let answer = poll.await.unwrap().expect("the long poll is answered, not cut");
    assert_eq!(answer.status(), 304);
    for t in tasks {
        t.await.unwrap();
    }
    s.restart();
    assert_all_kept(&s, &acked).await;
}
#[tokio::test]
async fn graceful_restart_keeps_history_and_ids() {
    let mut s = Server::start();
    for i in 1..=3 {
        publish(&s, "c", &i.to_string()).await;
    }
    assert!(s.stop().success());
    s.restart();
    let (_, page) = get_json(&s, "/api/channels/c/messages").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);
    assert_eq!(publish(&s, "c", "4").await, 4);
}
