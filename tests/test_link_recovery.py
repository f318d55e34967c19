"""The link against real brokers when things go wrong: a new sink epoch replays at once; after
clustered broker outages every device is back within 5 s of the broker's return (production
backoff values); connection faults are logged once at WARNING in words, with the next attempt,
and again when they end; unusable TLS files stop the agent with one line naming the file."""

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import PrivateBroker, free_port
from broker.procs import poll_until
from edge.config import ConfigError, MqttConfig
from edge.delivery import Cause
from edge.link import Link, check_tls_files, classify
from edge.outbox import Outbox
from ops.pki import CA
from protocol import topics
from protocol.ack import encode_ack

SITE = "13100000000001"
ROOT = Path(__file__).resolve().parents[1]


def _link(tmp: Path, cfg: MqttConfig, dev: str = "gate-r1", **kw: Any) -> tuple[Link, Outbox]:
    ob = Outbox(tmp / f"{dev}.sqlite", reserve_bytes=0)
    link = Link(cfg, SITE, dev, ob, lambda: {"v": 1, "dev": dev, "online": True,
                                              "backlog": ob.depth(), "link": {}}, **kw)
    return link, ob


def _watcher(port: int, topic: str, got: list[Any]) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append(cbor2.loads(m.payload)["seq"])
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    return c


# -- a new sink epoch ---------------------------------------------------------------------------
def test_new_sink_epoch_replays_at_once(broker: PrivateBroker, tmp_path: Path) -> None:
    """The sink lost touches the broker had PUBACKed (its $share subscription was gone after a
    broker kill -9); its first ack after re-subscribing names a new epoch: the device replays
    what is not acknowledged at once, not after its 30 s acknowledgement timeout."""
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, tls=False, inflight=20)
    link, ob = _link(tmp_path, cfg, "gate-ep")  # ack_timeout_s: the production 30 s
    got: list[int] = []
    w = _watcher(broker.port, topics.touch(SITE, "gate-ep"), got)
    ack_topic = topics.touch_ack(SITE, "gate-ep")
    link.start()
    try:
        for _ in range(6):
            ob.append(lambda s: cbor2.dumps({"seq": s}), created_ms=0)
        link.notify()
        assert poll_until(lambda: link.published == 6, 10.0)
        w.publish(ack_topic, encode_ack(2, epoch=100), qos=1, retain=True).wait_for_publish(5)
        assert poll_until(lambda: link.acked_upto == 2, 5.0)
        time.sleep(0.3)
        assert got == [1, 2, 3, 4, 5, 6] and link.replays == 0  # the first epoch: noted only
        t0 = time.monotonic()
        w.publish(ack_topic, encode_ack(2, epoch=101), qos=1, retain=True).wait_for_publish(5)
        assert poll_until(lambda: len(got) >= 10, 5.0), got
        took = time.monotonic() - t0
        assert got[6:] == [3, 4, 5, 6] and link.replays == 1
        assert took < 3.0, f"replay took {took:.1f} s"
        # the same epoch again is no news; an old sink's ack without an epoch neither
        w.publish(ack_topic, encode_ack(3, epoch=101), qos=1, retain=True).wait_for_publish(5)
        w.publish(ack_topic, encode_ack(4), qos=1, retain=True).wait_for_publish(5)
        assert poll_until(lambda: link.acked_upto == 4, 5.0)
        time.sleep(0.3)
        assert len(got) == 10 and ob.depth() == 2
    finally:
        link.stop()
        w.publish(ack_topic, b"", qos=1, retain=True).wait_for_publish(2)
        w.loop_stop()
        w.disconnect()
        ob.close()


