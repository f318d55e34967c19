"""What gets onto a device, attacked at the edge (issue 14, device side; issue 13 #1, #6).

Each test is one attack or one integrator mistake reproduced against the real parts (the
config applier and list updater writing to disk, a private Mosquitto, `ccus agent` as a
process), and what must hold instead:
- freshness: a config or list issued 400 days ago is refused unless the operator forced it;
- bounds: a config version past what a touch can carry (2**63-1) is refused where it enters,
  and one already saved by an older agent is dropped at boot, so the gate is never bricked;
- the list spool holds nothing unsigned: chunks for a version no verified manifest names are
  dropped and counted, and a real publish still completes (its chunks are fetched again);
- an `[idlist] path` naming a folder does not crash-loop the agent across reboots;
- a corrupted cached list is dropped with one WARNING naming the file and what happens next.
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import PrivateBroker
from broker.procs import poll_until, wait_until
from edge import config_apply as ca
from edge.agent import Agent
from edge.config import from_dict
from edge.idlist import ListUpdater, UpdateReason
from edge.idlist.codec import build_rows, load_list
from edge.idlist.delta import diff
from edge.idlist.dist import (
    MANIFEST_PURPOSE,
    Message,
    chunk_topic,
    delta_messages,
    delta_topic,
    manifest_topic,
    snapshot_messages,
)
from edge.signing import generate_key, seal
from ops.configpush import build
from ops.configpush import push as push_config
from ops.list_publish import plan_publish
from protocol import topics
from protocol.reasons import Reason
from protocol.timequality import TimeQuality
from protocol.touch import CardTech, Decision, Role, Touch, encode
from sim.nfc_card import free_udp_port

SITE, DEV = "12345678901234", "gate-01"
KEY = generate_key()
KEYS = [KEY.public_key()]
DAY = 86_400_000
NOW = int(time.time() * 1000)
ROWS = [(10_000_000_000_000 + i, 0, 1, (bytes([i + 1]) * 8,)) for i in range(40)]


def base(tmp: Path, **tables: dict) -> dict:  # type: ignore[type-arg]
    return {"device": {"id": DEV, "site": SITE, "data_dir": str(tmp)},
            "mqtt": {"tls": False}, **tables}


def applier(tmp: Path, now: list[int] | None = None) -> tuple[ca.ConfigApplier, list[dict]]:  # type: ignore[type-arg]
    acks: list[dict] = []  # type: ignore[type-arg]
    clock = now if now is not None else [NOW]
    a = ca.ConfigApplier(from_dict(base(tmp)), KEYS, ca.Applied(),
                         lambda t, p, r: acks.append(cbor2.loads(p)), now_ms=lambda: clock[0])
    return a, acks


def touch_with(cv: int) -> bytes:
    return encode(Touch(DEV, SITE, Role.GATE, 1, NOW, TimeQuality.SYNCED, b"\x01" * 8,
                        CardTech.FELICA, None, Decision.DENY, Reason.NO_LIST, 0, cv,
                        {"dir": "in"}))


# -- freshness: configs ----------------------------------------------------------------------
def test_config_issued_400_days_ago_with_a_higher_version_is_refused_unless_forced(
        tmp_path: Path) -> None:
    a, acks = applier(tmp_path)
    topic = topics.config(SITE, DEV)
    body = {"gate": {"anti_passback": True}}
    _, _, old = build(KEY, SITE, DEV, body, version=500, issued_ms=NOW - 400 * DAY)
    d = a.handle(topic, old)
    assert d is not None and (d.result, d.reason) == ("refused", "too_old")
    assert acks[-1]["result"] == "refused" and acks[-1]["reason"] == "too_old"
    assert "max_config_age_days" in acks[-1]["detail"]
    assert a.state.version == 0 and not (tmp_path / "config" / "device.cbor").exists()

    # the operator means it: --force signs `force`, and a higher version still applies
    _, _, forced = build(KEY, SITE, DEV, body, version=501, issued_ms=NOW - 400 * DAY,
                         force=True)
    d = a.handle(topic, forced)
    assert d is not None and d.result == "applied" and a.state.version == 501
    # ...but force never takes a device back: a lower version is a replay, forced or not
    _, _, back = build(KEY, SITE, DEV, {}, version=400, issued_ms=NOW - 400 * DAY, force=True)
    d = a.handle(topic, back)
    assert d is not None and (d.result, d.reason) == ("refused", "replay")


def test_an_applied_config_redelivered_after_the_window_stays_applied(tmp_path: Path) -> None:
    now = [NOW]
    a, acks = applier(tmp_path, now)
    _, _, fresh = build(KEY, SITE, DEV, {"gate": {"anti_passback": True}}, issued_ms=NOW)
    assert a.handle(topics.config(SITE, DEV), fresh).result == "applied"  # type: ignore[union-attr]
    now[0] += 200 * DAY  # retained: it comes again on every connect, long after
    d = a.handle(topics.config(SITE, DEV), fresh)
    assert d is not None and d.result == "unchanged" and acks[-1]["result"] == "applied"


def test_the_window_is_a_config_key(tmp_path: Path) -> None:
    cfg = from_dict(base(tmp_path, security={"max_config_age_days": 500}))
    assert cfg.security.max_config_age_days == 500.0
    a = ca.ConfigApplier(cfg, KEYS, ca.Applied(), lambda *_: None,
                         max_age_days=cfg.security.max_config_age_days)
    _, _, old = build(KEY, SITE, DEV, {}, version=9, issued_ms=NOW - 400 * DAY)
    assert a.handle(topics.config(SITE, DEV), old).result == "applied"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="max_config_age_days"):
        from_dict(base(tmp_path, security={"max_config_age_days": 0}))


# -- freshness: lists ------------------------------------------------------------------------
def deliver(u: ListUpdater, msgs: list[Message], retained: dict[str, bytes]) -> list:  # type: ignore[type-arg]
    """Live delivery as a broker does it; a re-fetch (Outcome.fetch) gets the retained ones."""
    out = []
    for m in msgs:
        retained[m.topic] = m.payload
        got = u.handle(m.topic, m.payload)
        out += got
        for o in got:
            if o.fetch:
                out += [x for t, p in sorted(retained.items()) if topic_matches_sub(o.fetch, t)
                        for x in u.handle(t, p)]
    return out


def test_device_without_a_list_refuses_a_signed_list_issued_400_days_ago(tmp_path: Path) -> None:
    old = build_rows(ROWS, name="main", version=7, issued_ms=NOW - 400 * DAY)
    u = ListUpdater(tmp_path, "main", KEYS)  # the device's clock: now; the default window
    retained: dict[str, bytes] = {}
    out = deliver(u, snapshot_messages(old, KEY), retained)
    refused = [o for o in out if o.kind == "refused"]
    assert [o.reason for o in refused] == [UpdateReason.TOO_OLD]
    assert "max_issued_age_days" in refused[0].detail
    assert u.current is None and not (tmp_path / "main.idl").exists()

    # `ccus ops list publish --force`: the same old list, forced, is installed
    plan = plan_publish(old, KEY, force=True)
    deliver(u, plan.messages, retained)
    assert u.current is not None and u.current.version == 7

    # a delta issued 400 days ago is refused too, and applies once forced
    v8 = build_rows(ROWS[:-1], name="main", version=8, issued_ms=NOW - 399 * DAY)
    d = diff(load_list(old), load_list(v8))
    out = deliver(u, delta_messages(d, KEY), retained)
    assert [o.reason for o in out if o.kind == "refused"] == [UpdateReason.TOO_OLD]
    forced = delta_messages(dataclasses.replace(d, force=True), KEY)
    deliver(u, forced, retained)
    assert u.current.version == 8


# -- bounds ---------------------------------------------------------------------------------
def test_config_version_past_what_a_touch_carries_is_refused_and_never_bricks(
        tmp_path: Path) -> None:
    a, acks = applier(tmp_path)
    huge = seal(KEY, "config", {"version": 2**64, "target": {"site": SITE, "dev": DEV},
                                "issued_ms": NOW, "body": {}})
    d = a.handle(topics.config(SITE, DEV), huge)
    assert d is not None and (d.result, d.reason) == ("refused", "out_of_range")
    assert acks[-1]["reason"] == "out_of_range"
    touch_with(a.state.version)  # the next touch still encodes
    for doc in ({"issued_ms": -1}, {"issued_ms": 2**70}, {"version": -3}):
        bad = seal(KEY, "config", {"version": 5, "target": {"site": SITE, "dev": DEV},
                                   "issued_ms": NOW, "body": {}, **doc})
        assert a.handle(topics.config(SITE, DEV), bad).reason == "out_of_range"  # type: ignore[union-attr]

    # an envelope an older agent saved is re-checked at boot: dropped, the file config runs
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "device.cbor").write_bytes(huge)
    cfg, state = ca.boot_config(from_dict(base(tmp_path)), KEYS)
    assert cfg.version == 0 and state == ca.Applied()
    touch_with(cfg.version)


@pytest.mark.parametrize("changes", [
    {"issued_ms": 2**64}, {"issued_ms": -5},
    {"size": 5 << 30, "chunk_size": 8 << 20, "chunks": [b"\x00" * 32] * 640},  # 5 GiB sparse
    {"records": 1 << 30},
])
def test_signed_manifests_out_of_bounds_are_refused_before_any_disk_is_used(
        tmp_path: Path, changes: dict) -> None:  # type: ignore[type-arg]
    data = build_rows(ROWS, name="main", version=3, issued_ms=NOW)
    doc = cbor2.loads(cbor2.loads(snapshot_messages(data, KEY)[-1].payload)["body"])
    u = ListUpdater(tmp_path, "main", KEYS)
    out = u.handle(manifest_topic("main"), seal(KEY, MANIFEST_PURPOSE, {**doc, **changes}))
    assert [(o.kind, o.reason) for o in out] == [("refused", UpdateReason.MALFORMED)]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- the spool ------------------------------------------------------------------------------
def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_chunks_no_verified_manifest_names_are_dropped_and_counted(tmp_path: Path) -> None:
    u = ListUpdater(tmp_path, "main", KEYS)
    junk = os.urandom(60 * 1024)
    for i in range(40):  # an operator TLS identity without the signing key
        out = u.handle(chunk_topic("main", 999, i), junk)
        assert [(o.kind, o.reason) for o in out] == [("ignored", UpdateReason.NO_MANIFEST)]
    assert tree_bytes(tmp_path) == 0
    st = u.state()
    assert (st["dropped_chunks"], st["dropped_bytes"]) == (40, 40 * 60 * 1024)

    # a real publish in live order (chunks, then the manifest) still completes: the manifest
    # asks for the dropped chunks again, and only they are written, into a file of its size
    data = build_rows(ROWS, name="main", version=4, issued_ms=NOW)
    out = deliver(u, snapshot_messages(data, KEY, 1024), {})
    assert [o.fetch for o in out if o.fetch] == ["ccus/v1/list/main/snapshot/4/+"]
    assert u.current is not None and u.current.version == 4
    assert tree_bytes(tmp_path) == len(data)


def test_a_flood_of_tiny_delta_parts_under_many_topics_stays_bounded(tmp_path: Path) -> None:
    u = ListUpdater(tmp_path, "main", KEYS)
    kinds = [u.handle(delta_topic("main", 1, 2 + i, 2, 0), b"x")[0] for i in range(10_000)]
    pending = [o for o in kinds if o.kind == "pending"]
    assert len(pending) == 64  # max_pending_deltas: one table entry per delta being assembled
    assert {o.reason for o in kinds if o.kind == "refused"} == {UpdateReason.PENDING_FULL}
    assert len(u._parts) == 64 and tree_bytes(tmp_path) == 0


def retained_state(broker: PrivateBroker, site: str, dev: str) -> dict:  # type: ignore[type-arg]
    return retained(broker, topics.state(site, dev))


def retained(broker: PrivateBroker, topic: str) -> dict:  # type: ignore[type-arg]
    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.connect(broker.host, broker.port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    try:
        assert poll_until(lambda: got, 5.0), "no retained state"
    finally:
        c.loop_stop()
        c.disconnect()
    return cbor2.loads(got[-1])  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_agent_drops_unnamed_chunks_reports_them_and_still_gets_a_live_list(
        broker: PrivateBroker, tmp_path: Path) -> None:
    from ops.mqttc import BrokerOpts, connect, publish_all

    cfg = from_dict({**base(tmp_path / "agent", idlist={"name": "spool"}),
                     "mqtt": {"host": broker.host, "port": broker.port, "tls": False}})
    agent = Agent(cfg, config_keys=KEYS)
    agent.start()
    op = connect(BrokerOpts(broker.host, broker.port), client_id="op-spool")
    try:
        assert poll_until(lambda: agent.link.connected, 10.0)
        junk = [Message(chunk_topic("spool", 999, i), os.urandom(60 * 1024)) for i in range(40)]
        publish_all(op, junk)
        wait_until(lambda: agent.lists.dropped_chunks >= 40, 10.0, "40 chunks dropped")  # type: ignore[union-attr]
        assert tree_bytes(tmp_path / "agent" / "idlist") == 0

        data = build_rows(ROWS, name="spool", version=2, issued_ms=NOW)
        publish_all(op, snapshot_messages(data, KEY, 4096))  # live: chunks before the manifest
        wait_until(lambda: agent.idlist is not None and agent.idlist.version == 2, 10.0,
                   "the live list installed through a re-fetch")
        st = retained_state(broker, SITE, DEV)["idlist"]
        assert st["version"] == 2 and st["dropped_chunks"] >= 40 + 1
        assert st["dropped_bytes"] >= 40 * 60 * 1024
    finally:
        publish_all(op, [Message(m.topic, b"") for m in junk])  # clear the retained junk
        op.disconnect()
        op.loop_stop()
        agent.stop()


@pytest.mark.e2e
def test_old_and_out_of_range_pushes_over_the_broker(broker: PrivateBroker, tmp_path: Path) -> None:
    """The attacks of issue 14 end to end: `ccus ops config push` and `list publish` to a
    running agent over a private Mosquitto; the acks and the state message say what happened."""
    from ops.list_publish import publish_list
    from ops.mqttc import BrokerOpts

    opts = BrokerOpts(broker.host, broker.port)
    cfg = from_dict({**base(tmp_path / "agent", idlist={"name": "fresh"}),
                     "mqtt": {"host": broker.host, "port": broker.port, "tls": False}})
    agent = Agent(cfg, config_keys=KEYS)
    agent.start()

    def push(version: int, issued_ms: int, force: bool = False) -> dict:  # type: ignore[type-arg]
        topic, v, payload = build(KEY, SITE, DEV, {"gate": {"anti_passback": True}},
                                  version=version, issued_ms=issued_ms, force=force)
        res = push_config(opts, topic, v, payload, site=SITE, dev=DEV, wait_s=10)
        return res.acks[DEV]

    try:
        assert poll_until(lambda: agent.link.connected, 10.0)
        ack = push(NOW - 400 * DAY + 5, NOW - 400 * DAY)
        assert (ack["result"], ack["reason"]) == ("refused", "too_old") and agent.cfg.version == 0
        ack = push(NOW - 400 * DAY + 6, NOW - 400 * DAY, force=True)
        assert ack["result"] == "applied" and agent.cfg.version == NOW - 400 * DAY + 6
        huge = seal(KEY, "config", {"version": 2**64, "target": {"site": SITE, "dev": DEV},
                                    "issued_ms": NOW, "body": {}})
        push_config(opts, topics.config(SITE, DEV), 2**64, huge, site=SITE, dev=DEV)
        # refused before its version could be trusted: the ack (retained) names none
        wait_until(lambda: retained(broker, topics.config_ack(SITE, DEV))["reason"]
                   == "out_of_range", 10.0, "the out-of-range config refused")
        assert agent.cfg.version == NOW - 400 * DAY + 6  # the running config, untouched

        csv = tmp_path / "t.csv"
        csv.write_text("tid,status,level,cards\n10000000000001,active,1,0102030405060708\n")
        publish_list(csv, name="fresh", version=4, key=KEY, broker=(broker.host, broker.port),
                     progress=False, out_path=tmp_path / "v4.idl", issued_ms=NOW - 400 * DAY)
        wait_until(lambda: agent.state()["idlist"]["refused"] >= 1, 10.0, "the old list refused")
        assert agent.state()["idlist"]["last_refusal"] == "v4: too_old" and agent.idlist is None
        publish_list(csv, name="fresh", version=5, key=KEY, broker=(broker.host, broker.port),
                     progress=False, out_path=tmp_path / "v5.idl", issued_ms=NOW - 400 * DAY,
                     force=True)
        wait_until(lambda: agent.idlist is not None and agent.idlist.version == 5, 10.0,
                   "the forced list installed")
        # the state message follows the install on the link's thread: wait for it to land
        wait_until(lambda: retained_state(broker, SITE, DEV)["lv"] == 5, 10.0,
                   "the state message names list v5")
        state = retained_state(broker, SITE, DEV)
        assert state["lv"] == 5 and state["idlist"]["last_refusal"] == "v4: too_old"
    finally:
        agent.stop()
        push_config(opts, topics.config(SITE, DEV), 1, b"", site=SITE, dev=DEV)  # clear it


# -- 13 #1: [idlist] path names a folder -----------------------------------------------------
def agent_run(conf: Path, seconds: float = 1.5) -> tuple[int | None, str]:
    """`ccus agent --config` until it says it started (or dies), then SIGTERM: exit code, log."""
    proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break  # it died
        lines.append(line)
        if " reader(s), list " in line:  # started
            time.sleep(seconds)
            break
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=20)
    return (proc.returncode if alive else None), "".join(lines) + rest


def test_idlist_path_naming_the_list_folder_survives_reboots(tmp_path: Path) -> None:
    data = tmp_path / "var"
    conf = tmp_path / "agent.toml"
    conf.write_text(f"""
