"""The guards over MQTT, with real clients (Eclipse Paho's Python client and
mosquitto_sub) against the real herald binary: connection limits answered in
the CONNACK, publishes over their rate refused (MQTT 5 PUBACK 0x97) or held
(MQTT 3.1.1, which cannot refuse one), a flood disconnected (0x96), and a
publish moderation rejects refused with 0x83 and a reason, never delivered.

Loopback is exempt from limits by default: each test exempts only
127.0.0.1 and plays limited clients from 127.0.0.2, 127.0.0.3, ... (paho's
bind_address, mosquitto_sub's -A).

Run:  PYTHONPATH=tests/mqtt/.pydeps python3 -m pytest -q tests/mqtt/test_guards.py
"""

import queue
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from test_paho import PATIENCE, Herald

# Reason codes (MQTT 5.0, 2.4).
SUCCESS = 0x00
IMPLEMENTATION_SPECIFIC = 0x83
SERVER_BUSY = 0x89
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
CONNECTION_RATE_EXCEEDED = 0x9F


def start(tmp_path, request, config=None, **env):
    """A herald with HERALD_LIMITS_EXEMPT=127.0.0.1 and `env`; `config`:
    herald.toml text (for what the environment cannot set)."""
    full = {"HERALD_LIMITS_EXEMPT": "127.0.0.1", **env}
    if config:
        path = tmp_path / "herald.toml"
        path.write_text(config)
        full["HERALD_CONFIG"] = str(path)
    h = Herald(tmp_path / "data", env=full)
    request.addfinalizer(h.stop)
    return h


class Client:
    """A paho client from `source` (a loopback address), MQTT 5 or 3.1.1,
    recording what the server answers: the CONNACK, each acknowledgement
    with its reason string, messages, and the DISCONNECT."""

    def __init__(self, herald, request, client_id, source="127.0.0.1", protocol=mqtt.MQTTv5):
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.acked = threading.Condition()
        self.acks = {}
        self.messages = queue.Queue()
        self.connect_rc = self.disconnect_rc = None
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, reconnect_on_failure=False
        )
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_publish = self._on_publish
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.connect(herald.mqtt_host, herald.mqtt_port, keepalive=30, bind_address=source)
        self.c.loop_start()
        request.addfinalizer(self.stop)
        assert self.connected.wait(PATIENCE), "CONNACK within 10s"

    def _on_connect(self, _c, _u, _flags, rc, props):
        self.connect_rc, self.connack_props = rc, props
        self.connected.set()

    def _on_disconnect(self, _c, _u, _flags, rc, props):
        self.disconnect_rc, self.disconnect_props = rc, props
        self.disconnected.set()

    def _on_publish(self, _c, _u, mid, rc, props):
        with self.acked:
            self.acks[mid] = (rc, getattr(props, "ReasonString", None))
            self.acked.notify_all()

    def publish(self, topic, payload, qos=1):
        """Publishes at QoS 1 and returns the PUBACK's (code, reason string)."""
        info = self.c.publish(topic, payload, qos=qos)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, PATIENCE), "PUBACK within 10s"
            rc, reason = self.acks[info.mid]
        return rc.value, reason

    def subscribe(self, topic):
        done = threading.Event()
        self.c.on_subscribe = lambda *_: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(PATIENCE), "SUBACK within 10s"

    def message(self):
        try:
            return self.messages.get(timeout=PATIENCE)
        except queue.Empty:
            pytest.fail("an MQTT message within 10s")

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def refused_code(herald, request, client_id, source):
    c = Client(herald, request, client_id, source)
    assert c.connect_rc.is_failure, f"{client_id} was let in"
    return c.connect_rc.value, getattr(c.connack_props, "ReasonString", None)


def test_connack_quota_exceeded_for_too_many_connections_from_one_address(tmp_path, request):
    h = start(tmp_path, request, HERALD_LIMITS_CONNECTIONS_PER_IP="1")
    first = Client(h, request, "a", "127.0.0.2")
    assert not first.connect_rc.is_failure
    code, reason = refused_code(h, request, "b", "127.0.0.2")
    assert code == QUOTA_EXCEEDED
    assert "connections open" in reason, reason
    # Another address is not affected.
    assert not Client(h, request, "c", "127.0.0.3").connect_rc.is_failure


def test_connack_connection_rate_exceeded(tmp_path, request):
    h = start(tmp_path, request, HERALD_LIMITS_CONNECTIONS_RATE_PER_IP="2/h")
    for cid in ("a", "b"):
        Client(h, request, cid, "127.0.0.2").stop()
    code, _ = refused_code(h, request, "c", "127.0.0.2")
    assert code == CONNECTION_RATE_EXCEEDED


def test_connack_server_busy_when_the_node_is_full(tmp_path, request):
    h = start(tmp_path, request, HERALD_LIMITS_CONNECTIONS_MAX="1")
    # An exempt client is counted, never refused.
    assert not Client(h, request, "local", "127.0.0.1").connect_rc.is_failure
    code, _ = refused_code(h, request, "remote", "127.0.0.2")
    assert code == SERVER_BUSY
    status, stats = h.http("GET", "/api/stats")
    assert stats["guards"]["connections_refused"]["busy"] == 1


