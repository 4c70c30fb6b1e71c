#!/usr/bin/env python3
"""Group notification cost against group size, measured on a real server.

Starts `herald serve` (release build) on a fresh data directory, fills groups of
1, 1,000 and 100,000 members, then for each group sends N notifications one
after another and reports the median and p99 latency of POST /api/notifications,
the rows written to the store per notification, and the time to read one
member's unread count. Loopback only; bounded in count.

    python3 bench/inbox_fanout.py [--bin target/release/herald] [-n 200]
"""
import argparse, json, os, sqlite3, statistics, subprocess, tempfile, time, urllib.request

KEY = "bench-key"

def call(base, method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("authorization", f"Bearer {KEY}")
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())

def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    out.sort()
    return statistics.median(out), out[min(len(out) - 1, int(len(out) * 0.99))]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/herald")
    ap.add_argument("-n", type=int, default=200)
    a = ap.parse_args()
    data = tempfile.mkdtemp(prefix="herald-bench-")
    env = dict(os.environ, HERALD_AUTH_API_KEYS=KEY, HERALD_LOG="warn")
    p = subprocess.Popen([a.bin, "serve", "--http", "127.0.0.1:0", "--data", data], stdout=subprocess.PIPE, env=env, text=True)
    try:
        base = p.stdout.readline().strip().removeprefix("herald listening on ")
        rows = lambda: sqlite3.connect(os.path.join(data, "herald.db")).execute("SELECT count(*) FROM messages").fetchone()[0]
        print(f"| members | notify p50 (ms) | notify p99 (ms) | rows written per notification | unread count p50 (ms) |")
        print(f"|---:|---:|---:|---:|---:|")
        for size in (1, 1_000, 100_000):
            group = f"g{size}"
            users = [f"u{i}" for i in range(size)]
            for i in range(0, size, 50_000):
                call(base, "PUT", f"/api/groups/{group}/members", {"users": users[i:i + 50_000]})
            before = rows()
            p50, p99 = timed(lambda: call(base, "POST", "/api/notifications", {"group": group, "title": "t"}), a.n)
            per = (rows() - before) / a.n
            c50, _ = timed(lambda: call(base, "GET", f"/api/users/u{size - 1}/unread"), a.n)
            assert call(base, "GET", f"/api/users/u{size - 1}/unread")["count"] == a.n
            print(f"| {size:,} | {p50:.2f} | {p99:.2f} | {per:g} | {c50:.2f} |")
    finally:
        p.terminate()
        p.wait()

if __name__ == "__main__":
    main()
