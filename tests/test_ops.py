"""Operator tooling: ACL generation, the fleet view, config push pre-flight, the CLI walk-through."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from edge.config import ConfigError
from edge.signing import generate_key
from ops import fleet
from ops.acl import Inventory, render_acl
from ops.configpush import build
from ops.inventory import InventoryFile

SITE = "12345678901234"
ROOT = Path(__file__).resolve().parents[1]


def test_acl_binds_each_device_to_its_site() -> None:
    text = render_acl(Inventory(devices=[(SITE, "gate-01"), ("99999999999999", "gate-02")],
                                operators=["alice"], sinks=["s1"], bridges=[SITE]))
    block = text.split("user gate-01\n")[1].split("\n\n")[0].splitlines()
    assert f"topic write ccus/v1/{SITE}/gate-01/touch" in block
    assert f"topic read ccus/v1/{SITE}/_site/config" in block
    assert not any("write" in r and ("config\n" in r + "\n" or "list" in r) for r in block)
    assert all(SITE in r or "/list/" in r for r in block)
    assert "user operator:alice" in text and "user sink:s1" in text
    assert f"user bridge:{SITE}" in text
    site_only = render_acl(Inventory(devices=[(SITE, "gate-01"), ("99999999999999", "gate-02")]),
                           site=SITE)
    assert "gate-01" in site_only and "gate-02" not in site_only


def test_acl_refuses_one_id_at_two_sites() -> None:
    with pytest.raises(ValueError, match="more than one site"):
        render_acl(Inventory(devices=[(SITE, "gate-01"), ("99999999999999", "gate-01")]))


def state(**kw: object) -> bytes:
    m = {"v": 1, "online": True, "ts": 1_000_000, "tq": "synced", "sw": "0.1", "lv": 3, "cv": 5,
         "backlog": 0, "oldest_ms": None, "readers": {"entry": "ok"}, "role": "gate"}
    m.update(kw)
    return cbor2.dumps(m)


def test_fleet_problems_first() -> None:
    now = 1_000_000 + 10_000
    msgs = {
        f"ccus/v1/{SITE}/a-ok/state": state(),
        f"ccus/v1/{SITE}/b-off/state": state(online=False),
        f"ccus/v1/{SITE}/c-bad/state": b"\xff\xfe",
        f"ccus/v1/{SITE}/d-sick/state": state(readers={"entry": "down"}, tq="drifted",
                                              backlog=500, oldest_ms=0),
        "ccus/v1/not-a-site/x/state": state(),
    }
    rows = fleet.fleet(msgs, now)
    assert [r.dev for r in rows] == ["d-sick", "c-bad", "b-off", "a-ok"]
    assert rows[0].problems == ["backlog 500", "outbox stuck (500 waiting, oldest 16m)",
                               "reader entry down", "clock drifted"]
    assert rows[-1].problems == []
    assert "state unreadable" in rows[1].problems and rows[2].problems == ["offline"]
    table = fleet.render(rows, now)
    assert table.splitlines()[0].startswith("SITE") and "offline" in table
    assert json.dumps(fleet.as_json(rows))


def test_push_preflight_catches_mistakes() -> None:
    key = generate_key()
    topic, version, payload = build(key, SITE, None, {"gate": {"anti_passback": True}},
                                    issued_ms=42)
    assert topic == f"ccus/v1/{SITE}/_site/config" and version == 42 and payload
    with pytest.raises(ConfigError):
        build(key, SITE, "gate-01", {"gate": {"anti_pasback": True}})  # typo
    with pytest.raises(ConfigError):
        build(key, SITE, "gate-01", {"device": {"id": "other"}})


def ops(*args: str, cwd: Path) -> dict | list:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "PRIVATE KEY" not in out.stdout + out.stderr
    return json.loads(out.stdout)


def test_cli_provisions_a_site(tmp_path: Path) -> None:
    """The commands of docs/operations.md, in order."""
    ops("ca", "init", "--pki", "pki", cwd=tmp_path)
    ops("server", "--pki", "pki", "--name", "broker.example.jp", cwd=tmp_path)
    ops("identity", "--pki", "pki", "--kind", "operator", "--name", "alice", cwd=tmp_path)
    ops("identity", "--pki", "pki", "--kind", "sink", "--name", "sink-1", cwd=tmp_path)
    made = ops("site", "add", "--pki", "pki", "--site", SITE, "--device", "gate-01",
               "--device", "gate-02", "--broker-name", "site-gw.local", cwd=tmp_path)
    assert [i["cn"] for i in made] == [f"bridge:{SITE}", "site-gw.local", "gate-01", "gate-02"]
    ops("broker-config", "--place", "cloud", "--pki", "pki", "--out", "cloud", cwd=tmp_path)
    ops("broker-config", "--place", "site", "--pki", "pki", "--site", SITE,
        "--cloud", "broker.example.jp:8883", "--out", "site", cwd=tmp_path)
    keys = [p for p in tmp_path.rglob("*.key")]
    assert len(keys) >= 9 and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    site_conf = (tmp_path / "site" / "mosquitto.conf").read_text()
    assert "cleansession false" in site_conf and "address broker.example.jp:8883" in site_conf
    assert "require_certificate true" in (tmp_path / "cloud" / "mosquitto.conf").read_text()
    assert "user gate-02" in (tmp_path / "cloud" / "acl").read_text()
    revoked = ops("device", "revoke", "--pki", "pki", "--id", "gate-02", cwd=tmp_path)
    assert len(revoked["revoked"]) == 1  # type: ignore[call-overload]
    ops("acl", "--pki", "pki", "--out", "acl", cwd=tmp_path)
    assert "gate-02" not in (tmp_path / "acl").read_text()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "ops.cli", "site", "add", "--pki", "nope",
                          "--site", SITE, "--device", "g"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "ca init" in out.stderr


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_site_add_refused_leaves_nothing_behind(tmp_path: Path) -> None:
    """A duplicate device id (at another site, or twice in one command) refuses the whole
    `site add`: no bridge identity, no server certificate, no inventory (ACL) entry."""
    ops("ca", "init", "--pki", "pki", cwd=tmp_path)
    ops("site", "add", "--pki", "pki", "--site", SITE, "--device", "gate-01", cwd=tmp_path)
    pki = tmp_path / "pki"
    before = _tree(pki)
    acl_before = render_acl(InventoryFile(pki).inventory())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = "99999999999999"
    for devices in (["gate-09", "gate-01"], ["gate-08", "gate-08"], ["ok-1", "bad:nope"]):
        args = [a for d in devices for a in ("--device", d)]
        out = subprocess.run([sys.executable, "-m", "ops.cli", "site", "add", "--pki", "pki",
                              "--site", other, *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert _tree(pki) == before, devices                  # not one file more or changed
        assert not (pki / "sites" / other).exists()
        assert render_acl(InventoryFile(pki).inventory()) == acl_before
        assert f"bridge:{other}" not in render_acl(InventoryFile(pki).inventory())


def test_site_add_undoes_a_failure_while_writing(tmp_path: Path, monkeypatch) -> None:
    """A fault after the first files are written (here: the third device's certificate)
    takes back what that call made."""
    from ops import pki as pki_mod
    from ops import provision

    pki = tmp_path / "pki"
    pki_mod.CA.init(pki)
    before = _tree(pki)
    real = pki_mod.CA.issue_device
    calls = []

    def failing(self, out_dir, site, device, **kw):  # type: ignore[no-untyped-def]
        calls.append(device)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, out_dir, site, device, **kw)

    monkeypatch.setattr(pki_mod.CA, "issue_device", failing)
    with pytest.raises(OSError):
        provision.add_site(pki, SITE, ["a-1", "a-2:vending", "a-3:gate:out"])
    assert calls == ["a-1", "a-2", "a-3"]
    assert _tree(pki) == before                       # no certificate, no inventory entry
    assert not (pki / "sites" / SITE).exists()


def test_device_add_points_at_the_site_broker_of_site_add(tmp_path: Path) -> None:
    import tomllib

    ops("ca", "init", "--pki", "pki", cwd=tmp_path)
    ops("site", "add", "--pki", "pki", "--site", SITE, "--device", "gate-01",
        "--broker-name", "site-gw.local", cwd=tmp_path)
    ops("device", "add", "--pki", "pki", "--site", SITE, "--id", "gate-02:gate:out",
        cwd=tmp_path)
    conf = tomllib.loads((tmp_path / "pki" / "sites" / SITE / "devices" / "gate-02"
                          / "agent.toml").read_text())
    assert conf["mqtt"]["host"] == "site-gw.local"
    assert conf["readers"][0]["direction"] == "out"
    other = "99999999999999"
    ops("site", "add", "--pki", "pki", "--site", other, "--device", "g-9", cwd=tmp_path)
    ops("device", "add", "--pki", "pki", "--site", other, "--id", "g-10", cwd=tmp_path)
    for dev in ("g-9", "g-10"):  # one default host name for both commands
        conf = tomllib.loads((tmp_path / "pki" / "sites" / other / "devices" / dev
                              / "agent.toml").read_text())
        assert conf["mqtt"]["host"] == "site-broker.local"


def test_every_ops_mqtt_command_takes_the_same_broker_options() -> None:
    """One argparse helper: the same option strings and defaults on every MQTT command."""
    import argparse

    from ops.cli import register
    from ops.mqttc import DEFAULT_BROKER, TLS_PORT

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    found = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
        opts = {o: a.default for a in p._actions for o in a.option_strings}
        if "--broker" in opts:
            found[path.strip()] = {k: opts[k] for k in ("--broker", "--ca", "--cert", "--key")}

    walk(parser, "")
    assert set(found) == {"ops config push", "ops devices", "ops list publish"}
    assert all(v == {"--broker": DEFAULT_BROKER, "--ca": "", "--cert": "", "--key": ""}
               for v in found.values())
    assert DEFAULT_BROKER.endswith(f":{TLS_PORT}") and TLS_PORT == 8883


def test_sink_env_example_speaks_tls_to_the_cloud_broker() -> None:
    import shlex

    from cloud_sink.cli import register as register_sink

    text = (ROOT / "deploy" / "etc" / "ccus-touch" / "sink.env").read_text()
    line = next(x for x in text.splitlines() if x.startswith("CCUS_SINK_ARGS="))
    args = shlex.split(line.split("=", 1)[1])
    import argparse

    parser = argparse.ArgumentParser()
    register_sink(parser.add_subparsers(dest="cmd"))
    ns = parser.parse_args(["sink", "run", *args])
    assert ns.ca and ns.cert and ns.key
    assert ns.broker.endswith(":8883")


def test_example_agent_toml_follows_a_list_and_no_static_path_in_its_data_dir() -> None:
    """deploy/etc/ccus-touch/agent.toml used to name the updater's folder as a static list
    (`path = "/var/lib/ccus-touch/idlist"`): the agent died at its next start."""
    from edge.config import load

    cfg = load(ROOT / "deploy" / "etc" / "ccus-touch" / "agent.toml")
    assert cfg.idlist.name and not cfg.idlist.path


def _doc_commands(page: Path) -> list[str]:
    """Every `ccus ops ...` line of a page's code blocks, continuation lines joined (lines
    with a placeholder, `...` or `<...>`, are left out)."""
    cmds, inside, pending = [], False, ""
    for raw in page.read_text().splitlines():
        if raw.startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line.split(" #", 1)[0].strip()
        if line.startswith("ccus ops ") and "..." not in line and "<" not in line:
            cmds.append(line)
    return cmds


@pytest.mark.parametrize("page", ["operations.md", "idlist.md"])
def test_documented_ops_commands_parse(page: str) -> None:
    """The ops commands the docs show are accepted by the parser as written (options,
    choices, the device spec syntax), so the doc cannot drift from the CLI unnoticed."""
    import argparse
    import shlex

    from ccus.cli import build_parser
    from ops.provision import parse_device_spec

    cmds = _doc_commands(ROOT / "docs" / page)
    assert len(cmds) >= (10 if page == "operations.md" else 2)
    for cmd in cmds:
        argv = shlex.split(cmd.replace("$SITE", SITE).replace("$DEV", "gate-01"))[1:]
        try:
            args = build_parser("ops").parse_args(argv)
        except SystemExit:
            raise AssertionError(f"docs/{page}: does not parse: {cmd}") from None
        assert isinstance(args, argparse.Namespace)
        for d in getattr(args, "device", None) or []:
            if args.ops_cmd == "site":
                parse_device_spec(d)
