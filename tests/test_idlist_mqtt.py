"""Lists through a REAL private Mosquitto: `ccus ops list publish` (CLI) on one side, a
device's ListUpdater behind the paho adapter on the other."""

import csv
import queue
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.launcher import PrivateBroker
from edge.idlist import ListUpdater, Status
from edge.idlist.dist import Message
from edge.signing import load_public_key
from ops.list_cli import main as ops_main
from ops.mqttc import BrokerOpts, PublishError, attach_updater, connect, publish_all

pytestmark = pytest.mark.e2e
WAIT = 30.0  # seconds: upper bound for any delivery in these tests


@pytest.fixture(scope="module")
def broker():
    with PrivateBroker() as b:
        yield b


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tid", "status", "level", "cards"])
        w.writerows(rows)


def technicians(n, revoked=()):
    return [[f"{10**13 + i:014d}", "revoked" if i in revoked else "active", i % 4 + 1,
             f"{i:016x}"] for i in range(n)]


def wait_applied(outcomes: "queue.Queue", version: int) -> list:
    seen, deadline = [], time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            o = outcomes.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(o)
        if o.kind == "applied" and o.version == version:
            return seen
    raise AssertionError(f"version {version} not applied within {WAIT}s; refusals: "
                         f"{[o for o in seen if o.kind == 'refused']}")


def device(broker, directory, pub, name="main", executor=None):
    updater = ListUpdater(directory, name, [pub])
    outcomes: queue.Queue = queue.Queue()
    client = connect(BrokerOpts(broker.host, broker.port), client_id=f"dev-{directory.name}")
    attach_updater(client, updater, outcomes.put, executor=executor)
    return updater, client, outcomes


def stop(client):
    client.disconnect()
    client.loop_stop()


def test_publish_snapshot_and_delta_through_mosquitto(broker, tmp_path):
    key = tmp_path / "operator.key"
    assert ops_main(["keygen", "--out", str(key)]) == 0
    pub = load_public_key(tmp_path / "operator.key.pub")
    n = 20_000  # several chunks, several delta parts
    write_csv(tmp_path / "v1.csv", technicians(n))
    updater, client, outcomes = device(broker, tmp_path / "dev1", pub)
    try:
        assert ops_main(["list", "publish", "--csv", str(tmp_path / "v1.csv"), "--name", "main",
                         "--version", "1", "--signing-key", str(key), "--broker",
                         f"{broker.host}:{broker.port}", "--site-less",
                         "--keep", str(tmp_path / "v1.idl"), "--no-progress"]) == 0
        wait_applied(outcomes, 1)
        assert len(updater.current) == n
        assert updater.current.by_card(bytes.fromhex(f"{77:016x}")).tid == f"{10**13 + 77:014d}"

        old = updater.current
        write_csv(tmp_path / "v2.csv", technicians(n + 5, revoked={3, 4}))
        assert ops_main(["list", "publish", "--csv", str(tmp_path / "v2.csv"), "--name", "main",
                         "--version", "2", "--signing-key", str(key), "--broker",
                         f"{broker.host}:{broker.port}", "--prev", str(tmp_path / "v1.idl"),
                         "--keep", str(tmp_path / "v2.idl"), "--no-progress"]) == 0
        wait_applied(outcomes, 2)
        assert updater.current.by_tid(f"{10**13 + 3:014d}").status is Status.REVOKED
        assert len(updater.current) == n + 5
        assert old.by_tid(f"{10**13 + 3:014d}").status is Status.ACTIVE  # old copy intact
    finally:
        stop(client)

    # a device that was away catches up from the retained snapshot alone (handled off the
    # network thread this time)
    with ThreadPoolExecutor(1) as pool:
        late, client2, outcomes2 = device(broker, tmp_path / "dev2", pub, executor=pool)
        try:
            seen = wait_applied(outcomes2, 2)
            assert late.current.body_hash == updater.current.body_hash
            assert late.state()["version"] == 2 and late.state()["records"] == n + 5
            assert not [o for o in seen if o.kind == "refused"]
        finally:
            stop(client2)


def test_refused_publish_surfaces_the_reason_code(broker):
    client = connect(BrokerOpts(broker.host, broker.port), client_id="ops-too-big")
    try:
        # the dev broker's message_size_limit is 64 KiB: a bigger chunk must not look sent
        t0 = time.monotonic()
        with pytest.raises(PublishError, match="closed the connection"):
            publish_all(client, [Message("ccus/v1/list/big/snapshot/1/0", bytes(100_000))],
                        timeout=5.0)
        assert time.monotonic() - t0 < 5.0  # noticed at once, not by the PUBACK timeout
    finally:
        stop(client)
