"""The moderation webhook against a real HTTP receiver that checks every
request's Standard Webhooks signature with an independent implementation
(PyPI `standardwebhooks`), and answers as each test tells it: accept,
reject with a reason, modify the data, answer too late, or answer nonsense;
and a receiver that is not there at all, with both `on_error` settings.
Publishes come over HTTP (anonymous in open mode, and as a user) and MQTT.

Run:  PYTHONPATH=tests/mqtt/.pydeps python3 -m pytest -q tests/mqtt/test_moderation_webhook.py
"""

import base64
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from test_paho import PATIENCE, Herald

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
TIMEOUT = 0.5  # seconds: [moderation.webhook] timeout in these tests


class Receiver:
    """The operator's moderation service: verifies each request's signature,
    records it, and answers with `self.answer` (a dict, sent as JSON with
    200), after `self.delay` seconds."""

    def __init__(self, request):
        self.requests = []  # (headers, body as JSON)
        self.answer = {"action": "accept"}
        self.delay = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(SECRET).verify(body, headers)
                except WebhookVerificationError as e:
                    self.send_response(401)
                    self.end_headers()
                    receiver.requests.append((headers, {"unverified": str(e)}))
                    return
                receiver.requests.append((headers, json.loads(body)))
                time.sleep(receiver.delay)  # the delay under test, when there is one
                out = json.dumps(receiver.answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/moderate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        request.addfinalizer(self.server.shutdown)

    def last(self):
        assert self.requests, "the webhook was called"
        headers, body = self.requests[-1]
        assert "unverified" not in body, body
        return headers, body


def herald(tmp_path, request, url, on_error="reject"):
    h = Herald(
        tmp_path / "data",
        env={
            "HERALD_MODERATION_WEBHOOK_URL": url,
            "HERALD_MODERATION_WEBHOOK_SECRET": SECRET,
            "HERALD_MODERATION_WEBHOOK_TIMEOUT": f"{int(TIMEOUT * 1000)}ms",
            "HERALD_MODERATION_WEBHOOK_ON_ERROR": on_error,
        },
    )
    request.addfinalizer(h.stop)
    return h


def post(h, path, body, content_type="text/plain", token=None):
    """(status, JSON body) of a POST, errors included."""
    headers = {"content-type": content_type}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else body.encode()
    req = urllib.request.Request(h.url + path, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=PATIENCE) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stored(h, channel):
    status, v = h.http("GET", f"/api/channels/{channel}/messages")
    assert status == 200
    return [m["data"] for m in v["messages"]]


def test_signed_requests_are_accepted_rejected_or_modified_as_the_receiver_says(tmp_path, request):
    r = Receiver(request)
    h = herald(tmp_path, request, r.url)

    # Accept: the request names everything, and is signed.
    assert post(h, "/api/channels/chat/room", "hello")[0] == 200
    headers, body = r.last()
    assert body == {"channel": "chat/room", "event": None, "data": "hello", "user": None, "transport": "http"}
    assert headers["webhook-id"].startswith("msg_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300

    # As a user, with an event name and JSON data.
    status, minted = h.http("GET", "/api/dev/token?sub=alice")
    envelope = json.dumps({"channel": "chat/room", "event": "chat", "data": {"msg": "hi"}})
    assert post(h, "/api/publish", envelope, "application/json", minted["token"])[0] == 200
    _, body = r.last()
    assert (body["user"], body["event"], body["data"]) == ("alice", "chat", {"msg": "hi"})
    ids = {h_["webhook-id"] for h_, _ in r.requests}
    assert len(ids) == 2, "each request has its own id"

    # Reject: 422 naming the webhook and its reason; nothing stored.
    r.answer = {"action": "reject", "reason": "no shouting"}
    status, err = post(h, "/api/channels/chat/room", "HELLO")
    assert (status, err["code"], err["rule"], err["reason"]) == (422, "content_rejected", "webhook", "no shouting")

    # Modify: what the receiver returns is stored instead.
    r.answer = {"action": "modify", "data": {"msg": "[edited]"}}
    assert post(h, "/api/channels/chat/room", '{"msg":"something rude"}', "application/json")[0] == 200
    assert stored(h, "chat/room") == ["hello", {"msg": "hi"}, {"msg": "[edited]"}]

    # Over MQTT: the same service decides; a refusal is PUBACK 0x83 with the reason.
    r.answer = {"action": "reject", "reason": "not over MQTT either"}
    acked = threading.Event()
    got = {}

    def on_publish(_c, _u, _mid, rc, props):
        got["rc"], got["reason"] = rc.value, getattr(props, "ReasonString", None)
        acked.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="m", protocol=mqtt.MQTTv5)
    c.on_publish = on_publish
    c.connect(h.mqtt_host, h.mqtt_port)
    c.loop_start()
    request.addfinalizer(c.loop_stop)
    c.publish("chat/room", "via mqtt", qos=1)
    assert acked.wait(PATIENCE), "PUBACK within 10s"
    assert got["rc"] == 0x83 and "not over MQTT either" in got["reason"], got
    _, body = r.last()
    assert (body["transport"], body["data"]) == ("mqtt", "via mqtt")
    assert stored(h, "chat/room") == ["hello", {"msg": "hi"}, {"msg": "[edited]"}], "no rejected message stored"

    status, stats = h.http("GET", "/api/stats")
    w = stats["guards"]["moderation"]["webhook"]
    assert (w["accepted"], w["rejected"], w["modified"], w["errors"]) == (2, 2, 1, 0), w


def test_a_late_or_nonsense_answer_is_an_error_and_fails_closed(tmp_path, request):
    r = Receiver(request)
    h = herald(tmp_path, request, r.url)
    r.delay = TIMEOUT * 3
    status, err = post(h, "/api/channels/chat/room", "too slow")
    assert (status, err["code"]) == (503, "moderation_unavailable"), err
    r.delay = 0
    r.answer = {"action": "maybe"}
    status, err = post(h, "/api/channels/chat/room", "nonsense")
    assert (status, err["code"]) == (503, "moderation_unavailable"), err
    assert stored(h, "chat/room") == []
    status, stats = h.http("GET", "/api/stats")
    w = stats["guards"]["moderation"]["webhook"]
    assert (w["errors"], w["failed_closed"], w["failed_open"]) == (2, 2, 0), w


@pytest.mark.parametrize("on_error", ["reject", "accept"])
def test_a_dead_receiver_fails_closed_or_open_as_configured(tmp_path, request, on_error):
    # A port nobody listens on.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    h = herald(tmp_path, request, f"http://127.0.0.1:{port}/moderate", on_error)
    status, body = post(h, "/api/channels/chat/room", "anyone there?")
    status_, stats = h.http("GET", "/api/stats")
    w = stats["guards"]["moderation"]["webhook"]
    if on_error == "reject":
        assert (status, body["code"]) == (503, "moderation_unavailable"), body
        assert stored(h, "chat/room") == []
        assert (w["failed_closed"], w["failed_open"]) == (1, 0), w
    else:
        assert status == 200, body
        assert stored(h, "chat/room") == ["anyone there?"]
        assert (w["failed_closed"], w["failed_open"]) == (0, 1), w
