"""MQTT 5 features, one test per feature, with the Eclipse Paho Python client
(paho-mqtt 2.x, MQTT v5) against the real herald binary. Keep-alive is tested
with a raw socket, as a client that stops sending is what it is about.

Run:  PYTHONPATH=tests/mqtt/.pydeps python3 -m pytest -q tests/mqtt/test_mqtt5.py

Waits for events are bounded (PATIENCE). Two kinds of timed waits remain, each
commented where it is: waiting out an interval the test is about (a will delay,
a session or message expiry, a keep-alive), and watching for QUIET seconds that
something does *not* arrive where no later event can prove its absence. Where a
later event can prove it, a marker message is published on the same topic after
the event under test and must be the next message received (messages of one
topic reach a subscriber in order).

Spec references are to OASIS MQTT Version 5.0 (mqtt-v5.0-os).
"""

import queue
import re
import socket
import struct
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from test_paho import PATIENCE, Herald, herald  # noqa: F401 (herald is a fixture)

QUIET = 0.5  # seconds watched for a message that must not come (see above)

# Reason codes (spec 2.4).
NORMAL = 0x00
WITH_WILL = 0x04
PROTOCOL_ERROR = 0x82
KEEP_ALIVE_TIMEOUT = 0x8D
TOPIC_ALIAS_INVALID = 0x94


def props(packet_type, **values):
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def prop(message, name):
    return getattr(message.properties, name, None)


def mqtt_connections(herald):
    status, body = herald.http("GET", "/api/stats")
    assert status == 200
    return body["connections"]["mqtt"]


def sleep_until(deadline):
    time.sleep(max(0.0, deadline - time.monotonic()))


