#!/usr/bin/env python3
"""Server memory per idle MQTT-over-WebSocket connection (`/mqtt`).

`herald bench idle` speaks MQTT over TCP only; browsers reach MQTT over
WebSocket, which has its own per-connection state (the WebSocket, the bridge
to the MQTT connection). This opens N paho-mqtt WebSocket clients, each
subscribed to its own topic, against a running server and reports its RSS
growth per connection. Loopback only; bounded by N.

    PYTHONPATH=tests/mqtt/.pydeps python3 bench/mqtt_ws_idle.py --port 8080 --pid SERVER_PID [-n 300]

(`tests/mqtt/.pydeps` is where the test command installs paho-mqtt.)
"""
import argparse, time

import paho.mqtt.client as mqtt


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True, help="the server's HTTP port (127.0.0.1)")
    ap.add_argument("--pid", type=int, required=True, help="the server's PID, for its RSS")
    ap.add_argument("-n", type=int, default=300, help="connections")
    a = ap.parse_args()
    before = rss_kb(a.pid)
    clients = []
    for i in range(a.n):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ws-idle-{i}",
                        transport="websockets", protocol=mqtt.MQTTv311)
        c.ws_set_options(path="/mqtt")
        c.connect("127.0.0.1", a.port, keepalive=60)
        c.subscribe(f"idle/{i}", qos=0)
        c.loop(timeout=0.05)
        c.loop(timeout=0.05)
        clients.append(c)
    for _ in range(3):  # let every CONNACK and SUBACK through
        for c in clients:
            c.loop(timeout=0.01)
    time.sleep(1)
    after = rss_kb(a.pid)
    print(f"mqtt over websocket, {a.n} idle connections: {(after - before) / a.n:.2f} KB per connection")


if __name__ == "__main__":
    main()
