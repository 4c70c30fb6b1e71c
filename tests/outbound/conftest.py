"""Real components on loopback for the outbound tests: the herald binary, an
SMTP server (aiosmtpd) whose mails the tests read back, and a webhook
receiver that checks every signature with an independent implementation
(standardwebhooks) and answers as each test directs.

Nothing here is a mock: Herald talks SMTP and HTTP to real servers. Waits are
on events (a mail or request arriving, the job queue draining), each bounded
so a hang fails the test instead of stalling the suite.
"""

import asyncio
import base64
import email
import email.policy
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("HERALD_BIN", str(ROOT / "target/debug/herald"))
# Long enough for a slow shared machine; only reached when something hangs.
WAIT = 30.0
SECRET = "whsec_" + base64.b64encode(b"outbound-tests-secret-32-bytes!!").decode()


def free_port():
    """A port nothing listens on right now (for a server started later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what, timeout=WAIT):
    """Polls `predicate` (a cheap local check or an API call) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Herald:
    """One `herald serve` process on port 0, with its own data directory;
    restartable on the same data and port."""

    def __init__(self, env=None, config=""):
        self.dir = tempfile.TemporaryDirectory(prefix="herald-outbound-")
        self.data = Path(self.dir.name) / "data"
        self.config = Path(self.dir.name) / "herald.toml"
        self.config.write_text(config)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        self.env.update({"HERALD_LOG": os.environ.get("HERALD_TEST_LOG", "warn")})
        self.env.update(env or {})
        self.proc = None
        self.url = None
        self.start("127.0.0.1:0")

    def start(self, http):
        args = [BIN, "serve", "--config", str(self.config), "--http", http, "--mqtt", "off", "--data", str(self.data)]
        self.proc = subprocess.Popen(args, cwd=self.dir.name, env=self.env, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("herald listening on "), f"unexpected first line {line!r}"
        self.url = line.split()[-1]
        self.proc.stdout.readline()  # the MQTT line

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=WAIT)

    def restart(self, env=None):
        assert self.proc.poll() is not None, "stop or kill first"
        self.env.update(env or {})
        self.start(self.url.removeprefix("http://"))

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.kill9()
        self.dir.cleanup()

    def api(self, method, path, body=None, token=None, expect=200):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as res:
                status, text = res.status, res.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        assert status == expect, f"{method} {path}: {status} {text}"
        return json.loads(text) if text else None

    def notify(self, **body):
        return self.api("POST", "/api/notifications", body)

    def jobs(self, state):
        return self.api("GET", f"/api/jobs?state={state}")["jobs"]

    def outbound(self):
        return self.api("GET", "/api/stats")["outbound"]

    def drained(self):
        """Nothing pending or running: nothing more will be sent."""
        jobs = self.outbound()["jobs"]
        return jobs["pending"] == 0 and jobs["running"] == 0

    def wait_drained(self):
        wait_until(self.drained, "the job queue to drain")


@pytest.fixture
def herald():
    """Starts servers for a test (herald(env=..., config=...)) and kills
    whatever is left at its end."""
    started = []

    def start(env=None, config=""):
        h = Herald(env, config)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


# ---- SMTP -------------------------------------------------------------------


class Mail:
    def __init__(self, envelope):
        self.rcpt = list(envelope.rcpt_tos)
        self.msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.subject = str(self.msg["Subject"])
        self.message_id = str(self.msg["Message-ID"])
        self.body = self.msg.get_content().replace("\r\n", "\n")


class SmtpSink:
    """aiosmtpd on a loopback port. `plan` lists the answers to the next DATA
    commands ("451 ..." / "550 ..." / "stall": record, then never answer);
    when it runs out, every mail is accepted (250). `attempts` is every DATA
    received, `accepted` the mails answered 250."""

    def __init__(self, port=None, plan=()):
        self.port = port or free_port()
        self.plan = list(plan)
        self.attempts = []
        self.accepted = []
        self.cond = threading.Condition()
        self.released = None  # set by the stalled handler's loop
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        mail = Mail(envelope)
        with self.cond:
            self.attempts.append(mail)
            answer = self.plan.pop(0) if self.plan else "250 OK"
            if answer.startswith("250"):
                self.accepted.append(mail)
            self.cond.notify_all()
        if answer == "stall":
            await asyncio.Event().wait()  # never answers; the client is killed meanwhile
        return answer

    def wait(self, n, accepted=True):
        with self.cond:
            got = self.cond.wait_for(lambda: len(self.accepted if accepted else self.attempts) >= n, WAIT)
        assert got, f"expected {n} mails, got {len(self.accepted)} accepted of {len(self.attempts)}"
        return (self.accepted if accepted else self.attempts)[:n]

    def stop(self):
        self.controller.stop()


@pytest.fixture
def smtp():
    sinks = []

    def start(**kw):
        s = SmtpSink(**kw)
        sinks.append(s)
        return s

    yield start
    for s in sinks:
        s.stop()


# ---- Webhooks ---------------------------------------------------------------


class Received:
    def __init__(self, headers, body, status, verified):
        self.headers = headers
        self.id = headers.get("webhook-id")
        self.body = body
        self.event = json.loads(body)
        self.status = status
        self.verified = verified
        self.at = time.monotonic()


class Receiver:
    """An HTTP server that verifies each request's Standard Webhooks
    signature with `standardwebhooks` and answers per `plan`: a list of
    (status, headers) or "stall" (hold the request until the connection
    drops), then 200 for everything after; each answer after `delay`
    seconds."""

    def __init__(self, plan=(), secret=SECRET, delay=0.0):
        self.plan = list(plan)
        self.delay = delay
        self.verifier = Webhook(secret)
        self.requests = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    receiver.verifier.verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    verified = False
                with receiver.cond:
                    answer = receiver.plan.pop(0) if receiver.plan else (200, {})
                    status = None if answer == "stall" else answer[0]
                    receiver.requests.append(Received(headers, body, status, verified))
                    receiver.cond.notify_all()
                if answer == "stall":
                    # Hold the request: the server is killed meanwhile.
                    time.sleep(WAIT)
                    return
                status, extra = answer
                time.sleep(receiver.delay)  # a slow receiver: sends are in flight for a while
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n):
        with self.cond:
            got = self.cond.wait_for(lambda: len(self.requests) >= n, WAIT)
        assert got, f"expected {n} webhook requests, got {len(self.requests)}"
        return self.requests[:n]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    started = []

    def start(**kw):
        r = Receiver(**kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def fallback_env(delay="300ms", channels="email", retry="200ms,400ms", **extra):
    """Settings for a server whose fallback acts quickly."""
    env = {
        "HERALD_FALLBACK_ENABLED": "true",
        "HERALD_FALLBACK_DELAY": delay,
        "HERALD_FALLBACK_CHANNELS": channels,
        "HERALD_FALLBACK_RETRY": retry,
        "HERALD_FALLBACK_MIN_INTERVAL": "1h",
        "HERALD_JOBS_SWEEP": "1h",  # the sweep at start only, unless a test wants more
    }
    env.update({f"HERALD_{k.upper()}": v for k, v in extra.items()})
    return env
