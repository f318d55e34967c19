"""The operator's commands against the REAL TLS broker the docs build (Mosquitto from the
project's cloud.conf: TLS, client certificates, generated ACL): a site made by
`ccus ops site add`, an agent started from its generated agent.toml (paths rebased to a temp
root), a signed list published over TLS and kept across a restart, the fleet view across a
kill -9 (last will), config acks attributed by topic, and clear one-line failures.

Every key and certificate is made here, at test time, in a temporary folder.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest

from broker.launcher import PrivateBroker, free_port
from broker.procs import poll_until, stop_process
from ops import provision
from ops.acl import render_acl, render_dynsec
from ops.cli import main as ops_main
from ops.inventory import InventoryFile
from ops.mqttc import BrokerOpts, publish, session, snapshot
from ops.pki import CA
from protocol import topics

SITE = "12345678901234"
FLEET_SITE = "55555555555555"
ROOT = Path(__file__).resolve().parents[1]
CSV = "tid,status,level,cards\n10000000000001,active,1,0102030405060708\n" \
      "10000000000002,active,1,1112131415161718\n"

pytestmark = pytest.mark.e2e


@dataclass
class World:
    root: Path
    pki: Path
    broker: PrivateBroker
    signing_key: Path

    @property
    def address(self) -> str:
        return f"localhost:{self.broker.port}"

    def tls_args(self, folder: str = "operators", name: str = "alice",
                 stem: str = "operator") -> list[str]:
        d = self.pki / folder / name
        return ["--broker", self.address, "--ca", str(self.pki / "ca.crt"),
                "--cert", str(d / f"{stem}.crt"), "--key", str(d / f"{stem}.key")]

    def opts(self, cert_dir: Path, stem: str) -> BrokerOpts:
        return BrokerOpts("localhost", self.broker.port, str(self.pki / "ca.crt"),
                          str(cert_dir / f"{stem}.crt"), str(cert_dir / f"{stem}.key"))

    @property
    def operator(self) -> BrokerOpts:
        return self.opts(self.pki / "operators" / "alice", "operator")

    def device(self, dev: str) -> BrokerOpts:
        return self.opts(provision.device_dir(self.pki, SITE, dev), "device")


def run_ops(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ccus.cli", "ops", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("opstls")
    pki = root / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["localhost", "127.0.0.1"])
    provision.add_identity(pki, "operator", "alice")
    provision.add_identity(pki, "sink", "sink-1")
    # the documented command, as an operator types it (roles per device)
    r = run_ops("site", "add", "--pki", str(pki), "--site", SITE,
                "--device", "gate-01:gate", "--device", "gate-02:gate:out",
                "--device", "gate-03", "--device", "vend-01:vending",
                "--device", "train-01:training", "--broker-name", "localhost", cwd=root)
    assert r.returncode == 0, r.stderr
    r = run_ops("site", "add", "--pki", str(pki), "--site", FLEET_SITE, "--device", "fl-ok",
                "--device", "fl-disk", "--device", "fl-stuck", "--device", "fl-board:vending",
                cwd=root)
    assert r.returncode == 0, r.stderr
    # the broker's identity files, as `ccus ops broker-config --place cloud` writes them
    inv = InventoryFile(pki).inventory()
    acl, dynsec = root / "acl", root / "dynamic-security.json"
    acl.write_text(render_acl(inv))
    dynsec.write_text(render_dynsec(inv))
    values = {"ca_file": pki / "ca.crt", "cert_file": pki / "server" / "server.crt",
              "key_file": pki / "server" / "server.key", "crl_file": pki / "crl.pem",
              "acl_file": acl, "dynsec_file": dynsec}
    key = root / "alice-signing.key"
    assert ops_main(["keygen", "--out", str(key)]) == 0
    broker = PrivateBroker(root / "broker", template="cloud.conf", values=values).start()
    try:
        yield World(root, pki, broker, key)
    finally:
        broker.close()


def until(cond: object, timeout: float, what: str) -> None:
    assert poll_until(cond, timeout, poll_s=0.2), f"timed out waiting for {what}"  # type: ignore[arg-type]


def retained(world: World, topic: str) -> dict | None:  # type: ignore[type-arg]
    got = snapshot(world.operator, topic, quiet_s=0.3, timeout=5,
                   client_id=f"t-{uuid.uuid4().hex[:8]}")
    return cbor2.loads(got[topic]) if got.get(topic) else None


def install_device(world: World, dev: str, root: Path) -> Path:
    """The device install of docs/operations.md into `root` instead of /: the generated
    agent.toml unmodified except for the temp root and the test broker's port."""
    src = provision.device_dir(world.pki, SITE, dev)
    etc, var = root / "etc" / "ccus-touch", root / "var" / "lib" / "ccus-touch"
    (etc / "keys").mkdir(parents=True)
    var.mkdir(parents=True)
    for name in ("ca.crt", "device.crt", "device.key"):
        (etc / name).write_bytes((src / name).read_bytes())
    (etc / "device.key").chmod(0o600)
    (etc / "keys" / "alice.pub").write_bytes(Path(f"{world.signing_key}.pub").read_bytes())
    text = (src / "agent.toml").read_text()
    text = text.replace("/etc/ccus-touch", str(etc)).replace("/var/lib/ccus-touch", str(var))
    text = text.replace("port = 8883", f"port = {world.broker.port}")
    conf = etc / "agent.toml"
    conf.write_text(text)
    return conf


