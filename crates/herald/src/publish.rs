//! `herald publish`: one HTTP publish, printing the server's answer.

use std::io::Read;

use anyhow::{Context, bail};

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Auto,
    Json,
    Text,
}

impl Kind {
    pub(crate) fn from_flags(json: bool, text: bool) -> Self {
        match (json, text) {
            (true, _) => Kind::Json,
            (_, true) => Kind::Text,
            _ => Kind::Auto,
        }
    }
}

pub(crate) async fn run(
    server: &str,
    token: Option<&str>,
    channel: &str,
    data: &str,
    event: Option<&str>,
    kind: Kind,
) -> anyhow::Result<()> {
    let data = if data == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading standard input")?;
        s
    } else {
        data.to_owned()
    };
    let json = match kind {
        Kind::Json => true,
        Kind::Text => false,
        Kind::Auto => {
            let t = data.trim_start();
            (t.starts_with('{') || t.starts_with('[')) && serde_json::from_str::<serde_json::Value>(&data).is_ok()
        }
    };
    let mut url = format!("{}/api/channels/{channel}", server.trim_end_matches('/'));
    if let Some(ev) = event {
        url.push_str("?event=");
        url.push_str(ev);
    }
    let content_type = if json { "application/json" } else { "text/plain; charset=utf-8" };
    let mut req = reqwest::Client::new().post(&url).header("content-type", content_type).body(data);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.with_context(|| format!("could not reach {server}"))?;
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    println!("{body}");
    Ok(())
}
