"""Outbound webhooks against a real receiver that verifies every Standard
Webhooks signature with `standardwebhooks` and answers as each test directs:
notification.unread, message.published, retries, Retry-After, 410."""

import re

from conftest import SECRET, fallback_env, wait_until


def hook_server(herald, receiver, config="", **extra):
    env = fallback_env(channels="webhook", webhooks_url=receiver.url, webhooks_secret=SECRET, **extra)
    return herald(env, config)


def test_notification_unread_is_a_signed_event(herald, receiver):
    r = receiver()
    h = hook_server(herald, r)
    sent = h.notify(users=["ann"], title="Build finished", body="main is green", data={"build": 7})
    [req] = r.wait(1)
    h.wait_drained()
    assert len(r.requests) == 1
    assert req.verified, "standardwebhooks accepts the signature"
    assert re.fullmatch(r"msg_[0-9a-f]{32}", req.id)
    assert req.headers["content-type"] == "application/json"
    event = req.event
    assert event["type"] == "notification.unread"
    assert event["data"]["user"] == "ann" and event["data"]["unread"] == 1
    [n] = event["data"]["notifications"]
    assert (n["id"], n["title"], n["body"], n["data"]) == (f"user/ann:{sent['id']}", "Build finished", "main is green", {"build": 7})
    assert set(n) >= {"id", "title", "body", "data", "time"}


def test_500_then_429_with_retry_after_then_200_one_id_throughout(herald, receiver):
    r = receiver(plan=[(500, {}), (429, {"Retry-After": "1"}), (200, {})])
    h = hook_server(herald, r, fallback_retry="100ms,100ms,100ms")
    h.notify(users=["bo"], title="again and again")
    reqs = r.wait(3)
    h.wait_drained()
    assert [q.status for q in r.requests] == [500, 429, 200], "three attempts, then nothing more"
    assert all(q.verified for q in reqs), "each attempt is signed afresh"
    assert len({q.id for q in reqs}) == 1, "every attempt has the same webhook-id"
    assert reqs[2].at - reqs[1].at >= 0.95, "the receiver's Retry-After (1 s) replaced the 100 ms wait"
    sends = h.outbound()["sends"]["webhook"]
    assert (sends["retried"], sends["sent"]) == (2, 1)


def test_when_the_schedule_is_spent_the_job_is_dead_and_first_moves_to_the_next_channel(herald, receiver, smtp):
    r = receiver(plan=[(500, {})] * 3)
    sink = smtp()
    h = hook_server(
        herald, r, fallback_channels="webhook,email", fallback_retry="100ms,100ms", smtp_url=f"smtp://127.0.0.1:{sink.port}"
    )
    h.api("PUT", "/api/users/cy/contact", {"email": "cy@example.com"})
    h.notify(users=["cy"], title="one way or another")
    [mail] = sink.wait(1)
    assert mail.subject == "one way or another"
    h.wait_drained()
    assert [q.status for q in r.requests] == [500, 500, 500], "1 attempt + 2 retries"
    [dead] = h.jobs("dead")
    assert (dead["target"]["via"], dead["attempts"]) == ("webhook", 3)
    assert "500" in dead["last_error"]
    log = h.api("GET", "/api/users/cy/deliveries")["deliveries"]
    assert [(d["via"], d["outcome"]) for d in log] == [("email", "sent"), ("webhook", "failed")]


