//! Durability: every acknowledged publish survives `kill -9`, and ids continue
//! without reuse after a restart on the same data directory.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9() {
    let mut s = Server::start();
    let url = s.url.clone();
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    // 16 publishers keep publishing; the server is killed under their feet.
    let mut tasks = Vec::new();
    for p in 0..16 {
        let url = url.clone();
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
                    _ => break, // the server is gone
                }
            }
        }));
    }
    // Kill once a good number of publishes were acknowledged.
    loop {
        if acked.lock().unwrap().len() >= 400 {
            break;
        }
        tokio::task::yield_now().await;
    }
    s.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    s.restart();
    let mut stored = std::collections::HashMap::new();
    for ch in 0..4 {
        let (_, page) = get_json(&s, &format!("/api/channels/c{ch}/messages?since=0&limit=1000")).await;
        for m in page["messages"].as_array().unwrap() {
            stored.insert(m["data"].as_str().unwrap().to_string(), m["id"].as_u64().unwrap());
        }
    }
    for (data, id) in &acked {
        assert_eq!(stored.get(data), Some(id), "acknowledged message {data} (id {id}) lost or renumbered");
    }
    // Ids continue after the highest stored one, never reusing any.
    for ch in 0..4 {
        let (_, page) = get_json(&s, &format!("/api/channels/c{ch}/messages?since=0&limit=1000")).await;
        let head = page["next"].as_u64().unwrap();
        let id = publish(&s, &format!("c{ch}"), "after restart").await;
        assert_eq!(id, head + 1, "c{ch} continues after {head}");
    }
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
