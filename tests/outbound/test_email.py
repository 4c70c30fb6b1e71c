"""Unread fallback by e-mail, against a real SMTP server (aiosmtpd): what is
mailed, when nothing is, digests, and how the relay's answers are handled."""

import re
import sqlite3
import time
from datetime import datetime

from conftest import fallback_env, wait_until


def mail_server(herald, sink, **extra):
    return herald(fallback_env(smtp_url=f"smtp://127.0.0.1:{sink.port}", **extra))


def contact(h, user, address=None):
    h.api("PUT", f"/api/users/{user}/contact", {"email": address or f"{user}@example.com"})


def test_an_unread_notification_is_mailed_once(herald, smtp):
    sink = smtp()
    h = mail_server(herald, sink)
    contact(h, "ann")
    sent = h.notify(users=["ann"], title="Build finished", body="main is green", data={"build": 7})
    [mail] = sink.wait(1)
    assert mail.rcpt == ["ann@example.com"]
    assert mail.subject == "Build finished"
    assert re.fullmatch(r"<msg_[0-9a-f]{32}@localhost>", mail.message_id), mail.message_id
    assert "You have 1 unread notifications." in mail.body
    assert "* Build finished\n  main is green\n" in mail.body
    h.wait_drained()
    assert len(sink.attempts) == 1, "nothing more is sent"
    [d] = h.api("GET", "/api/users/ann/deliveries")["deliveries"]
    assert (d["via"], d["outcome"], d["count"]) == ("email", "sent", 1)
    assert d["notifications"] == [f"user/ann:{sent['id']}"]
    assert mail.message_id == f"<{d['id']}@localhost>", "the delivery id is the Message-ID"
    sends = h.outbound()["sends"]["email"]
    assert (sends["sent"], sends["retried"], sends["dead"]) == (1, 0, 0)


def test_read_in_time_on_another_device_sends_nothing(herald, smtp):
    sink = smtp()
    # The read below must come within the delay: 2 s is plenty on loopback.
    h = mail_server(herald, sink, fallback_delay="2s")
    contact(h, "bob")
    read = h.notify(users=["bob"], title="read on the phone")
    h.notify(users=["bob"], title="left unread")
    # Another device (any client with the user's inbox) reads the first.
    h.api("POST", "/api/users/bob/read", {"ids": [f"user/bob:{read['id']}"]})
    [mail] = sink.wait(1)
    assert mail.subject == "left unread"
    assert "read on the phone" not in mail.body
    h.wait_drained()
    assert len(sink.attempts) == 1


def test_turned_off_per_notification_and_other_delay(herald, smtp):
    sink = smtp()
    h = mail_server(herald, sink, fallback_delay="1h")
    contact(h, "cy")
    h.notify(users=["cy"], title="quiet", fallback=False)
    h.notify(users=["cy"], title="soon", fallback={"delay": "200ms"})
    [mail] = sink.wait(1)
    assert mail.subject == "soon", "its own delay, not the hour of the configuration"
    assert "quiet" not in mail.body
    h.wait_drained()  # 'quiet' is dealt with: nothing waits for the hour
    assert len(sink.attempts) == 1


def test_five_notifications_that_fell_due_while_down_go_as_one_digest(herald, smtp):
    sink = smtp()
    h = mail_server(herald, sink, fallback_delay="1s")
    contact(h, "dee")
    for i in range(1, 6):
        h.notify(users=["dee"], title=f"n{i}", body=f"body {i}")
    h.kill9()
    # They fall due (1 s) while the server is down ...
    time.sleep(1.5)
    h.restart()
    # ... and go as soon as it is back, together.
    [mail] = sink.wait(1)
    assert mail.subject == "n5 (and 4 more)"
    assert "You have 5 unread notifications." in mail.body
    assert [line[2:] for line in mail.body.splitlines() if line.startswith("* ")] == ["n5", "n4", "n3", "n2", "n1"]
    h.wait_drained()
    assert len(sink.attempts) == 1, "one digest, not five mails"


def test_what_falls_due_within_the_interval_waits_and_goes_as_one_digest(herald, smtp):
    sink = smtp()
    h = mail_server(herald, sink, fallback_delay="200ms")
    contact(h, "eve")
    h.notify(users=["eve"], title="first")
    [first] = sink.wait(1)
    assert first.subject == "first"
    for i in range(5):
        h.notify(users=["eve"], title=f"later {i}")
    # They fall due, but eve had a mail less than min_interval (1h) ago:
    # her fallback waits for the interval's end.
    [job] = wait_until(
        lambda: [j for j in h.jobs("pending") if j["kind"] == "fallback" and epoch(j["due"]) > time.time() + 1800],
        "the fallback to wait for the interval",
    )
    assert job["target"] == {"user": "eve"}
    assert len(sink.attempts) == 1
    # With the interval over (restarted without one), the five go together.
    h.stop()
    h.restart({"HERALD_FALLBACK_MIN_INTERVAL": "0"})
    [_, digest] = sink.wait(2)
    assert digest.subject == "later 4 (and 4 more)"
    h.wait_drained()
    assert len(sink.attempts) == 2