def start_agent(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "CCUS_KEYS_DIR": str(conf.parent / "keys")}
    return subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config", str(conf)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def test_generated_config_follows_the_list_and_names_no_static_path(world: World) -> None:
    text = (provision.device_dir(world.pki, SITE, "gate-01") / "agent.toml").read_text()
    import tomllib

    doc = tomllib.loads(text)
    assert doc["idlist"] == {"name": "technicians"}     # the documented default list name
    assert doc["mqtt"]["host"] == "localhost" and doc["mqtt"]["port"] == 8883
    out = tomllib.loads((provision.device_dir(world.pki, SITE, "gate-02")
                         / "agent.toml").read_text())
    assert out["readers"][0]["direction"] == "out" and out["device"]["role"] == "gate"
    vend = tomllib.loads((provision.device_dir(world.pki, SITE, "vend-01")
                          / "agent.toml").read_text())
    assert vend["device"]["role"] == "vending" and vend["vending"]["serial"]
    train = tomllib.loads((provision.device_dir(world.pki, SITE, "train-01")
                           / "agent.toml").read_text())
    assert train["device"]["role"] == "training" and "training" in train
    from edge.config import from_dict

    for doc_ in (doc, out, vend, train):  # every generated config loads as the agent loads it
        from_dict(doc_)