def test_mosquitto_sub_over_mqtt_311_is_refused_as_server_unavailable(tmp_path, request):
    h = start(tmp_path, request, HERALD_LIMITS_CONNECTIONS_PER_IP="1")
    Client(h, request, "holder", "127.0.0.2", protocol=mqtt.MQTTv311)
    run = subprocess.run(
        ["mosquitto_sub", "-V", "mqttv311", "-A", "127.0.0.2", "-h", h.mqtt_host, "-p", str(h.mqtt_port),
         "-t", "news", "-C", "1", "-W", str(PATIENCE)],
        capture_output=True, text=True, timeout=PATIENCE * 2,
    )
    # CONNACK return code 3, "server unavailable" (mosquitto calls it "broker unavailable").
    assert run.returncode == 3, run
    assert "unavailable" in run.stderr, run


def test_puback_0x97_over_the_rate_then_disconnect_0x96_when_the_flood_goes_on(tmp_path, request):
    h = start(
        tmp_path,
        request,
        HERALD_LIMITS_PUBLISH_PER_CONNECTION="1/h",
        HERALD_LIMITS_PUBLISH_PER_USER="0",
        HERALD_LIMITS_PUBLISH_BURST="3",
    )
    sub = Client(h, request, "sub")
    sub.subscribe("room")
    c = Client(h, request, "flooder", "127.0.0.2")
    for n in range(3):
        assert c.publish("room", f"m{n}") == (SUCCESS, None)
    code, reason = c.publish("room", "over")
    assert code == QUOTA_EXCEEDED
    assert "too many publishes" in reason, reason
    assert [sub.message().payload for _ in range(3)] == [b"m0", b"m1", b"m2"]
    # Publishing on regardless: reads pause for the rate, and a client that
    # has sent more each time they resume is flooding.
    for n in range(30):
        c.c.publish("room", f"flood {n}", qos=0)
    assert c.disconnected.wait(PATIENCE), "the flooder is disconnected"
    assert c.disconnect_rc.value == MESSAGE_RATE_TOO_HIGH, c.disconnect_rc
    status, stats = h.http("GET", "/api/stats")
    assert stats["guards"]["floods_closed"] == 1
    # Nothing over the rate was delivered.
    assert sub.messages.empty()


def test_mqtt_311_publishes_over_the_rate_are_held_not_lost(tmp_path, request):
    h = start(
        tmp_path,
        request,
        HERALD_LIMITS_PUBLISH_PER_CONNECTION="5/s",
        HERALD_LIMITS_PUBLISH_PER_USER="0",
        HERALD_LIMITS_PUBLISH_BURST="1",
    )
    sub = Client(h, request, "sub", protocol=mqtt.MQTTv311)
    sub.subscribe("room")
    c = Client(h, request, "fast", "127.0.0.2", protocol=mqtt.MQTTv311)
    infos = [c.c.publish("room", f"m{n}", qos=1) for n in range(6)]
    for info in infos:
        info.wait_for_publish(timeout=PATIENCE)
        assert info.is_published(), "every publish acknowledged"
    assert [sub.message().payload for _ in range(6)] == [f"m{n}".encode() for n in range(6)]
    status, stats = h.http("GET", "/api/stats")
    assert stats["guards"]["publishes_limited"]["per_connection"] >= 1, "some were held"


RULES = """
[[moderation.rules]]
channels = ["chat/#"]
words = ["darn"]
"""


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_moderation_refuses_with_0x83_and_a_reason_and_delivers_nothing(tmp_path, request, transport):
    h = start(tmp_path, request, config=RULES)
    sub = Client(h, request, "sub")
    sub.subscribe("chat/room")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5, transport=transport)
    acks = {}
    acked = threading.Condition()

    def on_publish(_c, _u, mid, rc, props):
        with acked:
            acks[mid] = (rc.value, getattr(props, "ReasonString", None))
            acked.notify_all()

    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.on_publish = on_publish
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
        c.connect(h.http_host, h.http_port)
    else:
        c.connect(h.mqtt_host, h.mqtt_port)
    c.loop_start()
    request.addfinalizer(c.loop_stop)
    assert connected.wait(PATIENCE)

    def publish(payload, qos=1):
        info = c.publish("chat/room", payload, qos=qos)
        with acked:
            assert acked.wait_for(lambda: info.mid in acks, PATIENCE)
            return acks[info.mid]

    code, reason = publish("oh darn")
    assert code == IMPLEMENTATION_SPECIFIC
    assert "content_rejected" in reason and "words" in reason, reason
    # QoS 2: PUBREC 0x83 ends the exchange (paho reports its own PUBREL's end).
    assert publish('{"msg":"DARN"}', qos=2)[0] >= 0x80
    c.publish("chat/room", "darn at QoS 0", qos=0)
    assert publish("fine") == (SUCCESS, None)
    # The next message the subscriber gets is the accepted one.
    assert sub.message().payload == b"fine"
    assert sub.messages.empty()
    status, stats = h.http("GET", "/api/stats")
    assert stats["guards"]["moderation"]["rejected"]["words"] == 3


def test_moderation_over_mqtt_311_acknowledges_as_its_spec_allows_and_delivers_nothing(tmp_path, request):
    h = start(tmp_path, request, config=RULES)
    sub = Client(h, request, "sub", protocol=mqtt.MQTTv311)
    sub.subscribe("chat/room")
    c = Client(h, request, "pub", protocol=mqtt.MQTTv311)
    # MQTT 3.1.1 (3.3.5) can only acknowledge or close; the message goes nowhere.
    assert c.publish("chat/room", "darn")[0] == SUCCESS
    c.publish("chat/room", "fine")
    assert sub.message().payload == b"fine"
    status, v = h.http("GET", "/api/channels/chat/room/messages")
    assert [m["data"] for m in v["messages"]] == ["fine"]
