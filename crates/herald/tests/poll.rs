//! Short and long polling, against the real binary.

mod common;

use common::*;
use serde_json::Value;

fn ids(page: &Value) -> Vec<u64> {
    page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn short_poll_returns_everything_after_the_cursor_at_once() {
    let s = Server::start();
    for i in 1..=5 {
        publish(&s, "c", &format!("m{i}")).await;
    }
    let (st, page) = get_json(&s, "/api/channels/c/messages?since=2").await;
    assert_eq!(st, 200);
    assert_eq!(ids(&page), [3, 4, 5]);
    assert_eq!((page["next"].as_u64(), page["gap"].as_bool()), (Some(5), Some(false)));
    assert_eq!(page["channel"], "c");
    let (_, page) = get_json(&s, "/api/channels/c/messages?since=0&limit=2").await;
    assert_eq!((ids(&page), page["next"].as_u64()), (vec![1, 2], Some(2)));
    let (_, page) = get_json(&s, "/api/channels/c/messages?since=5").await;
    assert_eq!((ids(&page), page["next"].as_u64()), (vec![], Some(5)), "next is the given since when nothing is new");
    let (_, page) = get_json(&s, "/api/channels/c/messages?since=now").await;
    assert_eq!((ids(&page), page["next"].as_u64()), (vec![], Some(5)));
    let (_, page) = get_json(&s, "/api/channels/never/messages").await;
    assert_eq!((ids(&page), page["next"].as_u64()), (vec![], Some(0)));
}

#[tokio::test]
async fn history_limit_keeps_exactly_the_last_n_and_reports_the_gap() {
    let s = Server::start_with(&[("HERALD_HISTORY_SIZE", "3")]);
    for i in 1..=10 {
        publish(&s, "c", &i.to_string()).await;
    }
    let (_, page) = get_json(&s, "/api/channels/c/messages?since=2").await;
    assert_eq!(ids(&page), [8, 9, 10]);
    assert_eq!(page["gap"], true);
    assert_eq!(page["missed"], serde_json::json!({"channel":"c","from":3,"to":7}));
    let (_, page) = get_json(&s, "/api/channels/c/messages?since=7").await;
    assert_eq!((ids(&page), page["gap"].as_bool()), (vec![8, 9, 10], Some(false)));
}

#[tokio::test]
async fn long_poll_answers_when_a_message_arrives() {
    let s = Server::start();
    publish(&s, "c", "first").await;
    let url = format!("{}/api/channels/c/messages?since=1&wait=30", s.url);
    let waiting = tokio::spawn(async move { client().get(url).send().await.unwrap() });
    // The poll is parked: wait until the server counts it, then publish.
    let parked = async {
        loop {
            let (_, stats) = get_json(&s, "/api/stats").await;
            if stats["connections"]["longpoll"] == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), parked).await.expect("the long poll is parked");
    publish(&s, "c", "second").await;
    let res = waiting.await.unwrap();
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    assert_eq!(ids(&page), [2]);
    assert_eq!(page["messages"][0]["data"], "second");
}

#[tokio::test]
async fn long_poll_with_history_answers_at_once_with_all_of_it() {
    let s = Server::start();
    for i in 0..3 {
        publish(&s, "c", &i.to_string()).await;
    }
    let (st, page) = get_json(&s, "/api/channels/c/messages?since=0&wait=30").await;
    assert_eq!((st, ids(&page)), (200, vec![1, 2, 3]), "all messages after the cursor at once, not one per request");
}

#[tokio::test]
async fn long_poll_times_out_with_304() {
    let s = Server::start_with(&[("HERALD_LONGPOLL_MAX_WAIT", "1s")]);
    publish(&s, "c", "x").await;
    // wait=60 is capped to the configured 1 s.
    let res = client().get(format!("{}/api/channels/c/messages?since=1&wait=60", s.url)).send().await.unwrap();
    assert_eq!(res.status(), 304);
    assert!(res.bytes().await.unwrap().is_empty());
}

/// Same-origin polls are answered by the front door without the router;
/// cross-origin ones (for their CORS headers) and percent-escaped paths go
/// through it. Both ways must give the same answer.
#[tokio::test]
async fn polls_answer_the_same_with_or_without_the_router() {
    let s = Server::start();
    for i in 1..=3 {
        publish(&s, "chat/room", &format!("m{i}")).await;
    }
    let get = |path: &'static str, origin: Option<&'static str>| {
        let url = format!("{}{path}", s.url);
        async move {
            let mut req = client().get(url);
            if let Some(o) = origin {
                req = req.header("origin", o);
            }
            let res = req.send().await.unwrap();
            let cors = res.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_owned());
            (res.status().as_u16(), cors, res.json::<Value>().await.unwrap())
        }
    };
    let (st, cors, direct) = get("/api/channels/chat/room/messages?since=1", None).await;
    assert_eq!((st, cors, ids(&direct)), (200, None, vec![2, 3]));
    let (st, cors, routed) = get("/api/channels/chat/room/messages?since=1", Some("https://app.example")).await;
    assert_eq!((st, cors.as_deref()), (200, Some("*")), "the router's CORS layer answered");
    assert_eq!(routed, direct);
    let (st, _, escaped) = get("/api/channels/chat%2Froom/messages?since=1", None).await;
    assert_eq!((st, escaped), (200, direct));
    let (st, _, refused) = get("/api/channels/chat/room/messages?since=x", None).await;
    assert_eq!((st, refused["code"].as_str()), (400, Some("invalid_cursor")));
}