def test_list_over_tls_reaches_an_agent_from_the_generated_config_and_survives(
        world: World, tmp_path: Path) -> None:
    conf = install_device(world, "gate-01", tmp_path / "gate-01")
    log = tmp_path / "agent.log"
    csv = tmp_path / "techs.csv"
    csv.write_text(CSV)
    cache = tmp_path / "fleet.json"
    state_topic = topics.state(SITE, "gate-01")
    proc = start_agent(conf, log)
    try:
        until(lambda: (retained(world, state_topic) or {}).get("online") is True,
                   timeout=20, what="gate-01 online")
        r = run_ops("list", "publish", "--csv", str(csv), "--name", "technicians",
                    "--version", "1", "--signing-key", str(world.signing_key),
                    *world.tls_args(), "--no-progress", "--keep", str(tmp_path / "t.1.idl"),
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["published"] is True
        until(lambda: (retained(world, state_topic) or {}).get("lv") == 1, timeout=20,
                   what="list v1 applied")
        # a reboot: the agent starts again from the same files and keeps the list
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        proc = start_agent(conf, log)
        until(lambda: (s := retained(world, state_topic) or {}).get("online") is True
                   and s.get("lv") == 1, timeout=20, what="gate-01 back with list v1")
        time.sleep(1.0)
        assert proc.poll() is None, log.read_text()  # running, not crash-looping
        assert "IsADirectoryError" not in log.read_text()
        assert (tmp_path / "gate-01" / "var" / "lib" / "ccus-touch" / "idlist").is_dir()

        # the fleet view while it is up: it remembers the device in its cache
        r = run_ops("devices", "--json", "--cache", str(cache), *world.tls_args(),
                    "--site", SITE, cwd=tmp_path)
        assert r.returncode in (0, 1), r.stderr
        row = next(x for x in json.loads(r.stdout) if x["dev"] == "gate-01")
        assert row["online"] and row["role"] == "gate" and row["lv"] == 1
        seen = row["last_seen_ms"]
        # a crash: kill -9, the broker publishes the last will (online false only)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        until(lambda: (retained(world, state_topic) or {}).get("online") is False,
                   timeout=20, what="last will")
        will = retained(world, state_topic)
        assert will is not None and "lv" not in will  # the will itself forgets
        r = run_ops("devices", "--json", "--cache", str(cache), *world.tls_args(),
                    "--site", SITE, cwd=tmp_path)
        assert r.returncode == 1, r.stderr  # offline is a problem
        row = next(x for x in json.loads(r.stdout) if x["dev"] == "gate-01")
        assert row["online"] is False and row["role"] == "gate" and row["lv"] == 1
        assert row["sw"] and row["cv"] is not None and row["last_seen_ms"] == seen
        assert row["problems"] == ["offline"]          # not "never seen", no stale clock
        # and the table says when it was last seen
        r = run_ops("devices", "--cache", str(cache), *world.tls_args(), "--site", SITE,
                    cwd=tmp_path)
        line = next(x for x in r.stdout.splitlines() if " gate-01 " in f" {x} ")
        assert "offline" in line and " gate " in line and " - " not in line.split("offline")[1][:4]
    finally:
        stop_process(proc)


def state(**kw: object) -> bytes:
    m = {"v": 1, "online": True, "ts": int(time.time() * 1000), "tq": "synced", "sw": "0.1",
         "lv": 3, "cv": 5, "backlog": 0, "oldest_ms": None, "oldest_age_s": None,
         "disk": "ok", "readers": {"entry": "ok"}, "role": "gate"}
    m.update(kw)
    return cbor2.dumps(m)


def publish_as(opts: BrokerOpts, topic: str, payload: bytes, retain: bool = True) -> None:
    with session(opts, client_id=f"t-{uuid.uuid4().hex[:8]}", timeout=5) as c:
        publish(c, topic, payload, retain=retain)


