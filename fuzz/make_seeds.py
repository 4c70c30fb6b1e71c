#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus (fuzz/seeds/TARGET/), by hand for
WebSocket frames, request heads, channel names, filters and cursors, and for
MQTT from real traffic: mosquitto_pub and mosquitto_sub (MQTT 3.1.1 and 5.0)
talking to a mosquitto broker through a recording proxy on loopback, so the
seeds are packets of every type as real clients and a real broker write them
(AUTH, which neither sends, is written by hand).

Run it again only to change the seeds; its output is committed.
    python3 fuzz/make_seeds.py     (needs mosquitto and mosquitto-clients)
"""

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- WebSocket frames: first byte picks the limit (low 3 bits: index into
# the target's LIMITS; 7 = 1 MiB) and how the bytes arrive (the rest).

def ws_frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d", masked=True):
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if not masked:
        return bytes(head) + payload
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def websocket_seeds():
    big, split = 0x07, 0x07 | (5 << 3)  # 1 MiB limit; whole, or in pieces
    close = lambda code, reason=b"": ws_frame(8, struct.pack(">H", code) + reason)
    seeds = {
        # RFC 6455 section 5.7's examples.
        "rfc_masked_hello": bytes([big]) + bytes.fromhex("818537fa213d7f9f4d5158"),
        "rfc_unmasked_hello": bytes([big]) + bytes.fromhex("810548656c6c6f"),
        "rfc_fragmented_unmasked": bytes([big]) + bytes.fromhex("010348656c80026c6f"),
        "rfc_ping": bytes([big]) + bytes.fromhex("8985") + b"\x37\xfa\x21\x3d" + bytes(b ^ k for b, k in zip(b"Hello", b"\x37\xfa\x21\x3d\x37")),
        "text": bytes([big]) + ws_frame(1, "héllo wörld €".encode()),
        "binary_mqtt_connect": bytes([split]) + ws_frame(2, bytes.fromhex("101000044d5154540402003c0004746573740000")[:18]),
        "binary_256": bytes([big]) + ws_frame(2, bytes(range(256))),
        "binary_64bit_length": bytes([big]) + bytes([0x82, 0xFF]) + struct.pack(">Q", 3) + b"\x01\x02\x03\x04" + b"abc",
        "fragmented_with_ping": bytes([split])
        + ws_frame(1, "hé".encode(), fin=False)
        + ws_frame(9, b"ping")
        + ws_frame(0, b"llo", fin=False)
        + ws_frame(0, "€".encode())
        + ws_frame(10, b"pong"),
        "split_utf8": bytes([big]) + ws_frame(1, b"\xe2\x82", fin=False) + ws_frame(0, b"\xac"),
        "close_normal": bytes([big]) + close(1000),
        "close_reason": bytes([big]) + close(1001, "going away ⚠".encode()),
        "close_app_code": bytes([big]) + close(4000, b"app"),
        "close_empty": bytes([big]) + ws_frame(8, b""),
        "close_reserved_code": bytes([big]) + close(1005),
        "close_one_byte": bytes([big]) + ws_frame(8, b"\x03"),
        "close_bad_utf8": bytes([big]) + close(1000, b"\xc3\x28"),
        "over_limit": bytes([0x03]) + ws_frame(2, bytes(200)),
        "control_too_long": bytes([big]) + ws_frame(9, bytes(126)),
        "fragmented_control": bytes([big]) + ws_frame(9, b"x", fin=False),
        "unmasked": bytes([big]) + ws_frame(1, b"x", masked=False),
        "rsv_bits": bytes([big]) + bytes([0xC1]) + ws_frame(1, b"x")[1:],
        "unknown_opcode": bytes([big]) + ws_frame(3, b""),
        "continuation_alone": bytes([big]) + ws_frame(0, b"x"),
        "new_message_mid_fragment": bytes([big]) + ws_frame(1, b"a", fin=False) + ws_frame(1, b"b"),
        "not_utf8": bytes([big]) + ws_frame(1, b"\xff\xfe"),
        "header_only_claims_2_63": bytes([big]) + bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 62) + b"\0\0\0\0",
    }
    for name, data in seeds.items():
        write("ws_frames", name, data)


# --- Request heads as the front door reads them.

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def front_door_seeds():
    crlf = lambda *lines: "\r\n".join(lines) + "\r\n\r\n"
    seeds = {
        "sse": crlf("GET /api/channels/chat/room/events HTTP/1.1", "Host: localhost:8080", "Accept: text/event-stream", "Last-Event-ID: 42"),
        "sse_multi": crlf("GET /api/events?channel=chat/a&channel=news&filter=chat/%2B HTTP/1.1", "Host: x", "Accept: text/event-stream", "Last-Event-ID: chat/a=5,news=12"),
        "long_poll": crlf("GET /api/channels/chat/messages?since=4&wait=30 HTTP/1.1", "Host: x", "Authorization: Bearer abc.def.ghi"),
        "poll_cross_origin": crlf("GET /api/channels/chat/messages HTTP/1.1", "Host: x", "Origin: https://app.example"),
        "poll_escaped": crlf("GET /api/channels/chat%2Froom/messages HTTP/1.1", "Host: x"),
        "poll_token_query": crlf("GET /api/channels/user/42/messages?token=t&unread=3 HTTP/1.1", "Host: x"),
        "iframe": crlf("GET /api/channels/news/iframe?since=now HTTP/1.1", "Host: x", "Connection: keep-alive"),
        "connection_close": crlf("GET /healthz HTTP/1.1", "Host: x", "Connection: close"),
        "ws_handshake": crlf("GET /api/ws?token=t HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 13", "Authorization: Bearer b"),
        "ws_handshake_early_frame": crlf("GET /api/ws HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: keep-alive, Upgrade", "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 13")
        + ws_frame(1, b'{"type":"subscribe"}').decode("latin-1"),
        "mqtt_ws_handshake": crlf("GET /mqtt HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: mqtt"),
        "mqtt_ws_v31": crlf("GET /mqtt HTTP/1.1", "Upgrade: WebSocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: chat", "sec-websocket-protocol: MQTTv3.1"),
        "ws_version_8": crlf("GET /api/ws HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 8"),
        "ws_with_body": crlf("GET /api/ws HTTP/1.1", "Upgrade: websocket", "Content-Length: 4") + "body",
        "upgrade_elsewhere": crlf("GET /other HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade"),
        "pipelined": crlf("GET /api/stats HTTP/1.1", "Host: x") + crlf("GET /healthz HTTP/1.1", "Host: x"),
        "publish": crlf("POST /api/channels/chat HTTP/1.1", "Host: x", "Content-Type: application/json", "Content-Length: 13") + '{"text":"hi"}',
        "chunked": crlf("GET / HTTP/1.1", "Transfer-Encoding: chunked") + "0\r\n\r\n",
        "content_length_zero": crlf("GET /api/channels/a/messages HTTP/1.1", "Content-Length: 0"),
        "expect": crlf("GET / HTTP/1.1", "Expect: 100-continue"),
        "http10": crlf("GET /api/channels/a/messages HTTP/1.0"),
        "head": crlf("HEAD / HTTP/1.1", "Host: x"),
        "lf_only": "GET /healthz HTTP/1.1\nHost: x\n\n",
        "poll_fragment": crlf("GET /api/channels/chat/messages?since=4#x HTTP/1.1", "Host: x"),
        "two_authorizations": crlf("GET /api/channels/a/messages HTTP/1.1", "Authorization: Bearer first", "Authorization: Bearer second"),
        "many_headers": crlf("GET / HTTP/1.1", *[f"X-H{i}: {i}" for i in range(60)]),
        "oversized": crlf("GET /api/channels/a/messages HTTP/1.1", "X-Big: " + "a" * 17000),
        "not_http": "NOT HTTP\r\n\r\n",
        "partial": "GET /api/channels/a/events HTTP/1.1\r\nHost: x\r\n",
    }
    for name, data in seeds.items():
        write("front_door", name, data.encode("latin-1") if isinstance(data, str) else data)


def names_seeds():
    # Lines: a filter, a channel, a second filter.
    seeds = {
        "plain": "chat/room/Default\nchat/room/Default\nchat/#",
        "plus": "chat/+/Default\nchat/room/Default\nchat/+/+",
        "hash_parent": "chat/#\nchat\n#",
        "dollar": "#\n$SYS/uptime\n$SYS/#",
        "dollar_plus": "+/uptime\n$SYS/uptime\n$SYS/+",
        "user_inbox": "user/+\nuser/42\nuser/#",
        "all_chars": "a.b~c:d@e-f_g/+\na.b~c:d@e-f_g/X9\n+/+",
        "dots": "..a/b..\n...\na/./b",
        "dot_segment": "a/../b\na/./b\n..",
        "empty_segments": "a//b\n/a\na/",
        "misplaced": "a/#/b\na+\na#",
        "non_ascii": "chat/é\ncafé\n+",
        "max_len": "a" * 255 + "\n" + "b" * 255 + "\n" + "a" * 256,
        "dollar_only": "$\n$/a\n$+",
        "share_filter": "chat/+/Default\nchat/room/Default\n$share/+",
    }
    for name, data in seeds.items():
        write("names", name, data)


def cursors_seeds():
    seeds = {
        "ids": "0\n1\n123\n18446744073709551615\n18446744073709551616\nnow",
        "bad_ids": "-1\n+1\n 1\n1.0\nabc\n007",
        "token": "chat/a=5,news=12",
        "token_dollar": "$SYS/x=1,user/42=9",
        "token_repeated": "a=1,a=2",
        "token_bad": "a=1,\n=1\na==1\na=1,b\na/../b=3",
        "token_max": "a=18446744073709551615,b=0",
        "last_event_id_multi": "chat/room/Default=17,chat/room/Other=3,news=0",
    }
    for name, data in seeds.items():
        write("cursors", name, data)


# --- MQTT from real clients and a real broker.

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Recorder:
    """A TCP proxy on loopback that keeps each connection's bytes, both ways."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sessions = []  # [client bytes, server bytes]
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            rec = [bytearray(), bytearray()]
            with self.lock:
                self.sessions.append(rec)
            threading.Thread(target=self.pump, args=(client, server, rec[0]), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, rec[1]), daemon=True).start()

    @staticmethod
    def pump(src, dst, log):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            log += data
            try:
                dst.sendall(data)
            except OSError:
                return