def epoch(rfc3339):
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_451_twice_then_250_is_three_attempts_and_one_mail(herald, smtp):
    sink = smtp(plan=["451 4.3.0 try again later", "451 4.3.0 still busy"])
    h = mail_server(herald, sink)
    contact(h, "fay")
    h.notify(users=["fay"], title="persistent")
    [mail] = sink.wait(1)
    h.wait_drained()
    assert len(sink.attempts) == 3
    assert {m.message_id for m in sink.attempts} == {mail.message_id}, "every attempt has the same Message-ID"
    sends = h.outbound()["sends"]["email"]
    assert (sends["retried"], sends["sent"], sends["dead"]) == (2, 1, 0)


def test_550_is_a_dead_letter_at_once_and_can_be_retried(herald, smtp):
    sink = smtp(plan=["550 5.1.1 no such mailbox"])
    h = mail_server(herald, sink, fallback_retry="200ms,200ms,200ms")
    contact(h, "gus")
    h.notify(users=["gus"], title="bounced")
    [dead] = wait_until(lambda: h.jobs("dead"), "a dead letter")
    assert dead["kind"] == "deliver" and dead["attempts"] == 1, dead
    assert "550" in dead["last_error"]
    assert dead["target"]["via"] == "email" and dead["target"]["user"] == "gus"
    h.wait_drained()
    assert len(sink.attempts) == 1, "a permanent refusal is not retried"
    [d] = h.api("GET", "/api/users/gus/deliveries")["deliveries"]
    assert (d["outcome"], "550" in d["error"]) == ("failed", True)
    # An operator fixes the mailbox and retries the dead letter.
    h.api("POST", f"/api/jobs/{dead['id']}/retry", expect=202)
    [mail] = sink.wait(1)
    assert mail.message_id == sink.attempts[0].message_id, "the retry is the same mail"
    assert h.jobs("dead") == []
    h.api("POST", f"/api/jobs/{dead['id']}/retry", expect=404)


def test_a_relay_that_is_down_then_up_gets_the_mail(herald, smtp):
    port = __import__("conftest").free_port()
    h = herald(fallback_env(smtp_url=f"smtp://127.0.0.1:{port}", fallback_retry="300ms,1s,1s,1s,1s,1s,1s,1s"))
    contact(h, "hal")
    h.notify(users=["hal"], title="while the relay was down")
    [job] = wait_until(
        lambda: [j for j in h.jobs("pending") if j["kind"] == "deliver" and j["attempts"] >= 1], "a failed attempt"
    )
    assert job["last_error"], job
    sink = smtp(port=port)
    [mail] = sink.wait(1)
    assert mail.subject == "while the relay was down"
    h.wait_drained()
    assert h.outbound()["sends"]["email"]["retried"] >= 1


def test_a_lost_job_is_rebuilt_by_the_sweep(herald, smtp):
    sink = smtp()
    h = mail_server(herald, sink, fallback_delay="1s")
    contact(h, "ivy")
    h.notify(users=["ivy"], title="its job was lost")
    h.stop()
    # Lose every job, as a crash between a notification's commit and its
    # job's write would.
    db = sqlite3.connect(h.data / "herald.db")
    with db:
        assert db.execute("DELETE FROM jobs").rowcount >= 1
    db.close()
    h.restart()
    [mail] = sink.wait(1)
    assert mail.subject == "its job was lost"


def test_group_notifications_reach_only_members_who_have_not_read_them(herald, smtp):
    sink = smtp()
    # The reads below must come within the delay: 2 s is plenty on loopback.
    h = mail_server(herald, sink, fallback_delay="2s", fallback_groups="true", fallback_min_interval="0")
    for u in ["a", "b", "c"]:
        contact(h, u)
    h.api("PUT", "/api/groups/team/members", {"users": ["a", "b", "c"]})
    sent = h.notify(group="team", title="deploy at 5")
    h.api("POST", "/api/users/a/read", {"ids": [f"$group/team:{sent['id']}"]})
    mails = sink.wait(2)
    h.wait_drained()
    assert len(sink.attempts) == 2
    assert sorted(m.rcpt[0] for m in mails) == ["b@example.com", "c@example.com"]
    assert all(m.subject == "deploy at 5" for m in mails)
    # Everyone: each known user who has not read it (a contact or an inbox).
    h.notify(all=True, title="maintenance tonight")
    h.api("POST", "/api/users/b/read", {"all": True})
    mails = sink.wait(4)[2:]
    h.wait_drained()
    assert sorted(m.rcpt[0] for m in mails) == ["a@example.com", "c@example.com"]
    assert len(sink.attempts) == 4