class V5:
    """A paho MQTT 5 client with its loop in a thread, bounded waits on what it
    receives, and closes that wait for the server to have handled them."""

    def __init__(
        self,
        herald,
        client_id,
        *,
        clean_start=True,
        session_expiry=None,
        receive_max=None,
        max_packet_size=None,
        topic_alias_max=None,
        will=None,
        manual_ack=False,
        keepalive=30,
    ):
        self.messages = queue.Queue()
        self.log = queue.Queue()
        self.cond = threading.Condition()
        self.subacks = {}
        self.pubacks = {}
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_rc = self.disconnect_rc = None
        self.session_present = None
        self.connack = None
        self.herald = herald
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_log = lambda _c, _u, _level, line: self.log.put(line)
        if will:
            topic, payload, qos, retain, will_props = will
            self.c.will_set(topic, payload, qos, retain, will_props)
        cp = Properties(PacketTypes.CONNECT)
        for name, value in (
            ("SessionExpiryInterval", session_expiry),
            ("ReceiveMaximum", receive_max),
            ("MaximumPacketSize", max_packet_size),
            ("TopicAliasMaximum", topic_alias_max),
        ):
            if value is not None:
                setattr(cp, name, value)
        self.c.connect(herald.mqtt_host, herald.mqtt_port, keepalive=keepalive, clean_start=clean_start, properties=cp)
        self.c.loop_start()
        assert self.connected.wait(PATIENCE), "CONNACK within 10s"
        assert not self.connect_rc.is_failure, f"connect refused: {self.connect_rc}"

    def _on_connect(self, _c, _u, flags, rc, properties):
        self.connect_rc, self.session_present, self.connack = rc, flags.session_present, properties
        self.connected.set()

    def _on_disconnect(self, _c, _u, _flags, rc, _props):
        self.disconnect_rc = rc
        self.disconnected.set()

    def _on_subscribe(self, _c, _u, mid, codes, _props):
        with self.cond:
            self.subacks[mid] = codes
            self.cond.notify_all()

    def _on_publish(self, _c, _u, mid, rc, _props):
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def subscribe(self, topic, qos=1, *, no_local=False, rap=False, rh=0, sub_id=None):
        options = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap, retainHandling=rh)
        sp = props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=sub_id) if sub_id else None
        rc, mid = self.c.subscribe(topic, options=options, properties=sp)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, PATIENCE), "SUBACK within 10s"
            codes = self.subacks[mid]
        assert [c.value for c in codes] == [qos], codes
        return codes

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        """Publishes and waits for the server's acknowledgement (QoS 1/2), which
        must be a success."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, PATIENCE), f"publish to {topic!r} acknowledged"
            rc = self.pubacks[info.mid]
        assert not rc.is_failure, f"publish to {topic!r} refused: {rc}"

    def message(self, timeout=PATIENCE):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"an MQTT message within {timeout}s")

    def no_message(self, within=QUIET):
        try:
            m = self.messages.get(timeout=within)
        except queue.Empty:
            return
        pytest.fail(f"unexpected message {m.topic!r} {m.payload!r}")

    def ack(self, m):
        assert self.c.ack(m.mid, m.qos) == mqtt.MQTT_ERR_SUCCESS

    def _end(self, raw, settle=True):
        """Sends `raw` (a DISCONNECT, or nothing for a lost connection), shuts
        our side, and waits until the server has handled the end (will
        scheduled, session parked or dropped), which it does just after
        closing its side; its MQTT connection count (/api/stats) drops then.
        A reconnect in between races the server (a CONNECT whose
        Broker::claim comes while the old connection is in Connection::finish
        gets a new session, and the old one is dropped): not what these tests
        are about, so they wait."""
        if not self.disconnected.is_set():
            before = mqtt_connections(self.herald)
            sock = self.c.socket()
            try:
                if raw:
                    sock.sendall(raw)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            assert self.disconnected.wait(PATIENCE), "the server closes the connection"
            deadline = time.monotonic() + PATIENCE
            while settle and mqtt_connections(self.herald) >= before:
                assert time.monotonic() < deadline, "the server ends the connection"
                time.sleep(0.005)  # polling the count: there is nothing to block on
        self.c.loop_stop()

    def close(self, reason=NORMAL, session_expiry=None):
        """A DISCONNECT with `reason` (and a new session expiry, if given)."""
        body = bytes([reason])
        if session_expiry is not None:
            body += b"\x05\x11" + struct.pack("!I", session_expiry)
        self._end(b"\xe0" + bytes([len(body)]) + body)

    def drop(self, settle=True):
        """Ends the connection without DISCONNECT, as a lost network would.
        `settle=False` returns as soon as the server has closed its side."""
        self._end(None, settle)

    def wire_publishes(self):
        """(qos, topic) of the PUBLISH packets received so far, in the order
        the server sent them (paho hands a QoS 2 message to on_message only at
        PUBREL, so that order is not the wire order)."""
        out = []
        while True:
            try:
                line = self.log.get_nowait()
            except queue.Empty:
                return out
            m = re.match(r"Received PUBLISH \(d\d, q(\d), r\d, m\d+\), '([^']*)'", line)
            if m:
                out.append((int(m[1]), m[2]))

    def wait_log(self, needle):
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            try:
                line = self.log.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if needle in line:
                return line
        pytest.fail(f"paho log line containing {needle!r} within {PATIENCE}s")


def v5(herald, request, client_id, **kwargs):
    c = V5(herald, client_id, **kwargs)
    request.addfinalizer(c.close)
    return c


def will(topic, payload, delay=None, **extra):
    wp = props(PacketTypes.WILLMESSAGE, **extra)
    if delay is not None:
        wp.WillDelayInterval = delay
    return (topic, payload, 1, False, wp)


# --- wills -----------------------------------------------------------------


@pytest.mark.parametrize(
    "end, published",
    [("lost", True), ("disconnect 0x00", False), ("disconnect 0x04", True)],
)
def test_will_on_lost_connection_and_disconnect_with_will_not_on_normal_disconnect(herald, request, end, published):
    # Spec 3.1.2.5, 3.14.2.1: the will is published when the connection ends
    # other than by DISCONNECT 0x00; 0x04 asks for it. Its properties travel
    # with it (3.1.3.2).
    watcher = v5(herald, request, "will-watch")
    watcher.subscribe("will/victim", 1)
    victim = v5(
        herald,
        request,
        "will-victim",
        will=will("will/victim", "gone", ContentType="text/plain", UserProperty=("why", "test")),
    )
    if end == "lost":
        victim.drop()
    else:
        victim.close(WITH_WILL if end.endswith("0x04") else NORMAL)
    if published:
        m = watcher.message()
        assert (m.topic, m.payload, m.qos) == ("will/victim", b"gone", 1)
        assert prop(m, "ContentType") == "text/plain"
        assert prop(m, "UserProperty") == [("why", "test")]
    else:
        # The server has closed the connection (close() waits for it), so a
        # will would already be on its way, ahead of this marker.
        v5(herald, request, "will-pub").publish("will/victim", "marker")
        assert watcher.message().payload == b"marker"


def test_will_delay_is_waited_out_and_cancelled_by_resuming_the_session(herald, request):
    # Spec 3.1.3.2.2: the will is published when the Will Delay Interval has
    # passed or the session ends, whichever is first [MQTT-3.1.3-9]: not at
    # all if the client resumes its session within the delay.
    watcher = v5(herald, request, "wd-watch")
    watcher.subscribe("wd/#", 1)
    # The will channels exist before the wills come: the first message of a
    # channel is the one a concurrent session write can make the store refuse
    # (test_publishes_succeed_while_persistent_sessions_are_saved), and the
    # "short" session is forgotten at the moment its will is published.
    setup = v5(herald, request, "wd-setup")
    for t in ("wd/late", "wd/short", "wd/back"):
        setup.publish(t, "exists")
        assert watcher.message().topic == t
    late = v5(herald, request, "wd-late", session_expiry=30, will=will("wd/late", "late gone", delay=1))
    back = v5(herald, request, "wd-back", session_expiry=30, will=will("wd/back", "back gone", delay=1))
    short = v5(herald, request, "wd-short", session_expiry=1, will=will("wd/short", "session ended", delay=60))

    late.drop()
    dropped = {"wd/late": time.monotonic()}
    short.drop()
    dropped["wd/short"] = time.monotonic()
    back.drop()
    back_dropped = time.monotonic()
    resumed = v5(herald, request, "wd-back", clean_start=False, session_expiry=30)
    assert resumed.session_present

    got = {}
    for _ in range(2):
        m = watcher.message()
        got[m.topic] = (m.payload, time.monotonic() - dropped[m.topic])
    assert set(got) == {"wd/late", "wd/short"}, got
    assert got["wd/late"][0] == b"late gone"
    assert got["wd/short"][0] == b"session ended"
    for topic, (_, after) in got.items():
        # Delayed about 1 s: by the will delay (late), by the session expiry
        # that comes before its 60 s delay (short).
        assert 0.9 <= after <= 3.0, (topic, after)

    # Waiting out the resumed client's will delay (1 s from its drop), then a
    # marker on its will topic: its will must not come before the marker.
    sleep_until(back_dropped + 1.5)
    v5(herald, request, "wd-pub").publish("wd/back", "marker")
    m = watcher.message()
    assert (m.topic, m.payload) == ("wd/back", b"marker")



@pytest.mark.parametrize(
    "how, old_expiry, delay, clean_start, published",
    [
        # A takeover that resumes the session within the delay: not sent.
        ("takeover", 30, 5, False, False),
        pytest.param("takeover", 30, 0, False, True),
        pytest.param("takeover", 30, 5, True, True),
        pytest.param("takeover", 0, 5, False, True),
        pytest.param("after loss", 30, 5, True, True),
    ],
)
def test_will_when_the_client_id_connects_again(herald, request, how, old_expiry, delay, clean_start, published):
    # Spec 3.1.3.2.2 (comment): "If a Network Connection uses a Client
    # Identifier of an existing Network Connection to the Server, the Will
    # Message for the exiting connection is sent unless the new connection
    # specifies Clean Start of 0 and the Will Delay is greater than zero. If the
    # Will Delay is 0 the Will Message is sent at the close of the existing
    # Network Connection, and if Clean Start is 1 the Will Message is sent
    # because the Session ends." Also 3.1.4 step 1 and 3.1.2.4 (a session with
    # expiry 0 ends with its connection).
    watcher = v5(herald, request, "again-watch")
    watcher.subscribe("again/old", 1)
    old = v5(herald, request, "again", session_expiry=old_expiry, will=will("again/old", "old gone", delay=delay))
    if how == "after loss":
        old.drop()
    new = v5(herald, request, "again", clean_start=clean_start, session_expiry=30)
    if how == "takeover":
        assert old.disconnected.wait(PATIENCE)
        assert old.disconnect_rc.value == 0x8E  # Session taken over
    if old_expiry > 0:  # (expiry 0 on takeover: see test_session_with_expiry_0_ends_on_takeover)
        assert new.session_present == (not clean_start)
    if published:
        # At once: the will delay (5 s) is not what releases it. 2 s, not
        # PATIENCE: an absent will must not cost 10 s.
        m = watcher.message(timeout=2)
        assert (m.topic, m.payload) == ("again/old", b"old gone")
    else:
        v5(herald, request, "again-pub").publish("again/old", "marker")
        assert watcher.message().payload == b"marker"


# --- sessions --------------------------------------------------------------


def test_session_is_resumed_within_its_expiry_and_gone_after_it(herald, request):
    # Spec 3.1.2.11.2 (Session Expiry Interval), 3.2.2.1.1 (Session Present).
    pub = v5(herald, request, "se-pub")
    kept = v5(herald, request, "se-kept", session_expiry=30)
    short = v5(herald, request, "se-short", session_expiry=1)
    assert (kept.session_present, short.session_present) == (False, False)
    kept.subscribe("se/kept", 1)
    short.subscribe("se/short", 1)
    kept.close()
    short.close()
    closed = time.monotonic()
    pub.publish("se/kept", "missed")

    # Waiting out the short session's 1 s expiry (nothing announces it).
    sleep_until(closed + 1.5)
    kept = v5(herald, request, "se-kept", clean_start=False, session_expiry=30)
    assert kept.session_present
    m = kept.message()  # on the resumed subscription, not subscribed again
    assert (m.topic, m.payload) == ("se/kept", b"missed")

    short = v5(herald, request, "se-short", clean_start=False, session_expiry=30)
    assert not short.session_present
    short.subscribe("se/marker", 1)
    pub.publish("se/short", "to the expired subscription")
    pub.publish("se/marker", "marker")
    assert short.message().topic == "se/marker"


def test_clean_start_discards_the_session_and_the_new_one_persists(herald, request):
    # Spec 3.1.2.4: Clean Start 1 discards an existing session [MQTT-3.1.2-4];
    # Session Present is 0 then [MQTT-3.2.2-2], 1 when one is resumed [MQTT-3.2.2-3].
    pub = v5(herald, request, "cs-pub")
    a = v5(herald, request, "cs", session_expiry=30)
    a.subscribe("cs/old", 1)
    a.close()
    pub.publish("cs/old", "missed")
    b = v5(herald, request, "cs", clean_start=True, session_expiry=30)
    assert not b.session_present
    b.subscribe("cs/new", 1)
    pub.publish("cs/old", "after")
    pub.publish("cs/new", "marker")
    m = b.message()
    assert (m.topic, m.payload) == ("cs/new", b"marker")
    b.close()
    c = v5(herald, request, "cs", clean_start=False, session_expiry=30)
    assert c.session_present
    pub.publish("cs/new", "kept")
    assert c.message().payload == b"kept"



def test_session_with_expiry_0_ends_on_takeover(herald, request):
    # Spec 3.1.2.11.2: with expiry 0 "the Session ends when the Network
    # Connection is closed"; 3.1.4 step 1 (comment): "If the Session Expiry
    # Interval of the existing Network Connection is 0 ... the original Session
    # is ended on the takeover". So Session Present is 0 [MQTT-3.2.2-2].
    old = v5(herald, request, "to0")
    old.subscribe("to0/t", 1)
    new = v5(herald, request, "to0", clean_start=False, session_expiry=30)
    assert old.disconnected.wait(PATIENCE)
    assert not new.session_present



def test_session_is_taken_over_from_a_connection_that_stopped_reading(herald, request):
    # Spec 3.1.4 step 1: the existing connection is closed [MQTT-3.1.4-3];
    # 3.1.2.4: Clean Start 0 resumes the existing session [MQTT-3.1.2-5], so
    # Session Present is 1 [MQTT-3.2.2-3]. The old client stops reading, as a
    # device whose network went away does, with messages still coming for it
    # (enough to fill its socket buffers).
    stalled = Raw(herald, "stalled", keepalive=0, session_expiry=30, rcvbuf=4096)
    stalled.subscribe("/flood", 0)
    request.addfinalizer(stalled.sock.close)
    pub = v5(herald, request, "flood-pub")
    for _ in range(200):
        pub.c.publish("/flood", b"x" * 60_000, qos=0)
    pub.publish("/flood", "last")  # after the 12 MB above
    again = v5(herald, request, "stalled", clean_start=False, session_expiry=30)
    assert again.session_present
    # ...and the old connection is closed: reading what its buffers hold ends
    # (a timeout here, socket.timeout, fails the test).
    stalled.sock.settimeout(PATIENCE)
    try:
        while stalled.sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass


def test_session_is_resumed_by_a_client_that_reconnects_as_soon_as_it_is_closed(herald, request):
    # Spec 3.1.2.4 [MQTT-3.1.2-5], 3.2.2.1.1 [MQTT-3.2.2-3]: within its
    # expiry the session is resumed, however soon the client comes back. A
    # raw client, to come back as soon as a fast client would. Up to 50 tries:
    # the race was lost about one time in three (58 of 200).
    for i in range(50):
        c = Raw(herald, "quick", keepalive=0, session_expiry=30, clean_start=i == 0)
        assert c.session_present == (i > 0), f"reconnect {i}"
        c.sock.shutdown(socket.SHUT_WR)  # the connection is lost...
        assert c.until_closed()[1] is None  # ...and the server closes its side



def test_publishes_succeed_while_persistent_sessions_are_saved(herald, request):
    # Every publish to a channel is stored and acknowledged with success (the
    # design), whatever else the server writes meanwhile: here persistent
    # sessions, saved on every SUBSCRIBE and every disconnect. Each publish
    # goes to a new channel. Up to 6 s: the bug showed within 0.01-1.3 s.
    stop = threading.Event()
    errors = []

    def churn():
        i = 0
        try:
            while not stop.is_set():
                c = V5(herald, f"churn-{i % 4}", session_expiry=30)
                c.subscribe(f"churn/{i}", 1)
                c.close()
                i += 1
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    pub = v5(herald, request, "busy-pub")
    worker = threading.Thread(target=churn)
    worker.start()
    refused, i = None, 0
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            info = pub.c.publish(f"busy/{i}", "x", qos=1)
            with pub.cond:
                assert pub.cond.wait_for(lambda: info.mid in pub.pubacks, PATIENCE)
                rc = pub.pubacks[info.mid]
            if rc.is_failure:
                refused = rc
                break
            i += 1
    finally:
        stop.set()
        worker.join(PATIENCE)
    assert not errors, errors
    assert refused is None, f"publish to busy/{i} refused ({i} accepted before it): {refused}"


def test_session_expiry_zero_and_the_disconnect_that_changes_it(herald, request):
    # Spec 3.1.2.11.2: absent or 0, the session ends with the connection.
    # 3.14.2.2.2: DISCONNECT may change the expiry, but not from 0 to non-zero
    # (a Protocol Error).
    a = v5(herald, request, "sz-default")
    a.subscribe("sz/a", 1)
    a.close()
    assert not v5(herald, request, "sz-default", clean_start=False, session_expiry=30).session_present

    b = v5(herald, request, "sz-cut", session_expiry=30)
    b.close(session_expiry=0)
    assert not v5(herald, request, "sz-cut", clean_start=False, session_expiry=30).session_present

    c = v5(herald, request, "sz-raise")
    c.close(session_expiry=30)
    assert c.disconnect_rc.value == PROTOCOL_ERROR
    assert not v5(herald, request, "sz-raise", clean_start=False, session_expiry=30).session_present


# --- message expiry --------------------------------------------------------


def test_message_expiry_drops_expired_queued_messages_and_counts_down_the_rest(herald, request):
    # Spec 3.3.2.3.3: an expired message is not delivered [MQTT-3.3.2-5]; one
    # delivered carries the received interval minus the time it waited in the
    # server [MQTT-3.3.2-6]. Channel topics wait in the history, others in the
    # session's queue; retained messages expire too.
    topics = ["me/ch", "/me/raw"]
    sub = v5(herald, request, "me-sub", session_expiry=30)
    for t in topics:
        sub.subscribe(t, 1)
    sub.close()
    pub = v5(herald, request, "me-pub")
    published = time.monotonic()
    for t in topics:
        pub.publish(t, "short", properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
        pub.publish(t, "long", properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
        pub.publish(t, "forever")
    pub.publish("me/ret/short", "short", retain=True, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish("me/ret/long", "long", retain=True, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))

    # Waiting out the 1 s expiry of the "short" messages.
    sleep_until(published + 1.5)
    sub = v5(herald, request, "me-sub", clean_start=False, session_expiry=30)
    assert sub.session_present
    got = {t: [] for t in topics}
    for _ in range(4):
        m = sub.message()
        got[m.topic].append((m.payload, prop(m, "MessageExpiryInterval")))
    for t in topics:
        assert [p for p, _ in got[t]] == [b"long", b"forever"], (t, got[t])
        (_, remaining), (_, none) = got[t]
        assert remaining is not None and 1 <= remaining <= 59, (t, remaining)
        assert none is None

    late = v5(herald, request, "me-late")
    late.subscribe("me/ret/#", 1)
    m = late.message()
    assert (m.topic, m.payload, m.retain) == ("me/ret/long", b"long", True)
    assert 1 <= prop(m, "MessageExpiryInterval") <= 59
    pub.publish("me/ret/short", "marker")
    m = late.message()
    assert (m.topic, m.payload) == ("me/ret/short", b"marker")


# --- properties ------------------------------------------------------------


@pytest.mark.parametrize("path", ["live", "queued"])
@pytest.mark.parametrize("topic", ["props/ch", "/props/raw"])
def test_publish_properties_are_forwarded_unchanged(herald, request, topic, path):
    # Spec 3.3.2.3: the server forwards Payload Format Indicator [MQTT-3.3.2-4],
    # Content Type [MQTT-3.3.2-20], Response Topic [MQTT-3.3.2-15], Correlation
    # Data [MQTT-3.3.2-16] and User Properties in order [MQTT-3.3.2-17/18].
    # "queued": the subscriber is offline and resumes (channel topics come
    # back from the stored history).
    sub = v5(herald, request, "pp-sub", session_expiry=30)
    sub.subscribe(topic, 1)
    if path == "queued":
        sub.close()
    user = [("k", "v1"), ("k", "v2"), ("ünï", "çødé"), ("a", "")]
    sent = props(
        PacketTypes.PUBLISH,
        PayloadFormatIndicator=1,
        ContentType="text/plain; charset=utf-8",
        ResponseTopic="props/reply",
        CorrelationData=b"\x00\xffcorr",
        UserProperty=user,
    )
    pub = v5(herald, request, "pp-pub")
    pub.publish(topic, "héllo", qos=1, properties=sent)
    pub.publish(topic, b"\x00\x01\xfe\xff", qos=1, properties=props(PacketTypes.PUBLISH, CorrelationData=b"2"))
    if path == "queued":
        sub = v5(herald, request, "pp-sub", clean_start=False, session_expiry=30)
    m = sub.message()
    assert (m.topic, m.payload) == (topic, "héllo".encode())
    assert prop(m, "PayloadFormatIndicator") == 1
    assert prop(m, "ContentType") == "text/plain; charset=utf-8"
    assert prop(m, "ResponseTopic") == "props/reply"
    assert prop(m, "CorrelationData") == b"\x00\xffcorr"
    assert prop(m, "UserProperty") == user
    m = sub.message()
    assert m.payload == b"\x00\x01\xfe\xff"
    assert prop(m, "CorrelationData") == b"2"
    for name in ("PayloadFormatIndicator", "ContentType", "ResponseTopic", "UserProperty"):
        assert prop(m, name) is None, name
    if not topic.startswith("/"):
        # The same messages read over HTTP: stored, and readable.
        status, body = herald.http("GET", f"/api/channels/{topic}/messages?since=0")
        assert status == 200
        assert [x["id"] for x in body["messages"]] == [1, 2]
        assert body["messages"][0]["data"] == "héllo"


# --- subscription identifiers ----------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/"])
def test_subscription_identifiers_of_every_matching_subscription(herald, request, prefix):
    # Spec 3.8.2.1.2, 3.3.4: a message carries the identifiers of the
    # subscriptions it matched [MQTT-3.3.4-3/4] (order not significant), none
    # for a subscription without one; subscribing again replaces it.
    sub = v5(herald, request, "sid-sub")
    sub.subscribe(f"{prefix}sid/+", 1, sub_id=7)
    sub.subscribe(f"{prefix}sid/a", 1, sub_id=9)
    sub.subscribe(f"{prefix}sid/x/#", 1)
    pub = v5(herald, request, "sid-pub")

    def ids(topic):
        pub.publish(topic, "x")
        m = sub.message()
        assert m.topic == topic
        return sorted(prop(m, "SubscriptionIdentifier") or [])

    assert ids(f"{prefix}sid/a") == [7, 9]
    assert ids(f"{prefix}sid/b") == [7]
    assert ids(f"{prefix}sid/x/y") == []
    sub.subscribe(f"{prefix}sid/a", 1, sub_id=11)
    assert ids(f"{prefix}sid/a") == [7, 11]


# --- subscribe options -----------------------------------------------------


@pytest.mark.parametrize("topic", ["nl/t", "/nl/t"])
def test_no_local(herald, request, topic):
    # Spec 3.8.3.1: with No Local, a client's own publications are not sent
    # back to it [MQTT-3.8.3-3].
    me = v5(herald, request, "nl-me")
    me.subscribe(topic, 1, no_local=True)
    other = v5(herald, request, "nl-other")
    other.subscribe(topic, 1)
    me.publish(topic, "mine")
    assert other.message().payload == b"mine"
    other.publish(topic, "theirs")
    assert me.message().payload == b"theirs"  # and not "mine", sent before it
    # Without No Local (the subscription replaced), its own come back.
    me.subscribe(topic, 1, no_local=False)
    me.publish(topic, "echo")
    assert me.message().payload == b"echo"


@pytest.mark.parametrize("topic", ["rap/t", "/rap/t"])
def test_retain_as_published(herald, request, topic):
    # Spec 3.3.1.3: on an established subscription the RETAIN flag is 0 unless
    # Retain As Published is set [MQTT-3.3.1-12/13]; a retained message sent
    # because of a new subscription has it set [MQTT-3.3.1-9].
    rap = v5(herald, request, "rap-1")
    rap.subscribe(topic, 1, rap=True)
    plain = v5(herald, request, "rap-0")
    plain.subscribe(topic, 1)
    pub = v5(herald, request, "rap-pub")
    pub.publish(topic, "kept", retain=True)
    pub.publish(topic, "live")
    assert [(m.payload, m.retain) for m in (rap.message(), rap.message())] == [(b"kept", True), (b"live", False)]
    assert [(m.payload, m.retain) for m in (plain.message(), plain.message())] == [(b"kept", False), (b"live", False)]
    late = v5(herald, request, "rap-late")
    late.subscribe(topic, 1)
    m = late.message()
    assert (m.payload, m.retain) == (b"kept", True)


@pytest.mark.parametrize("prefix", ["", "/"])
def test_retain_handling_0_1_2(herald, request, prefix):
    # Spec 3.8.3.1: Retain Handling 0 sends retained messages at every
    # subscribe [MQTT-3.3.1-9], 1 only if the subscription did not exist
    # [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11].
    topic = f"{prefix}rh/t"
    pub = v5(herald, request, "rh-pub")
    pub.publish(topic, "kept", retain=True)
    c = v5(herald, request, "rh")

    def retained_then_marker(expect_retained):
        if expect_retained:
            m = c.message()
            assert (m.topic, m.payload, m.retain) == (topic, b"kept", True)
        pub.publish(topic, "marker")
        m = c.message()
        assert (m.payload, m.retain) == (b"marker", False)

    c.subscribe(topic, 1, rh=0)
    retained_then_marker(True)
    c.subscribe(topic, 1, rh=0)
    retained_then_marker(True)
    c.subscribe(f"{prefix}rh/+", 1, rh=1)  # new
    retained_then_marker(True)
    c.subscribe(f"{prefix}rh/+", 1, rh=1)  # exists
    retained_then_marker(False)
    c.subscribe(f"{prefix}rh/#", 1, rh=2)  # new, but never
    retained_then_marker(False)


# --- topic aliases ---------------------------------------------------------


def test_topic_alias_from_client(herald, request):
    # Spec 3.3.2.3.4: the client sets an alias with a topic and then uses it
    # with an empty topic; 3.2.2.3.8: within the server's Topic Alias Maximum.
    sub = v5(herald, request, "tai-sub")
    sub.subscribe("tai/#", 1)
    pub = v5(herald, request, "tai-pub")
    limit = pub.connack.TopicAliasMaximum
    assert limit >= 2
    pub.publish("tai/one", "set", properties=props(PacketTypes.PUBLISH, TopicAlias=2))
    pub.publish("", "used", properties=props(PacketTypes.PUBLISH, TopicAlias=2))
    pub.publish("tai/two", "remapped", properties=props(PacketTypes.PUBLISH, TopicAlias=2))
    pub.publish("", "used again", properties=props(PacketTypes.PUBLISH, TopicAlias=2))
    got = [(m.topic, m.payload) for m in (sub.message() for _ in range(4))]
    assert got == [("tai/one", b"set"), ("tai/one", b"used"), ("tai/two", b"remapped"), ("tai/two", b"used again")]

    # Over the maximum: DISCONNECT 0x94 (3.3.2.3.4). An alias never set: a
    # Protocol Error.
    over = v5(herald, request, "tai-over")
    over.c.publish("tai/one", "x", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=limit + 1))
    assert over.disconnected.wait(PATIENCE)
    assert over.disconnect_rc.value == TOPIC_ALIAS_INVALID
    unset = v5(herald, request, "tai-unset")
    unset.c.publish("", "x", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
    assert unset.disconnected.wait(PATIENCE)
    assert unset.disconnect_rc.value == PROTOCOL_ERROR


def resolve_aliases(messages, maximum):
    """The topics a client that honours topic aliases reads, checking every
    alias is within `maximum` and known when used."""
    known, topics = {}, []
    for m in messages:
        alias = prop(m, "TopicAlias")
        if alias is not None:
            assert 1 <= alias <= maximum, alias
        if m.topic:
            if alias is not None:
                known[alias] = m.topic
            topics.append(m.topic)
        else:
            assert alias in known, f"empty topic with unknown alias {alias}"
            topics.append(known[alias])
    return topics


def test_topic_alias_to_client(herald, request):
    # Spec 3.1.2.11.5: the server may use aliases up to the client's Topic
    # Alias Maximum [MQTT-3.1.2-26], none if it set none [MQTT-3.1.2-27].
    aliased = v5(herald, request, "tao-sub", topic_alias_max=2)
    aliased.subscribe("tao/#", 1)
    plain = v5(herald, request, "tao-plain")
    plain.subscribe("tao/#", 1)
    pub = v5(herald, request, "tao-pub")
    topics = ["tao/a", "tao/a", "tao/b", "tao/b", "tao/c", "tao/c", "tao/a"]
    for i, t in enumerate(topics):
        pub.publish(t, str(i))
    got = [aliased.message() for _ in topics]
    assert [m.payload for m in got] == [str(i).encode() for i in range(len(topics))]
    assert resolve_aliases(got, 2) == topics
    assert any(m.topic == "" for m in got), "the server used no alias"
    got = [plain.message() for _ in topics]
    assert [m.topic for m in got] == topics
    assert all(prop(m, "TopicAlias") is None for m in got)



def test_a_message_dropped_as_too_large_does_not_leave_an_unknown_alias(herald, request):
    # Spec 3.1.2.11.4 [MQTT-3.1.2-25] (discarded, as if sent) and 3.3.2.3.4: a
    # receiver must know an alias before it is used with an empty topic.
    sub = v5(herald, request, "tam-sub", topic_alias_max=4, max_packet_size=256)
    sub.subscribe("tam/t", 1)
    pub = v5(herald, request, "tam-pub")
    pub.publish("tam/t", "x" * 1000)
    pub.publish("tam/t", "small 1")
    pub.publish("tam/t", "small 2")
    got = [sub.message(timeout=2) for _ in range(2)]
    assert [m.payload for m in got] == [b"small 1", b"small 2"]
    assert resolve_aliases(got, 4) == ["tam/t", "tam/t"]


# --- flow control ------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_message_over_the_client_maximum_packet_size_is_not_sent(herald, request, qos):
    # Spec 3.1.2.11.4: the server does not send a packet over the client's
    # Maximum Packet Size [MQTT-3.1.2-24]; it discards it and behaves as if it
    # had completed sending it [MQTT-3.1.2-25].
    sub = v5(herald, request, "mps-sub", max_packet_size=256, receive_max=1)
    sub.subscribe("mps/t", qos)
    pub = v5(herald, request, "mps-pub")
    pub.publish("mps/t", "x" * 1000, qos=qos)
    pub.publish("mps/t", "small 1", qos=qos)
    pub.publish("mps/t", "small 2", qos=qos)
    assert [sub.message(timeout=2).payload for _ in range(2)] == [b"small 1", b"small 2"]
    assert not sub.disconnected.is_set()


def test_receive_maximum_bounds_unacknowledged_qos1_in_flight(herald, request):
    # Spec 3.1.2.11.3, 4.9: the server sends no more QoS 1/2 PUBLISHes than the
    # client's Receive Maximum without acknowledgement [MQTT-3.3.4-9].
    sub = v5(herald, request, "rm-sub", receive_max=2, manual_ack=True)
    sub.subscribe("rm/t", 1)
    pub = v5(herald, request, "rm-pub")
    for i in range(5):
        pub.publish("rm/t", f"m{i}")  # all stored by the server before we look
    first = [sub.message(), sub.message()]
    assert [m.payload for m in first] == [b"m0", b"m1"]
    sub.no_message()  # a third would be over the window
    sub.ack(first[0])
    third = sub.message()
    assert third.payload == b"m2"
    sub.no_message()  # still two unacknowledged (m1, m2)
    sub.ack(first[1])
    sub.ack(third)
    rest = [sub.message(), sub.message()]
    assert [m.payload for m in rest] == [b"m3", b"m4"]


# --- delivery ----------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/"])
def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(herald, request, prefix):
    # Spec 3.3.4: the message goes out respecting the maximum QoS of all
    # matching subscriptions [MQTT-3.3.4-2]; Herald sends one copy (allowed:
    # "MAY deliver further copies").
    topic = f"{prefix}ov/a/x"
    sub = v5(herald, request, "ov-sub")
    sub.subscribe(f"{prefix}ov/#", 0)
    sub.subscribe(f"{prefix}ov/+/x", 2)
    sub.subscribe(topic, 1)
    pub = v5(herald, request, "ov-pub")
    for qos in (2, 1, 0):
        pub.publish(topic, f"q{qos}", qos=qos)
    pub.publish(topic, "end", qos=1)
    got = sorted((m.payload, m.qos) for m in (sub.message() for _ in range(4)))
    assert got == [(b"end", 1), (b"q0", 0), (b"q1", 1), (b"q2", 2)], got
    # Once each: "end" was the last one sent, so every PUBLISH before it is in.
    assert sub.wire_publishes() == [(2, topic), (1, topic), (0, topic), (1, topic)]


@pytest.mark.parametrize("prefix", ["", "/"])
def test_retained_message_is_replaced_and_cleared_by_an_empty_payload(herald, request, prefix):
    # Spec 3.3.1.3: a retained message replaces the previous one
    # [MQTT-3.3.1-5]; one with an empty payload is forwarded as usual, removes
    # the retained message, and is not stored [MQTT-3.3.1-6/7].
    topic = f"{prefix}ret/t"
    live = v5(herald, request, "ret-live")
    live.subscribe(topic, 1)
    pub = v5(herald, request, "ret-pub")
    pub.publish(topic, "v1", retain=True)
    pub.publish(topic, "v2", retain=True)

    def new_subscriber(name):
        c = v5(herald, request, name)
        c.subscribe(topic, 1)
        return c

    a = new_subscriber("ret-a")
    m = a.message()
    assert (m.payload, m.retain) == (b"v2", True)
    pub.publish(topic, "", retain=True)
    assert [m.payload for m in (live.message() for _ in range(3))] == [b"v1", b"v2", b""]
    m = a.message()  # the clearing message itself, to a subscriber
    assert (m.payload, m.retain) == (b"", False)
    b = new_subscriber("ret-b")
    pub.publish(topic, "marker")
    m = b.message()  # and no retained message before it
    assert (m.payload, m.retain) == (b"marker", False)


def test_unacknowledged_qos1_is_redelivered_with_dup_on_resume(herald, request):
    # Spec 4.4: on resuming a session the server resends unacknowledged
    # PUBLISHes with their original packet identifiers [MQTT-4.4.0-1] and DUP
    # set [MQTT-3.3.1-1]; acknowledged ones are not resent.
    sub = v5(herald, request, "rd-sub", session_expiry=30, manual_ack=True)
    sub.subscribe("rd/t", 1)
    pub = v5(herald, request, "rd-pub")
    pub.publish("rd/t", "acked")
    pub.publish("rd/t", "unacked")
    acked, unacked = sub.message(), sub.message()
    assert (acked.payload, acked.dup, unacked.payload, unacked.dup) == (b"acked", False, b"unacked", False)
    sub.ack(acked)
    sub.subscribe("rd/sync", 1)  # its SUBACK follows the PUBACK's handling
    sub.drop()
    sub = v5(herald, request, "rd-sub", clean_start=False, session_expiry=30)
    assert sub.session_present
    m = sub.message()
    assert (m.payload, m.dup, m.qos, m.mid) == (b"unacked", True, 1, unacked.mid)
    pub.publish("rd/t", "next")
    m = sub.message()
    assert (m.payload, m.dup) == (b"next", False)


def test_unacknowledged_qos2_release_is_resent_on_resume(herald, request):
    # Spec 4.4 [MQTT-4.4.0-1]: a PUBREL not yet completed is resent with its
    # packet identifier; the PUBLISH it releases is not delivered again.
    sub = v5(herald, request, "rd2-sub", session_expiry=30, manual_ack=True)
    sub.subscribe("rd2/t", 2)
    pub = v5(herald, request, "rd2-pub")
    pub.publish("rd2/t", "once", qos=2)
    m = sub.message()  # paho hands it over on PUBREL; manual ack withholds PUBCOMP
    assert (m.payload, m.qos) == (b"once", 2)
    sub.drop()
    sub = v5(herald, request, "rd2-sub", clean_start=False, session_expiry=30)
    assert sub.session_present
    sub.wait_log(f"Received PUBREL (Mid: {m.mid})")
    pub.publish("rd2/t", "next", qos=2)
    assert sub.message().payload == b"next"


# --- keep-alive --------------------------------------------------------------


def vbi(n):
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(b):
    return struct.pack("!H", len(b)) + b


class Raw:
    """A bare MQTT client on a socket: a CONNECT (and maybe a SUBSCRIBE), then
    it only reads, or not even that."""

    def __init__(
        self, herald, client_id, keepalive, level=5, will_topic=None, session_expiry=None, rcvbuf=None, clean_start=True
    ):
        flags = 0x02 if clean_start else 0
        payload = mqtt_string(client_id.encode())
        if will_topic:
            flags |= 0x04 | (1 << 3)  # will, QoS 1
            payload += (b"\x00" if level == 5 else b"") + mqtt_string(will_topic.encode()) + mqtt_string(b"silent")
        body = mqtt_string(b"MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive)
        if level == 5:
            cp = b"" if session_expiry is None else b"\x11" + struct.pack("!I", session_expiry)
            body += vbi(len(cp)) + cp
        body += payload
        self.level = level
        self.sock = socket.socket()
        self.sock.settimeout(PATIENCE)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((herald.mqtt_host, herald.mqtt_port))
        self.sock.sendall(b"\x10" + vbi(len(body)) + body)
        self.sent = time.monotonic()
        kind, body = self.packet()
        assert kind == 0x20 and body[1] == 0, (kind, body)
        self.session_present = bool(body[0] & 1)
        self.connack = Properties(PacketTypes.CONNACK)
        if level == 5:
            self.connack.unpack(body[2:])

    def subscribe(self, topic_filter, qos=0):
        body = struct.pack("!H", 1) + (b"\x00" if self.level == 5 else b"")
        body += mqtt_string(topic_filter.encode()) + bytes([qos])
        self.sock.sendall(b"\x82" + vbi(len(body)) + body)
        kind, body = self.packet()
        assert kind == 0x90 and body[-1] == qos, (kind, body)

    def read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def packet(self):
        head = self.read(1)
        if head is None:
            return None, None
        length, shift = 0, 0
        while True:
            b = self.read(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return head[0] & 0xF0, self.read(length)

    def until_closed(self):
        """Seconds from CONNECT to the server closing, and the reason code of
        the DISCONNECT it sent first (MQTT 5), if any."""
        reason = None
        while True:
            kind, body = self.packet()
            if kind is None:
                break
            assert kind == 0xE0, f"only a DISCONNECT before the close, not {kind:#x}"
            reason = body[0] if body else NORMAL
        elapsed = time.monotonic() - self.sent
        self.sock.close()
        return elapsed, reason


@pytest.mark.parametrize("level", [4, 5])
def test_keep_alive_a_silent_client_is_disconnected_within_one_and_a_half_times_it(herald, request, level):
    # Spec 3.1.2.10: without a packet within 1.5 x Keep Alive the server closes
    # the connection [MQTT-3.1.2-22] as if the network had failed (so the will
    # is published, 3.1.2.5); MQTT 5 may say why first (0x8D, 4.13).
    watcher = v5(herald, request, "ka-watch")
    watcher.subscribe("ka/will", 1)
    raw = Raw(herald, "ka-silent", keepalive=1, level=level, will_topic="ka/will")
    # This waits out the keep-alive itself: the close is the event.
    elapsed, reason = raw.until_closed()
    assert 1.4 <= elapsed <= 1.5 + 1.0, elapsed
    assert reason == (KEEP_ALIVE_TIMEOUT if level == 5 else None)
    m = watcher.message()
    assert (m.topic, m.payload) == ("ka/will", b"silent")


def test_server_keep_alive_is_announced_enforced_and_followed_by_paho(tmp_path, request):
    # Spec 3.2.2.3.14: with a Server Keep Alive the client must use it
    # instead of its own [MQTT-3.2.2-21], including a Keep Alive of 0; the
    # server sends it when it changes the client's value. Herald caps the
    # keep-alive at [mqtt] max_keepalive.
    h = Herald(tmp_path / "data", env={"HERALD_MQTT_MAX_KEEPALIVE": "2"})
    request.addfinalizer(h.stop)
    follower = v5(h, request, "ska-paho", keepalive=60)
    assert follower.connack.ServerKeepAlive == 2
    follower.subscribe("ska/t", 1)
    under = Raw(h, "ska-under", keepalive=1)
    assert not hasattr(under.connack, "ServerKeepAlive")  # within the cap: kept
    silent = [Raw(h, "ska-none", keepalive=0), Raw(h, "ska-long", keepalive=60)]
    for raw in silent:
        assert raw.connack.ServerKeepAlive == 2
    # These wait out the keep-alives themselves: each close is the event.
    assert under.until_closed()[1] == KEEP_ALIVE_TIMEOUT
    for raw in silent:
        elapsed, reason = raw.until_closed()
        assert reason == KEEP_ALIVE_TIMEOUT
        assert 2.9 <= elapsed <= 3.0 + 1.0, elapsed
    # Paho, which pings every 2 s as told, is still connected past 3 s.
    assert not follower.disconnected.wait(QUIET)
    v5(h, request, "ska-pub").publish("ska/t", "still here")
    assert follower.message().payload == b"still here"