def packets(stream):
    out, at = [], 0
    while at + 2 <= len(stream):
        n, mult, i = 0, 1, at + 1
        while True:
            b = stream[i]
            n += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        out.append(bytes(stream[at : i + n]))
        at = i + n
    return out


TYPES = {1: "connect", 2: "connack", 3: "publish", 4: "puback", 5: "pubrec", 6: "pubrel", 7: "pubcomp", 8: "subscribe",
         9: "suback", 10: "unsubscribe", 11: "unsuback", 12: "pingreq", 13: "pingresp", 14: "disconnect", 15: "auth"}


def mqtt_seeds():
    if not shutil.which("mosquitto"):
        sys.exit("mosquitto is needed for the MQTT seeds")
    port = free_port()
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    conf.close()
    broker = subprocess.Popen(["mosquitto", "-c", conf.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        rec = Recorder(port)
        p = str(rec.port)
        base = ["-h", "127.0.0.1", "-p", p]
        run = lambda *args: subprocess.run(args, check=True, timeout=20, stdout=subprocess.DEVNULL)
        for v, tag in (("mqttv311", "v311"), ("mqttv5", "v5")):
            v5 = ["-D", "connect", "user-property", "who", "seed"] if tag == "v5" else []
            # A subscriber at QoS 2 that unsubscribes and pings while waiting
            # for four messages, with a will, username and password.
            sub = subprocess.Popen(["mosquitto_sub", *base, "-V", v, "-i", f"sub-{tag}", "-c", "-q", "2", "-k", "5",
                                    "-t", "chat/room/+", "-t", "news/#", "-U", "old/topic", "-C", "4",
                                    "--will-topic", "status/sub", "--will-payload", "gone", "--will-qos", "1", "--will-retain",
                                    "-u", "user", "-P", "secret", *v5,
                                    *(["-D", "subscribe", "subscription-identifier", "7"] if tag == "v5" else [])],
                                   stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            for qos in ("0", "1", "2"):
                props = ["-D", "publish", "user-property", "k", "v", "-D", "publish", "content-type", "text/plain",
                         "-D", "publish", "message-expiry-interval", "30", "-D", "publish", "response-topic", "reply/here",
                         "-D", "publish", "correlation-data", "abc"] if tag == "v5" else []
                run("mosquitto_pub", *base, "-V", v, "-q", qos, "-t", "chat/room/Default", "-m", f"hello {qos} é", *props)
            time.sleep(6)  # past the keep-alive: a PINGREQ and its PINGRESP
            run("mosquitto_pub", *base, "-V", v, "-q", "1", "-r", "-t", "news/today", "-m", '{"json":true}')
            sub.wait(timeout=20)
            run("mosquitto_pub", *base, "-V", v, "-q", "0", "-r", "-t", "news/today", "-n")  # clear the retained message
        time.sleep(0.3)
        seen = set()
        with rec.lock:
            sessions = [(bytes(c), bytes(s)) for c, s in rec.sessions]
        for i, (client, server) in enumerate(sessions):
            level = client[8] if len(client) > 8 else 4
            tag = "v5" if level == 5 else "v311"
            # The whole client stream, as the connection reads it (first
            # byte 0: no size limit, one read; 0x1F: in pieces).
            write("mqtt_stream", f"{tag}_client_session_{i}", b"\x00" + client)
            write("mqtt_stream", f"{tag}_client_session_{i}_pieces", b"\x1f" + client)
            for direction, stream in (("client", client), ("server", server)):
                for pkt in packets(stream):
                    kind = TYPES.get(pkt[0] >> 4, "unknown")
                    digest = hashlib.sha1(pkt).hexdigest()[:8]
                    if (tag, kind, digest) in seen:
                        continue
                    seen.add((tag, kind, digest))
                    # CONNECT first, as every stream starts.
                    write("mqtt_stream", f"{tag}_{direction}_{kind}_{digest}", b"\x00" + pkt)
        kinds = {(t, k) for t, k, _ in seen}
        for tag in ("v311", "v5"):
            missing = set(TYPES.values()) - {"auth"} - {k for t, k in kinds if t == tag}
            if missing:
                print(f"warning: no {tag} {sorted(missing)} captured", file=sys.stderr)
    finally:
        broker.terminate()
        broker.wait()
        os.unlink(conf.name)
    # AUTH (MQTT 5 only; mosquitto's clients do not send it): continue
    # authentication with a method and data, and a bare success.
    auth = bytes([0x18, 0x0D, 0x15, 0x00, 0x05]) + b"SCRAM" + bytes([0x16, 0x00, 0x03]) + b"abc"
    write("mqtt_stream", "v5_client_auth_continue", b"\x00" + bytes([0xF0, len(auth)]) + auth)
    write("mqtt_stream", "v5_client_auth_success", b"\x00" + bytes([0xF0, 0x00]))
    # Framing edge cases: a 4-byte remaining length, a 5th length byte, and a
    # packet over a 16-byte limit.
    write("mqtt_stream", "frame_four_length_bytes", b"\x00\x30\x80\x80\x80\x01")
    write("mqtt_stream", "frame_bad_length", b"\x00\x30\xff\xff\xff\xff\x01")
    write("mqtt_stream", "frame_too_large", b"\x20\x30\x20" + b"\x00\x01t" + b"x" * 29)


if __name__ == "__main__":
    for target in ("ws_frames", "front_door", "names", "cursors"):
        shutil.rmtree(os.path.join(SEEDS, target), ignore_errors=True)
    websocket_seeds()
    front_door_seeds()
    names_seeds()
    cursors_seeds()
    if "--no-mqtt" not in sys.argv:
        for f in os.listdir(os.path.join(SEEDS, "mqtt_stream")) if os.path.isdir(os.path.join(SEEDS, "mqtt_stream")) else []:
            os.unlink(os.path.join(SEEDS, "mqtt_stream", f))
        mqtt_seeds()