[device]
id = "{DEV}"
site = "{SITE}"
data_dir = "{data}"
[mqtt]
host = "127.0.0.1"
port = {free_udp_port()}
tls = false
[idlist]
name = "main"
path = "{data / 'idlist'}"
""")
    for boot in (1, 2, 3):  # the updater makes data_dir/idlist a folder at the first start
        code, log = agent_run(conf)
        assert code == 0, f"boot {boot}: {log}"
        assert "Traceback" not in log and "IsADirectoryError" not in log
        if boot > 1:
            warn = [ln for ln in log.splitlines() if "WARNING" in ln and "idlist.path" in ln]
            assert len(warn) == 1, log
            assert "is a folder" in warn[0] and "remove it" in warn[0]
    assert (data / "idlist").is_dir()


# -- 13 #6: a corrupted cached list -----------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_corrupted_cached_list_is_dropped_with_a_warning(tmp_path: Path, static: bool,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "var" / "idlist" / "main.idl"
    cache.parent.mkdir(parents=True)
    good = bytearray(build_rows(ROWS, name="main", version=5, issued_ms=NOW))
    good[300] ^= 0x01  # one flipped bit in the body: the body hash no longer matches
    cache.write_bytes(bytes(good))
    idlist = {"name": "main"}
    if static:
        (tmp_path / "static.idl").write_bytes(build_rows(ROWS[:3], name="main", version=1,
                                                         issued_ms=NOW))
        idlist["path"] = str(tmp_path / "static.idl")
    cfg = from_dict({**base(tmp_path / "var", idlist=idlist),
                     "mqtt": {"host": "127.0.0.1", "port": free_udp_port(), "tls": False}})
    with caplog.at_level(logging.WARNING):
        agent = Agent(cfg, config_keys=KEYS)
    try:
        warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warn) == 1 and str(cache) in warn[0], warn
        then = (f"falling back to the static list {tmp_path / 'static.idl'}" if static
                else "denying every card")
        assert f"{then} until a new list arrives" in warn[0]
        st = agent.state()["idlist"]
        assert st["cache_dropped"] == 1 and str(cache) in st["load_error"]
        assert not cache.exists() and cache.with_name("main.idl.corrupt").exists()
        assert (agent.idlist.version if agent.idlist else None) == (1 if static else None)
    finally:
        agent.outbox.close()


def test_a_signed_list_never_takes_the_disk_below_its_floor(tmp_path: Path) -> None:
    """The outbox (every touch) shares the disk: a list that would leave less than
    min_free_bytes free is refused before a byte is written (the real statvfs of tmp_path)."""
    data = build_rows(ROWS, name="main", version=2, issued_ms=NOW)
    free = shutil.disk_usage(tmp_path).free
    u = ListUpdater(tmp_path, "main", KEYS, min_free_bytes=free)  # room for nothing at all
    out = deliver(u, snapshot_messages(data, KEY), {})
    assert [(o.kind, o.reason) for o in out if o.kind == "refused"] == [
        ("refused", UpdateReason.NO_SPACE)]
    assert u.current is None and tree_bytes(tmp_path) == 0
    u.min_free_bytes = 0
    deliver(u, snapshot_messages(data, KEY), {})
    assert u.current is not None and u.current.version == 2


def test_force_flags_reach_the_signed_documents(tmp_path: Path) -> None:
    """`ccus ops list publish --force` and `ccus ops config push --force`, as commands."""
    def ops(*args: str) -> dict:  # type: ignore[type-arg]
        r = subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    ops("keygen", "--out", "op.key")
    (tmp_path / "t.csv").write_text("tid,status,level,cards\n10000000000001,active,1,0102030405060708\n")
    (tmp_path / "o.toml").write_text("[gate]\nanti_passback = true\n")
    for force in (False, True):
        extra = ["--force"] if force else []
        out = ops("list", "publish", "--csv", "t.csv", "--name", "main", "--version", "3",
                  "--signing-key", "op.key", "--dry-run", "--keep", "m.idl", *extra)
        assert out["force"] is force
        out = ops("config", "push", "--site", SITE, "--device", DEV, "--file", "o.toml",
                  "--signing-key", "op.key", "--dry-run", *extra)
        assert out["force"] is force