# -- clustered outages ---------------------------------------------------------------------------
def test_back_within_5_s_after_clustered_broker_outages(tmp_path: Path) -> None:
    """Production backoff (mqtt defaults: 1 s doubling to 60 s, 3 s while refused). The broker is
    killed five times in a row with short lives between, then down for 12 s; after its last
    return every device is connected again within 5 s. Before: the delay was reset only after a
    connection of more than 120 s, so it kept growing (25-47 s seen in the fault runs)."""
    b = PrivateBroker(tmp_path / "broker", persistence=True).start()
    cfg = MqttConfig(host="127.0.0.1", port=b.port, tls=False)
    assert (cfg.reconnect_min_s, cfg.reconnect_max_s, cfg.reconnect_fast_max_s) == (1, 60, 3)
    links = [_link(tmp_path, cfg, f"gate-c{i}") for i in range(3)]
    for link, _ in links:
        link.start()
    try:
        assert poll_until(lambda: all(link.connected for link, _ in links), 10.0)
        for down, up in [(2.0, 0.5), (4.0, 1.5), (1.0, 0.3), (6.0, 2.0), (3.0, 0.2)]:
            b.kill()
            time.sleep(down)
            b.start()
            time.sleep(up)
        b.kill()
        time.sleep(12.0)
        b.start()
        back = time.monotonic()
        times: dict[str, float] = {}
        while len(times) < len(links) and time.monotonic() - back < 30:
            for link, _ in links:
                if link.connected and link.device not in times:
                    times[link.device] = time.monotonic() - back
            time.sleep(0.02)
        print(f"reconnect after the last return: {sorted(round(t, 2) for t in times.values())} s")
        assert len(times) == len(links), f"not back within 30 s: {times}"
        assert max(times.values()) < 5.0, times
    finally:
        for link, ob in links:
            link.stop()
            ob.close()
        b.close()


# -- connection faults in the log ---------------------------------------------------------------
def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edge.link" and r.levelno >= logging.WARNING]


def _run_until(link: Link, done: Any, seconds: float) -> None:
    link.start()
    try:
        assert poll_until(done, seconds)
    finally:
        link.stop()


def test_wrong_port_is_one_warning_with_cause_and_retry_then_recovery(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    port = free_port()
    cfg = MqttConfig(host="127.0.0.1", port=port, tls=False)
    link, ob = _link(tmp_path, cfg, backoff_min_s=0.05, backoff_max_s=0.2)
    link.start()
    try:
        assert poll_until(lambda: link.faults.failures >= 5, 10.0)
        warned = _warnings(caplog)
        assert len(warned) == 1, [r.getMessage() for r in warned]  # not one per attempt
        msg = warned[0].getMessage()
        assert "connection refused" in msg and f"127.0.0.1:{port}" in msg
        assert "next attempt in" in msg and "UTC" in msg
        assert warned[0].levelno == logging.WARNING and not warned[0].exc_info
        with PrivateBroker(tmp_path / "b", port=port):
            assert poll_until(lambda: link.connected, 5.0)
            back = _warnings(caplog)[1:]
            assert len(back) == 1 and "again after" in back[0].getMessage()
            assert "connection refused" in back[0].getMessage()
    finally:
        link.stop()
        ob.close()
    assert not any(r.exc_info for r in caplog.records)  # an expected fault: no traceback


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    ca = CA.init(root / "ca")
    ca.issue_server(root / "server", ["127.0.0.1", "localhost"])
    ca.issue_device(root / "dev", SITE, "gate-t1")
    other = CA.init(root / "other", name="some other CA")
    other.issue_device(root / "foreign", SITE, "gate-t1")
    return root


@pytest.fixture(scope="module")
def tls_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    acl = pki / "acl"
    acl.write_text("pattern readwrite #\n")
    # the cloud config's dynamic-security plugin: no identities, everything allowed (these
    # tests are about connecting, docs/security.md's tests about rights)
    dynsec = pki / "dynamic-security.json"
    dynsec.write_text(json.dumps({"defaultACLAccess": {
        "publishClientSend": True, "publishClientReceive": True, "subscribe": True,
        "unsubscribe": True}, "clients": [], "groups": [], "roles": []}))
    values = {"ca_file": pki / "ca" / "ca.crt", "cert_file": pki / "server" / "server.crt",
              "key_file": pki / "server" / "server.key", "crl_file": pki / "ca" / "crl.pem",
              "acl_file": acl, "dynsec_file": dynsec}
    b = PrivateBroker(tmp_path_factory.mktemp("tlsbroker"), template="cloud.conf",
                      values=values).start()
    try:
        yield b
    finally:
        b.close()


def _tls(port: int, pki: Path, *, ca: str = "ca", dev: str = "dev") -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, tls=True, ca_file=str(pki / ca / "ca.crt"),
                      cert_file=str(pki / dev / "device.crt"),
                      key_file=str(pki / dev / "device.key"))


