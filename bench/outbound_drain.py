#!/usr/bin/env python3
"""Unread fallback under load, measured on a real server and a real webhook
receiver on loopback.

Starts `herald serve` (release build) with fallback by webhook, no send rate,
and a receiver that answers 200 at once. Then:

1. notify cost: the median and p99 latency of POST /api/notifications (one
   user each) with fallback on, against a server with it off;
2. drain: N users are each notified once with the same short delay; from the
   moment they fall due, how long until the receiver has every user's
   notification.unread event, and the sends per second that makes;
3. one call, N users: a single POST naming all N users (N notifications in
   one commit, more than the commit listener's queue takes: the sweep it asks
   for picks up the rest), time until every event arrived.

Loopback only; bounded in count.

    python3 bench/outbound_drain.py [--bin target/release/herald] [-n 2000]
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec_" + base64.b64encode(b"bench-secret-of-32-bytes-long!!!").decode()


class Receiver:
    def __init__(self):
        self.users = set()
        self.times = []
        self.cond = threading.Condition()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                user = json.loads(body)["data"]["user"]
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with outer.cond:
                    outer.users.add(user)
                    outer.times.append(time.monotonic())
                    outer.cond.notify_all()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, users, timeout=300):
        with self.cond:
            ok = self.cond.wait_for(lambda: users <= self.users, timeout)
        assert ok, f"{len(users - self.users)} users never got their event"
        return time.monotonic()


def start(binary, env):
    d = tempfile.mkdtemp(prefix="herald-drain-")
    full = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    full.update({"HERALD_LOG": "warn", **env})
    args = [binary, "serve", "--http", "127.0.0.1:0", "--mqtt", "off", "--data", f"{d}/data"]
    p = subprocess.Popen(args, cwd=d, env=full, stdout=subprocess.PIPE)
    url = p.stdout.readline().decode().split()[-1]
    p.stdout.readline()
    return p, url


def notify(url, body):
    req = urllib.request.Request(url + "/api/notifications", data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req) as r:
        r.read()


def latencies(url, prefix, n):
    out = []
    for i in range(n):
        t = time.perf_counter()
        notify(url, {"users": [f"{prefix}{i}"], "title": "t"})
        out.append((time.perf_counter() - t) * 1000)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.99) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/herald")
    ap.add_argument("-n", type=int, default=2000)
    a = ap.parse_args()
    a.bin = os.path.abspath(a.bin)
    n = a.n
    rx = Receiver()
    fallback = {
        "HERALD_FALLBACK_ENABLED": "true",
        "HERALD_FALLBACK_CHANNELS": "webhook",
        "HERALD_WEBHOOKS_URL": rx.url,
        "HERALD_WEBHOOKS_SECRET": SECRET,
        "HERALD_WEBHOOKS_RATE": "0",
        "HERALD_FALLBACK_DELAY": "1h",  # part 1: nothing falls due
    }

    off, url = start(a.bin, {})
    m_off, p_off = latencies(url, "off", n)
    off.kill()
    on, url = start(a.bin, fallback)
    m_on, p_on = latencies(url, "on", n)
    on.kill()
    print(f"notify, {n} calls one after another: fallback off median {m_off:.2f} ms p99 {p_off:.2f} ms; "
          f"on median {m_on:.2f} ms p99 {p_on:.2f} ms")

    delay = 3.0
    srv, url = start(a.bin, {**fallback, "HERALD_FALLBACK_DELAY": f"{int(delay * 1000)}ms"})
    t0 = time.monotonic()
    users = {f"d{i}" for i in range(n)}
    for u in sorted(users):
        notify(url, {"users": [u], "title": "drain"})
    sent = time.monotonic() - t0
    if sent > delay:
        print(f"(sending took {sent:.1f} s, longer than the {delay} s delay: the drain overlaps the sends)")
    done = rx.wait_for(users)
    due = t0 + delay  # the first notification's due time
    print(f"drain: {n} users' events in {done - due:.2f} s after the first fell due "
          f"({n / max(done - max(due, t0 + sent), 1e-9):.0f}/s once all were due and sent)")

    rx.users.clear()
    batch = {f"b{i}" for i in range(n)}
    t = time.monotonic()
    notify(url, {"users": sorted(batch), "title": "one call", "fallback": {"delay": "1s"}})
    done = rx.wait_for(batch)
    print(f"one call naming {n} users: every event {done - t:.2f} s after the call (delay 1 s)")
    srv.kill()


if __name__ == "__main__":
    main()
