//! `herald subscribe`: follows a channel over SSE and prints one JSON line per
//! message. When the connection drops (or the server restarts) it reconnects
//! with backoff and resumes from the last id it printed, so nothing is missed
//! and nothing is printed twice.

use std::time::Duration;

use anyhow::bail;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;

pub(crate) async fn run(
    server: &str,
    token: Option<&str>,
    channel: &str,
    since: &str,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = format!("{}/api/channels/{channel}/events", server.trim_end_matches('/'));
    let mut last_id: Option<String> = None;
    let mut printed = 0u64;
    let mut backoff = Duration::from_millis(250);
    loop {
        let mut req = client.get(format!("{base}?since={since}")).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        match req.send().await {
            Ok(res) if res.status().is_success() => {
                backoff = Duration::from_millis(250);
                let mut events = res.bytes_stream().eventsource();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { break };
                    match event.event.as_str() {
                        "gap" => {
                            eprintln!("herald: messages lost before resuming: {}", event.data);
                            continue;
                        }
                        // The server ends the stream and says why (an expired
                        // token, shutdown, end of life): reconnect, and a
                        // refusal (401) ends the command with its reason.
                        "close" => {
                            eprintln!("herald: the server closed the stream: {}", event.data);
                            break;
                        }
                        "unread" => continue,
                        _ => {}
                    }
                    if !event.id.is_empty() {
                        last_id = Some(event.id.clone());
                    }
                    let data = serde_json::from_str::<serde_json::Value>(&event.data)
                        .unwrap_or(serde_json::Value::String(event.data));
                    let id: serde_json::Value = event.id.parse::<u64>().map_or(event.id.into(), Into::into);
                    let mut line = serde_json::json!({ "id": id, "data": data });
                    if event.event != "message" {
                        line["event"] = event.event.into();
                    }
                    println!("{line}");
                    printed += 1;
                    if count.is_some_and(|c| printed >= c) {
                        return Ok(());
                    }
                }
            }
            Ok(res) => {
                let status = res.status();
                let body = res.text().await.unwrap_or_default();
                if status.is_client_error() {
                    bail!("{status}: {body}");
                }
                eprintln!("herald: {status}; retrying");
            }
            Err(e) => {
                let e = anyhow::Error::from(e).context(format!("could not reach {server}"));
                eprintln!("herald: {e:#}; retrying in {backoff:?}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
