"""kill -9 at the worst moments: in the middle of a send, and in the middle
of a burst of sends. What was owed arrives after the restart; what was in
flight may arrive twice, never more, and with the same id."""

from collections import Counter

from conftest import SECRET, fallback_env, wait_until


def test_killed_while_mailing_the_mail_arrives_after_the_restart_with_the_same_message_id(herald, smtp):
    sink = smtp(plan=["stall"])  # the relay takes the mail and never answers
    h = herald(fallback_env(smtp_url=f"smtp://127.0.0.1:{sink.port}"))
    h.api("PUT", "/api/users/ann/contact", {"email": "ann@example.com"})
    h.notify(users=["ann"], title="in flight")
    [in_flight] = sink.wait(1, accepted=False)
    h.kill9()
    h.restart()
    [mail] = sink.wait(1)
    h.wait_drained()
    assert mail.message_id == in_flight.message_id, "the repeat is recognisable as the same mail"
    assert len(sink.attempts) == 2, "the one send in flight, repeated once"


def test_killed_while_calling_a_webhook_it_is_called_again_with_the_same_id(herald, receiver):
    r = receiver(plan=["stall"])
    h = herald(fallback_env(channels="webhook", webhooks_url=r.url, webhooks_secret=SECRET))
    h.notify(users=["bob"], title="in flight")
    [in_flight] = r.wait(1)
    h.kill9()
    h.restart()
    first, again = r.wait(2)
    h.wait_drained()
    assert (again.status, again.verified) == (200, True)
    assert again.id == in_flight.id and again.event == in_flight.event
    assert len(r.requests) == 2


def test_killed_in_the_middle_of_a_burst_nothing_owed_is_lost(herald, receiver):
    users = [f"u{i:02}" for i in range(30)]
    r = receiver(delay=0.05)
    h = herald(fallback_env(channels="webhook", webhooks_url=r.url, webhooks_secret=SECRET, jobs_workers="4"))
    for u in users:
        h.notify(users=[u], title=f"for {u}")
    r.wait(5)
    h.kill9()
    h.restart()
    wait_until(lambda: {q.event["data"]["user"] for q in r.requests} == set(users), "every user's event")
    h.wait_drained()
    per_id = Counter(q.id for q in r.requests)
    per_user = Counter(q.event["data"]["user"] for q in r.requests)
    assert all(q.verified for q in r.requests)
    assert max(per_id.values()) <= 2, "a send is repeated at most once"
    assert len(per_id) == len(users), "one event per user: a repeat carries the first one's id"
    assert sum(per_id.values()) - len(users) <= 4, "only sends in flight (4 workers) repeat"
    assert set(per_user) == set(users)