def test_410_disables_the_endpoint_until_a_dead_job_is_retried(herald, receiver, smtp):
    r = receiver(plan=[(410, {})])
    sink = smtp()
    h = hook_server(herald, r, fallback_channels="webhook,email", smtp_url=f"smtp://127.0.0.1:{sink.port}",
                    fallback_min_interval="0")
    h.api("PUT", "/api/users/di/contact", {"email": "di@example.com"})
    h.notify(users=["di"], title="gone")
    sink.wait(1)  # the webhook is gone: e-mail took over
    [dead] = h.jobs("dead")
    assert "410" in dead["last_error"]
    # While disabled, the webhook channel is skipped without a request.
    h.notify(users=["di"], title="while disabled")
    sink.wait(2)
    h.wait_drained()
    assert len(r.requests) == 1
    assert h.outbound()["sends"]["webhook"]["skipped"] == 1
    # Retrying the dead letter says the endpoint is back: same event, same id.
    h.api("POST", f"/api/jobs/{dead['id']}/retry", expect=202)
    first, again = r.wait(2)
    assert (again.status, again.id, again.verified) == (200, first.id, True)
    assert again.event == first.event


def test_message_published_is_forwarded_for_matching_channels(herald, receiver):
    r = receiver()
    other_secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
    config = f"""
[[webhooks.channels]]
pattern = "chat/#"
url = "{r.url}"
secret = "{SECRET}"

[[webhooks.channels]]
pattern = "audit/+"
url = "{r.url}"
secret = "{other_secret}"
"""
    h = herald({}, config)
    for i, text in enumerate(["hello", "how are you", "bye"]):
        h.api("POST", "/api/publish", {"channel": "chat/room/1", "event": "chat", "data": {"i": i, "text": text}})
    h.api("POST", "/api/publish", {"channel": "news", "data": "not forwarded"})
    reqs = r.wait(3)
    h.wait_drained()
    assert len(r.requests) == 3
    assert all(q.verified for q in reqs)
    assert len({q.id for q in reqs}) == 3, "one id per event"
    events = [q.event for q in reqs]
    assert {e["type"] for e in events} == {"message.published"}
    got = sorted((e["data"]["id"], e["data"]["data"]["text"]) for e in events)
    assert got == [(1, "hello"), (2, "how are you"), (3, "bye")]
    assert all(e["data"]["channel"] == "chat/room/1" and e["data"]["event"] == "chat" for e in events)
    # A second rule signs with its own secret (not the receiver's: it refuses).
    h.api("POST", "/api/publish", {"channel": "audit/x", "data": {"who": "root"}})
    [*_, audit] = r.wait(4)
    assert audit.event["data"]["channel"] == "audit/x"
    assert not audit.verified, "signed with the second rule's secret"


def test_a_rule_forwards_what_came_after_it_and_catches_up_after_a_restart(herald, receiver):
    r = receiver()
    h = herald({})
    h.api("POST", "/api/channels/chat/a", {"before": "the rule"})
    h.stop()
    config = f"""
[[webhooks.channels]]
pattern = "chat/#"
url = "{r.url}"
secret = "{SECRET}"
"""
    h.config.write_text(config)
    h.restart()
    h.api("POST", "/api/channels/chat/a", {"after": "the rule"})
    [req] = r.wait(1)
    h.wait_drained()
    assert req.event["data"]["data"] == {"after": "the rule"}
    assert len(r.requests) == 1, "the history from before the rule is not sent"
    # Forwarding state survives a crash: nothing is sent twice, nothing skipped.
    h.kill9()
    h.restart()
    h.api("POST", "/api/channels/chat/a", {"n": 3})
    wait_until(lambda: len(r.requests) == 2, "the third message")
    h.wait_drained()
    assert [q.event["data"]["id"] for q in r.requests] == [2, 3]


def test_the_send_rate_paces_a_backlog(herald, receiver):
    r = receiver()
    h = hook_server(herald, r, webhooks_rate="2/s")
    users = [f"p{i}" for i in range(6)]
    for u in users:
        h.notify(users=[u], title="paced")
    reqs = r.wait(6)
    h.wait_drained()
    assert sorted(q.event["data"]["user"] for q in reqs) == users
    # 2 at once, then one every 500 ms: six cannot take less than 2 s.
    # (A lower bound only: a slow machine can never make this fail.)
    assert reqs[-1].at - reqs[0].at >= 1.8, [round(q.at - reqs[0].at, 2) for q in reqs]
