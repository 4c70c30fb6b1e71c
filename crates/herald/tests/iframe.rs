//! Black-box tests of hidden-iframe streaming,
//! `GET /api/channels/{channel}/iframe?callback=F` (DESIGN.md, "Hidden iframe").

mod clients;
mod common;

use clients::{Iframe, Item, id_of, publish_ids, text_of};
use common::{Server, client, get_json, publish, publish_json};
use serde_json::{Value, json};

#[tokio::test]
async fn each_message_is_one_script_call_in_order_after_a_padded_preamble() {
    let s = Server::start();
    publish_json(&s, "room", Some("chat"), &json!({ "from": "bob", "msg": "Hi" })).await;
    publish(&s, "room", "two").await;
    publish(&s, "room", "line 1\nline 2").await;

    let mut frame = Iframe::open(&s, "room", "cb", "0").await;
    let calls = frame.calls(3).await;

    let pre = frame.preamble.to_ascii_lowercase();
    assert!(pre.starts_with("<!doctype html"), "a document first: {pre:?}");
    assert!(pre.contains("<body"), "the body is open before the calls: {pre:?}");
    assert!(frame.preamble.len() >= 1024, "padding so browsers render progressively: {} bytes", frame.preamble.len());

    // Each argument is the message object, the same one polling answers with.
    let (_, page) = get_json(&s, "/api/channels/room/messages?since=0").await;
    assert_eq!(Value::Array(calls.clone()), page["messages"], "iframe calls vs poll answer");
    assert_eq!(calls[0]["channel"], "room");
    assert_eq!(calls[0]["event"], "chat");
    assert_eq!(calls[0]["data"], json!({ "from": "bob", "msg": "Hi" }));
    assert!(calls[1].get("event").is_none(), "no event name when published without one: {}", calls[1]);
    assert_eq!(calls[1]["data"], "two");
    assert_eq!(calls[2]["data"], "line 1\nline 2", "a newline stays inside the one call");
    assert_eq!(calls.iter().map(id_of).collect::<Vec<_>>(), [1, 2, 3]);
    for c in &calls {
        assert!(c["time"].as_str().is_some_and(|t| t.ends_with('Z')), "RFC 3339 UTC time in {c}");
    }

    // Then live.
    publish(&s, "room", "four").await;
    let live = frame.next_call().await;
    assert_eq!((id_of(&live), &live["data"]), (4, &json!("four")));
}

#[tokio::test]
async fn hostile_payloads_never_appear_raw_and_decode_to_exactly_what_was_published() {
    let s = Server::start();
    let hostile = [
        "</script><script>alert(1)</script>",
        "<!--",
        "]]>",
        "\u{2028}",
        "\u{2029}",
        "&",
        "&amp; &lt;b&gt; &#60;",
        "</SCRIPT ><img src=x onerror=alert(1)>",
        "<!-- <script> -->",
        "a\u{2028}b\u{2029}c</script>\"'\\",
        "<![CDATA[ x ]]>",
    ];
    for text in hostile {
        publish(&s, "evil", text).await;
    }
    // A JSON payload with the same strings inside.
    let json_payload = json!({ "k": hostile, "</script>": "<!--" });
    publish_json(&s, "evil", None, &json_payload).await;

    let mut frame = Iframe::open(&s, "evil", "onMessage", "0").await;
    // `Iframe` already fails on a raw `<`, `>`, `&`, U+2028 or U+2029 inside a
    // call, and on any markup line after the first call.
    let n = hostile.len() + 1;
    let (mut calls, mut body) = (Vec::new(), String::new());
    while calls.len() < n {
        if let Item::Call(v, line) = frame.next_item().await.expect("the stream stays open") {
            calls.push(v);
            body.push_str(&line);
            body.push('\n');
        }
    }
    for (call, text) in calls.iter().zip(hostile) {
        assert_eq!(call["data"], text, "decodes back exactly: {call}");
    }
    assert_eq!(calls[hostile.len()]["data"], json_payload);

    assert_eq!(body.matches("<script>").count(), n, "one script element per message: {body}");
    assert_eq!(body.matches("</script>").count(), n, "nothing closes a script early: {body}");
    for bad in ["alert(1)", "<img", "<!--", "]]>", "<![CDATA[", "\u{2028}", "\u{2029}", "&", "</SCRIPT"] {
        if bad == "alert(1)" {
            // The text survives, escaped, but never as markup.
            assert!(!body.contains("<script>alert(1)"), "{body}");
            continue;
        }
        assert!(!body.contains(bad), "{bad:?} appears raw in the stream: {body}");
    }
}