@pytest.mark.parametrize("case, words", [
    ("tls_to_plain_port", "TLS handshake failed"),
    ("wrong_ca", "TLS verification failed"),
    ("foreign_certificate", "bad certificate"),
    ("plain_to_tls_port", "TLS"),
    ("unknown_host", "unknown host"),
])
def test_connection_fault_is_a_warning_naming_its_cause(
        case: str, words: str, pki: Path, broker: PrivateBroker, tls_broker: PrivateBroker,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cfg = {"tls_to_plain_port": _tls(broker.port, pki),
           "wrong_ca": _tls(tls_broker.port, pki, ca="other"),
           "foreign_certificate": _tls(tls_broker.port, pki, dev="foreign"),
           "plain_to_tls_port": MqttConfig(host="127.0.0.1", port=tls_broker.port, tls=False),
           "unknown_host": MqttConfig(host="no-such-broker.invalid", port=1883, tls=False),
           }[case]
    link, ob = _link(tmp_path, cfg, backoff_min_s=0.05, backoff_max_s=0.2)
    try:
        _run_until(link, lambda: link.faults.failures >= 3, 15.0)
    finally:
        ob.close()
    warned = _warnings(caplog)
    assert len(warned) == 1, [r.getMessage() for r in warned]
    msg = warned[0].getMessage()
    assert words in msg and "next attempt in" in msg, msg
    assert not any(r.exc_info for r in caplog.records)
    assert not link.connected and link.fatal is None


def test_the_right_files_connect(pki: Path, tls_broker: PrivateBroker, tmp_path: Path) -> None:
    """The control for the cases above: the same broker, the device's own files."""
    link, ob = _link(tmp_path, _tls(tls_broker.port, pki))
    try:
        _run_until(link, lambda: link.connected, 10.0)
    finally:
        ob.close()


# -- unusable TLS files -------------------------------------------------------------------------
def test_tls_files_are_checked_with_the_file_named(pki: Path, tmp_path: Path) -> None:
    good = _tls(1, pki)
    check_tls_files(good)
    missing = _tls(1, pki)
    missing.key_file = str(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"mqtt.key_file: .*nope.key does not exist"):
        check_tls_files(missing)
    mismatch = _tls(1, pki)
    mismatch.key_file = str(pki / "foreign" / "device.key")
    with pytest.raises(ConfigError, match=r"mqtt.key_file: .*does not match the certificate"):
        check_tls_files(mismatch)
    garbage = tmp_path / "ca.crt"
    garbage.write_text("not a certificate\n")
    bad_ca = _tls(1, pki)
    bad_ca.ca_file = str(garbage)
    with pytest.raises(ConfigError, match=r"mqtt.ca_file: .* holds no PEM"):
        check_tls_files(bad_ca)


def _agent_toml(tmp: Path, mqtt_cfg: MqttConfig) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[device]
id = "gate-t1"
site = "{SITE}"
data_dir = "{tmp / 'data'}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_cfg.port}
tls = true
ca_file = "{mqtt_cfg.ca_file}"
cert_file = "{mqtt_cfg.cert_file}"
key_file = "{mqtt_cfg.key_file}"
reconnect_min_s = 0.1
reconnect_max_s = 0.5
reconnect_fast_max_s = 0.5
""")
    return path


def _env(tmp: Path) -> dict[str, str]:
    keys = tmp / "keys"
    keys.mkdir(exist_ok=True)
    return {**os.environ, "CCUS_KEYS_DIR": str(keys), "PYTHONPATH": str(ROOT)}


def test_agent_with_a_missing_key_file_exits_with_one_line(pki: Path, tmp_path: Path) -> None:
    cfg = _tls(1883, pki)
    cfg.key_file = str(tmp_path / "device.key")  # not there
    p = subprocess.run([sys.executable, "-m", "ccus.cli", "agent", "--config",
                        str(_agent_toml(tmp_path, cfg))], cwd=ROOT, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert str(tmp_path / "device.key") in lines[0] and "mqtt.key_file" in lines[0]
    assert "Traceback" not in p.stderr


def test_agent_exits_non_zero_when_its_link_dies(pki: Path, tls_broker: PrivateBroker,
                                                 tmp_path: Path) -> None:
    """The key disappears while the agent runs; at the next connect the pump cannot go on:
    the process exits non-zero with the file named (systemd restarts it), it does not keep
    running with a dead link."""
    work = tmp_path / "files"
    work.mkdir()
    for name in ("device.crt", "device.key", "ca.crt"):
        (work / name).write_bytes((pki / "dev" / name).read_bytes())
    cfg = _tls(tls_broker.port, pki)
    cfg.cert_file, cfg.key_file = str(work / "device.crt"), str(work / "device.key")
    log = tls_broker.log_path
    seen = len(log.read_text(errors="replace"))
    p = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config",
                          str(_agent_toml(tmp_path, cfg))], cwd=ROOT, env=_env(tmp_path),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert poll_until(lambda: "as gate-t1" in log.read_text(errors="replace")[seen:], 30)
        time.sleep(0.5)
        assert p.poll() is None
        (work / "device.key").unlink()
        tls_broker.stop()
        tls_broker.start()  # the agent reconnects: a new client needs the key file
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        err = p.stderr.read() if p.stderr else ""
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ccus agent: mqtt.key_file") and str(work / "device.key") in last
    assert "Traceback" not in err


# -- the timing keys ------------------------------------------------------------------------------
def test_deployed_agent_toml_spells_out_the_timing_defaults() -> None:
    from edge.config import load

    cfg = load(ROOT / "deploy" / "etc" / "ccus-touch" / "agent.toml").mqtt
    default = MqttConfig()
    for key in ("ack_timeout_s", "ack_timeout_max_s", "reconnect_min_s", "reconnect_max_s",
                "reconnect_fast_max_s"):
        assert getattr(cfg, key) == getattr(default, key), key
    text = (ROOT / "docs" / "delivery.md").read_text()
    assert all(f"`{key}`" in text for key in ("ack_timeout_s", "reconnect_fast_max_s"))


@pytest.mark.parametrize("mqtt, key", [
    ({"ack_timeout_s": 700.0}, "mqtt.ack_timeout_s"),          # beyond ack_timeout_max_s
    ({"reconnect_min_s": 0.0}, "mqtt.reconnect_min_s"),
    ({"reconnect_fast_max_s": 100.0}, "mqtt.reconnect_fast_max_s"),
])
def test_timing_keys_are_checked(mqtt: dict[str, float], key: str) -> None:
    from edge.config import from_dict

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({"device": {"id": "gate-1", "site": SITE}, "mqtt": mqtt})


def test_classify_real_socket_errors() -> None:
    """What the link says for errors the tests above cannot provoke cheaply (a black hole
    takes the 5 s connect timeout per attempt)."""
    import errno
    import socket

    assert classify(TimeoutError("timed out"))[0] is Cause.TIMEOUT
    assert classify(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))[0] is \
        Cause.UNKNOWN_HOST
    assert classify(OSError(errno.ENETUNREACH, "Network is unreachable"))[0] is Cause.UNREACHABLE
    assert classify(OSError(errno.EHOSTUNREACH, "No route to host"))[0] is Cause.UNREACHABLE
    assert classify(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))[0] is Cause.REFUSED
    assert classify(ConnectionResetError(errno.ECONNRESET, "reset"), tls=True)[0] is Cause.TLS
    assert classify(None, "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] "
                          "sslv3 alert certificate revoked")[0] is Cause.BAD_CERT
