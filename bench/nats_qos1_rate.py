"""QoS 1 publish rate of one paho MQTT 3.1.1 client: a node of the local NATS cluster (with and
without the R3 touch stream capturing the subject) beside a private Mosquitto (dev.conf).

    .venv/bin/python bench/nats_qos1_rate.py [--touches 2000]
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import nats  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from sink_support import SITE, touch  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402
from broker.nats import NatsCluster  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.touch import encode  # noqa: E402


def rate(port: int, name: str, n: int) -> float:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    infos = [c.publish(topics.touch(SITE, name), encode(touch(i, device=name)), qos=1)
             for i in range(1, n + 1)]
    for i in infos:
        i.wait_for_publish(60)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / dt


async def add_stream(urls: list[str]) -> None:
    nc = await nats.connect(servers=urls)
    await nc.jetstream().add_stream(StreamConfig(
        name=topics.TOUCH_STREAM, subjects=[topics.ALL_TOUCH_SUBJECTS], num_replicas=3))
    await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--touches", type=int, default=2000)
    n = ap.parse_args().touches
    with tempfile.TemporaryDirectory() as tmp, NatsCluster(tmp) as cl:
        port = cl.mqtt_ports[0]
        print(f"NATS node, no stream:     {rate(port, 'rate-a', n):6.0f} QoS 1 publishes/s")
        asyncio.run(add_stream(cl.urls))
        print(f"NATS node, R3 stream:     {rate(port, 'rate-b', n):6.0f} QoS 1 publishes/s")
    with PrivateBroker() as b:
        print(f"Mosquitto (dev.conf):     {rate(b.port, 'rate-m', n):6.0f} QoS 1 publishes/s")


if __name__ == "__main__":
    main()