#[tokio::test]
async fn a_callback_that_is_not_a_plain_identifier_is_refused() {
    let s = Server::start();
    publish(&s, "c", "x").await;
    let long = "a".repeat(65);
    let bad = ["a.b", "alert%281%29", "1x", "", "a-b", "parent.x", "%3C%2Fscript%3E", "a%20b", long.as_str()];
    for cb in bad {
        let res = client().get(format!("{}/api/channels/c/iframe?callback={cb}&since=0", s.url)).send().await.unwrap();
        assert_eq!(res.status(), 400, "callback {cb:?}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "callback {cb:?}: content-type {ct}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["code"], "invalid_callback", "callback {cb:?}: {body}");
    }
    // No callback at all.
    let (status, body) = get_json(&s, "/api/channels/c/iframe?since=0").await;
    assert_eq!((status, &body["code"]), (400, &json!("invalid_callback")), "{body}");

    // Plain identifiers are fine.
    for cb in ["cb", "_x", "$y", "onMessage2"] {
        let mut frame = Iframe::open(&s, "c", cb, "0").await;
        assert_eq!(frame.next_call().await["data"], "x", "callback {cb}");
    }
}

#[tokio::test]
async fn a_quiet_stream_sends_keep_alive_comments_and_stays_live() {
    let s = Server::start_with(&[("HERALD_SSE_HEARTBEAT", "200ms")]);
    let mut frame = Iframe::open(&s, "quiet", "cb", "0").await;
    // Two comments with text in them (the padding comment is blank): a
    // repeated keep-alive, not part of the document head.
    let mut keep_alives = 0;
    while keep_alives < 2 {
        match frame.next_item().await.expect("the stream stays open") {
            item if item.is_keep_alive() => keep_alives += 1,
            Item::Call(v, _) => panic!("no message was published, got {v}"),
            _ => {}
        }
    }
    publish_ids(&s, "quiet", 1..=1).await;
    let call = frame.next_call().await;
    assert_eq!((id_of(&call), &call["data"]), (1, &json!(text_of(1))));
}

#[tokio::test]
async fn since_resumes_after_the_cursor() {
    let s = Server::start();
    publish_ids(&s, "r", 1..=5).await;
    let mut from_3 = Iframe::open(&s, "r", "cb", "3").await;
    let calls = from_3.calls(2).await;
    assert_eq!(calls.iter().map(id_of).collect::<Vec<_>>(), [4, 5]);

    publish_ids(&s, "r", 6..=6).await;
    assert_eq!(id_of(&from_3.next_call().await), 6, "then live");

    let (status, body) = get_json(&s, "/api/channels/r/iframe?callback=cb&since=yesterday").await;
    assert_eq!((status, &body["code"]), (400, &json!("invalid_cursor")), "{body}");
}

#[tokio::test]
async fn since_now_skips_the_history() {
    let s = Server::start_with(&[("HERALD_SSE_HEARTBEAT", "200ms")]);
    publish_ids(&s, "r", 1..=5).await;
    let mut live = Iframe::open(&s, "r", "cb", "now").await;
    // A keep-alive shows the stream has started waiting for messages, so "now"
    // is settled (a publish racing the stream's start is matrix.rs's concern).
    loop {
        match live.next_item().await.expect("the stream stays open") {
            Item::Call(v, _) => panic!("since=now replayed history: {v}"),
            item if item.is_keep_alive() => break,
            _ => {}
        }
    }
    publish_ids(&s, "r", 6..=6).await;
    assert_eq!(id_of(&live.next_call().await), 6, "the first live message, not history");
}

#[tokio::test]
async fn a_cursor_older_than_the_history_gets_a_gap_call_first() {
    let s = Server::start_with(&[("HERALD_HISTORY_SIZE", "5")]);
    publish_ids(&s, "g", 1..=8).await; // 4..=8 retained
    let mut frame = Iframe::open(&s, "g", "cb", "1").await;
    let gap = frame.next_call().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["channel"], "g", "{gap}");
    assert_eq!((gap["from"].as_u64(), gap["to"].as_u64()), (Some(2), Some(3)), "{gap}");
    let calls = frame.calls(5).await;
    assert_eq!(calls.iter().map(id_of).collect::<Vec<_>>(), [4, 5, 6, 7, 8]);
}

#[tokio::test]
async fn graceful_shutdown_ends_the_stream_cleanly() {
    let mut s = Server::start();
    publish_ids(&s, "bye", 1..=1).await;
    let mut frame = Iframe::open(&s, "bye", "cb", "0").await;
    assert_eq!(id_of(&frame.next_call().await), 1);
    let stopping = tokio::task::spawn_blocking(move || {
        let status = s.stop();
        (s, status)
    });
    // The document ends (a clean end of the chunked body, not a broken socket).
    while let Some(item) = frame.next_item().await {
        assert!(!matches!(item, Item::Call(..)), "nothing was published: {item:?}");
    }
    let (_s, status) = stopping.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}
