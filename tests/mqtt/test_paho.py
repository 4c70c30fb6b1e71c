"""MQTT interoperability with the Eclipse Paho Python client (paho-mqtt 2.x),
over TCP and over WebSocket (/mqtt, subprotocol "mqtt"), against the real
herald binary ($HERALD_BIN, else target/debug/herald).

Run:  python3 -m pip install --target tests/mqtt/.pydeps -r tests/mqtt/requirements.txt
      PYTHONPATH=tests/mqtt/.pydeps python3 -m pytest -q tests/mqtt

Every wait is bounded (PATIENCE); nothing sleeps to synchronise.
"""

import json
import os
import queue
import subprocess
import threading
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

PATIENCE = 10  # seconds any single expected event may take
ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}


class Herald:
    """A running `herald serve` on ports chosen by the OS, like the Rust harness."""

    def __init__(self, data_dir, env=None):
        binary = os.environ.get("HERALD_BIN") or str(ROOT / "target" / "debug" / "herald")
        if not Path(binary).exists():
            pytest.fail(f"no herald binary at {binary}: build it (cargo build -p herald) or set HERALD_BIN")
        full_env = dict(os.environ, HERALD_LOG="warn", **(env or {}))
        self.proc = subprocess.Popen(
            [binary, "serve", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--data", str(data_dir)],
            stdout=subprocess.PIPE,
            env=full_env,
            text=True,
        )
        first = self.proc.stdout.readline().strip()
        second = self.proc.stdout.readline().strip()
        assert first.startswith("herald listening on http://"), first
        assert second.startswith("herald mqtt listening on "), second
        self.url = first.removeprefix("herald listening on ")
        self.http_host, http_port = self.url.removeprefix("http://").rsplit(":", 1)
        self.http_port = int(http_port)
        self.mqtt_host, mqtt_port = second.removeprefix("herald mqtt listening on ").rsplit(":", 1)
        self.mqtt_port = int(mqtt_port)

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=PATIENCE)

    def http(self, method, path, body=None, content_type="text/plain"):
        data = None
        headers = {}
        if body is not None:
            data = body.encode() if isinstance(body, str) else body
            headers["content-type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=PATIENCE) as res:
            return res.status, json.loads(res.read() or b"null")


@pytest.fixture
def herald(tmp_path):
    h = Herald(tmp_path / "data")
    yield h
    h.stop()


class Client:
    """A paho client with its network loop in a thread and bounded waits on
    what it receives."""

    def __init__(self, herald, client_id, protocol="v311", transport="tcp", will=None):
        self.messages = queue.Queue()
        self.subacks = {}
        self.acked = threading.Condition()
        self.connected = threading.Event()
        self.connect_rc = None
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=PROTOCOLS[protocol],
            transport=transport,
        )
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe
        if will:
            self.c.will_set(*will)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
            host, port = herald.http_host, herald.http_port
        else:
            host, port = herald.mqtt_host, herald.mqtt_port
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(PATIENCE), "CONNACK within 10s"
        assert not self.connect_rc.is_failure, f"connect refused: {self.connect_rc}"

    def _on_connect(self, _c, _u, _flags, rc, _props):
        self.connect_rc = rc
        self.connected.set()

    def _on_subscribe(self, _c, _u, mid, codes, _props):
        with self.acked:
            self.subacks[mid] = codes
            self.acked.notify_all()

    def subscribe(self, topic, qos):
        rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.subacks, PATIENCE), "SUBACK within 10s"
            return self.subacks[mid]

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=PATIENCE)
        assert info.is_published(), f"publish to {topic} completed"

    def message(self):
        try:
            return self.messages.get(timeout=PATIENCE)
        except queue.Empty:
            pytest.fail("an MQTT message within 10s")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def connected(herald, request, *args, **kwargs):
    c = Client(herald, *args, **kwargs)
    request.addfinalizer(c.close)
    return c


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
@pytest.mark.parametrize("protocol", ["v311", "v5"])
def test_qos_0_1_2_round_trip(herald, request, transport, protocol):
    topic = f"py/{transport}/{protocol}"
    sub = connected(herald, request, f"sub-{transport}-{protocol}", protocol, transport)
    codes = sub.subscribe(topic, 2)
    assert [int(getattr(c, "value", c)) for c in codes] == [2], codes
    pub = connected(herald, request, f"pub-{transport}-{protocol}", protocol, transport)
    for qos in (0, 1, 2):
        pub.publish(topic, f"q{qos}", qos=qos)
    for qos in (0, 1, 2):
        m = sub.message()
        assert (m.topic, m.payload, m.qos, m.retain) == (topic, f"q{qos}".encode(), qos, False)


def test_paho_publish_over_tcp_is_stored_and_polled_over_http(herald, request):
    c = connected(herald, request, "py-poll", "v5")
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    c.publish("py/poll", json.dumps({"n": 1}), qos=1, properties=props)
    c.publish("py/poll", "plain text", qos=2)
    status, body = herald.http("GET", "/api/channels/py/poll/messages?since=0")
    assert status == 200
    assert [(m["id"], m["data"]) for m in body["messages"]] == [(1, {"n": 1}), (2, "plain text")]


def test_http_publish_reaches_paho_over_websocket(herald, request):
    c = connected(herald, request, "py-ws-in", "v311", "websockets")
    c.subscribe("py/ws/+", 1)
    status, body = herald.http("POST", "/api/channels/py/ws/in", json.dumps({"hello": "ws"}), "application/json")
    assert (status, body["id"]) == (200, 1)
    m = c.message()
    assert m.topic == "py/ws/in"
    assert json.loads(m.payload) == {"hello": "ws"}


def test_websocket_and_tcp_clients_share_topics_and_retained_messages(herald, request):
    tcp = connected(herald, request, "py-mix-tcp", "v5", "tcp")
    tcp.publish("py/mix/state", "on", qos=1, retain=True)
    ws = connected(herald, request, "py-mix-ws", "v5", "websockets")
    ws.subscribe("py/mix/#", 1)
    m = ws.message()
    assert (m.topic, m.payload, m.retain) == ("py/mix/state", b"on", True)
    # Topics that are not channel names are routed between MQTT clients of
    # either transport too.
    ws.subscribe("/py/raw", 1)
    tcp.publish("/py/raw", "raw", qos=1)
    m = ws.message()
    assert (m.topic, m.payload, m.retain) == ("/py/raw", b"raw", False)


def test_will_of_a_websocket_client_reaches_a_tcp_client(herald, request):
    watcher = connected(herald, request, "py-will-watch", "v311")
    watcher.subscribe("py/wills/#", 1)
    victim = Client(herald, "py-will-victim", "v5", "websockets", will=("py/wills/ws", "ws gone", 1))
    # Cut the connection without DISCONNECT.
    victim.c.loop_stop()
    victim.c.socket().close()
    m = watcher.message()
    assert (m.topic, m.payload) == ("py/wills/ws", b"ws gone")