def test_fleet_problems_from_real_retained_states(world: World, tmp_path: Path) -> None:
    site = FLEET_SITE

    def dev_opts(dev: str) -> BrokerOpts:
        return world.opts(provision.device_dir(world.pki, site, dev), "device")

    now = int(time.time() * 1000)
    publish_as(dev_opts("fl-ok"), topics.state(site, "fl-ok"), state())
    r = run_ops("devices", "--no-cache", *world.tls_args(), "--site", site, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr   # a synced, healthy device: no problem
    assert "never_synced" not in r.stdout

    publish_as(dev_opts("fl-disk"), topics.state(site, "fl-disk"), state(disk="full"))
    publish_as(dev_opts("fl-stuck"), topics.state(site, "fl-stuck"),
               state(backlog=3, oldest_ms=now - 1_200_000, oldest_age_s=1200))
    publish_as(dev_opts("fl-board"), topics.state(site, "fl-board"),
               state(role="vending", board="down"))
    r = run_ops("devices", "--json", "--no-cache", *world.tls_args(), "--site", site,
                cwd=tmp_path)
    assert r.returncode == 1
    rows = {x["dev"]: x for x in json.loads(r.stdout)}
    assert rows["fl-ok"]["problems"] == []
    assert rows["fl-disk"]["problems"] == ["disk full"]
    assert rows["fl-stuck"]["problems"] == ["outbox stuck (3 waiting, oldest 20m)"]
    assert rows["fl-board"]["problems"] == ["board down"]


def test_config_push_attributes_acks_by_topic(world: World, tmp_path: Path) -> None:
    overlay = tmp_path / "site.toml"
    overlay.write_text("[gate]\nanti_passback = true\n")
    version = 7_000_000 + int(time.time())
    # gate-02 answers, on its OWN ack topic (all the ACL lets it), that gate-03 applied it
    forged = {"v": 1, "site": SITE, "dev": "gate-03", "scope": "site", "version": version,
              "result": "applied"}
    publish_as(world.device("gate-02"), topics.config_ack(SITE, "gate-02"), cbor2.dumps(forged))
    # gate-01 answers honestly for itself
    honest = {**forged, "dev": "gate-01"}
    publish_as(world.device("gate-01"), topics.config_ack(SITE, "gate-01"), cbor2.dumps(honest))
    r = run_ops("config", "push", "--site", SITE, "--file", str(overlay),
                "--signing-key", str(world.signing_key), "--version", str(version),
                "--wait", "2", "--pki", str(world.pki), *world.tls_args(), cwd=tmp_path)
    out = json.loads(r.stdout)
    assert "gate-03" not in out["acks"]                 # never reported applied
    assert out["acks"] == {"gate-01": {"result": "applied", "reason": None, "detail": None}}
    assert out["mismatched"] == {"gate-02": 1}          # refused and counted
    assert "gate-03" in out["missing"] and "gate-02" in out["missing"]
    assert r.returncode == 4, r.stderr                  # gate-03 never acked
    assert "refused 1 config ack" in r.stderr and "Traceback" not in r.stderr


def test_list_publish_dry_run_folder_then_from_folder_and_mosquitto_pub(
        world: World, tmp_path: Path) -> None:
    csv = tmp_path / "techs.csv"
    csv.write_text(CSV)
    out = tmp_path / "msgs"
    r = run_ops("list", "publish", "--csv", str(csv), "--name", "drylist", "--version", "4",
                "--signing-key", str(world.signing_key), "--dry-run", "--out", str(out),
                "--chunk-size", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["published"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(manifest["messages"]) >= 3
    assert (out / "drylist.4.idl").exists()               # the snapshot, for the next --prev
    lines = (out / "messages.tsv").read_text().splitlines()
    assert [ln.split("\t")[2] for ln in lines] == [m["topic"] for m in manifest["messages"]]
    assert retained(world, topics.list_manifest("drylist")) is None  # nothing published yet
    r = run_ops("list", "publish", "--from", str(out), *world.tls_args(), "--no-progress",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = snapshot(world.operator, "ccus/v1/list/drylist/#", quiet_s=0.3, timeout=5)
    want = {m["topic"]: (out / m["file"]).read_bytes() for m in manifest["messages"]}
    assert got == want

    # the documented mosquitto_pub loop publishes the very same bytes (docs/idlist.md)
    if not Path("/usr/bin/mosquitto_pub").exists():
        pytest.skip("mosquitto_pub not installed")
    d = world.pki / "operators" / "alice"

    def mosquitto_pub_loop(folder: Path) -> None:
        loop = f"""
DIR={folder}
while IFS="$(printf '\\t')" read -r file retain topic; do
  mosquitto_pub -V mqttv5 -h localhost -p {world.broker.port} --cafile {world.pki}/ca.crt \\
      --cert {d}/operator.crt --key {d}/operator.key -q 1 -r -t "$topic" -f "$DIR/$file" \\
      || exit 1
done < "$DIR/messages.tsv"
"""
        sh = subprocess.run(["bash", "-c", loop], capture_output=True, text=True, timeout=60)
        assert sh.returncode == 0, sh.stderr

    def dry(version: int, folder: Path, *extra: str) -> list[dict]:  # type: ignore[type-arg]
        r = run_ops("list", "publish", "--csv", str(csv), "--name", "shlist", "--version",
                    str(version), "--signing-key", str(world.signing_key), "--dry-run",
                    "--out", str(folder), "--chunk-size", "64", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return json.loads((folder / "manifest.json").read_text())["messages"]  # type: ignore[no-any-return]

    v1 = dry(1, tmp_path / "sh1")
    mosquitto_pub_loop(tmp_path / "sh1")
    csv.write_text(CSV + "10000000000003,active,2,2122232425262728\n")
    v2 = dry(2, tmp_path / "sh2", "--prev", str(tmp_path / "sh1" / "shlist.1.idl"))
    assert any(m["bytes"] == 0 for m in v2)             # clears of v1's chunks are in it
    mosquitto_pub_loop(tmp_path / "sh2")
    got = snapshot(world.operator, "ccus/v1/list/shlist/#", quiet_s=0.3, timeout=5)
    want = {m["topic"]: (tmp_path / "sh2" / m["file"]).read_bytes() for m in v2 if m["bytes"]}
    assert got == want                                   # v2 exactly; v1's chunks cleared
    assert not any("/snapshot/1/" in t for t in got) and v1


def test_unreachable_or_wrong_broker_is_one_line_and_non_zero(world: World,
                                                              tmp_path: Path) -> None:
    csv = tmp_path / "techs.csv"
    csv.write_text(CSV)
    base = ["list", "publish", "--csv", str(csv), "--name", "x", "--version", "1",
            "--signing-key", str(world.signing_key), "--no-progress"]
    d = world.pki / "operators" / "alice"
    tls = ["--ca", str(world.pki / "ca.crt"), "--cert", str(d / "operator.crt"),
           "--key", str(d / "operator.key")]
    other = CA.init(tmp_path / "other")
    cases = {
        "refused": (["--broker", f"127.0.0.1:{free_port()}", *tls], "connection refused"),
        "plain to TLS": (["--broker", world.address], "TLS"),
        "wrong CA": (["--broker", world.address, "--ca", str(other.cert_path),
                      "--cert", str(d / "operator.crt"), "--key", str(d / "operator.key")],
                     "not trusted"),
        "no such host": (["--broker", "no-such-host.invalid:8883", *tls], "unknown host"),
        "missing key file": (["--broker", world.address, "--ca", str(world.pki / "ca.crt"),
                              "--cert", str(d / "operator.crt"), "--key",
                              str(tmp_path / "nope.key")], "nope.key: no such file"),
    }
    for name, (args, cause) in cases.items():
        t0 = time.monotonic()
        r = run_ops(*base, *args, "--keep", str(tmp_path / f"{uuid.uuid4().hex}.idl"),
                    cwd=tmp_path)
        took = time.monotonic() - t0
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0, name
        assert len(err) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert cause in err[0], (name, err[0])
        assert took < 15, (name, took)


def test_site_push_without_pki_expects_the_devices_online(world: World, tmp_path: Path) -> None:
    """Without --pki, the devices whose retained state says online must answer."""
    site, devs = FLEET_SITE, ["fl-ok", "fl-disk", "fl-stuck", "fl-board"]

    def dev_opts(dev: str) -> BrokerOpts:
        return world.opts(provision.device_dir(world.pki, site, dev), "device")

    for d in devs:
        publish_as(dev_opts(d), topics.state(site, d), state(online=d != "fl-board"))
    version = 8_000_000 + int(time.time())
    for d in ("fl-ok", "fl-disk"):  # fl-stuck is online and never answers
        ack = {"v": 1, "site": site, "dev": d, "scope": "site", "version": version,
               "result": "applied"}
        publish_as(dev_opts(d), topics.config_ack(site, d), cbor2.dumps(ack))
    overlay = tmp_path / "site.toml"
    overlay.write_text("[gate]\nanti_passback = false\n")
    r = run_ops("config", "push", "--site", site, "--file", str(overlay),
                "--signing-key", str(world.signing_key), "--version", str(version),
                "--wait", "2", *world.tls_args(), cwd=tmp_path)
    out = json.loads(r.stdout)
    assert out["expected"] == ["fl-disk", "fl-ok", "fl-stuck"]   # fl-board is offline
    assert sorted(out["acks"]) == ["fl-disk", "fl-ok"] and out["missing"] == ["fl-stuck"]
    assert r.returncode == 4, r.stderr
