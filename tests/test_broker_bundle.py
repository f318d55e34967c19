"""`ccus ops broker-config` bundles run by the real Mosquitto: host settings are options (no
hand edits), the bundle included from Debian's stock mosquitto.conf starts, and a server
certificate is re-issued with --force. Issue 13 (#10)."""

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.launcher import PrivateBroker, find_mosquitto, free_port
from ops import provision
from ops.pki import CA, serial_of

ROOT = Path(__file__).resolve().parents[1]
STOCK = Path(__file__).parent / "data" / "debian-mosquitto.conf"
SITE = "12345678901234"
pytestmark = pytest.mark.e2e


def ops_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    CA.init(pki).issue_server(pki / "server", ["127.0.0.1"])
    provision.add_site(pki, SITE, ["gate-01"], broker_names=["127.0.0.1"])
    return pki


def stock_root(tmp: Path) -> tuple[Path, Path]:
    """Debian's stock conf with its paths moved under `tmp`: (conf, conf.d)."""
    text = STOCK.read_text()
    for path in ("/run/mosquitto", "/var/lib/mosquitto", "/var/log/mosquitto",
                 "/etc/mosquitto/conf.d"):
        (tmp / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        text = text.replace(path, str(tmp / path.lstrip("/")))
    conf = tmp / "etc/mosquitto/mosquitto.conf"
    conf.write_text(text)
    return conf, tmp / "etc/mosquitto/conf.d"


def cloud_bundle(pki: Path, inst: Path, port: int, *extra: str) -> None:
    out = ops_cli("broker-config", "--place", "cloud", "--pki", str(pki), "--out", str(inst),
                  "--install-dir", str(inst), "--listener", f"{port} 127.0.0.1",
                  "--user", getpass.getuser(), *extra)
    assert out.returncode == 0, out.stderr


def test_bundle_included_from_debians_stock_conf(pki: Path, tmp_path: Path) -> None:
    conf, confd = stock_root(tmp_path)
    inst = tmp_path / "etc/mosquitto/ccus"
    port = free_port()
    # without --stock-include the bundle sets persistence_location too: Mosquitto refuses
    cloud_bundle(pki, inst, port)
    (confd / "ccus.conf").symlink_to(inst / "mosquitto.conf")
    run = subprocess.run([find_mosquitto(), "-c", str(conf)], capture_output=True, text=True,
                         timeout=10)
    assert run.returncode != 0 and "Duplicate persistence_location" in run.stderr + run.stdout
    # with it, the stock file's persistence_location and log_dest hold and the broker runs
    cloud_bundle(pki, inst, port, "--stock-include")
    text = (inst / "mosquitto.conf").read_text()
    assert "persistence_location" not in text and "log_dest" not in text
    data = tmp_path / "var/lib/mosquitto"
    with PrivateBroker(data, port=port, conf_file=conf) as b:
        from ops.mqttc import BrokerOpts, connect

        d = provision.device_dir(pki, SITE, "gate-01")
        c = connect(BrokerOpts(b.host, b.port, str(pki / "ca.crt"), str(d / "device.crt"),
                               str(d / "device.key")), "gate-01", timeout=5)
        c.disconnect()
        c.loop_stop()
    log = (tmp_path / "var/log/mosquitto/mosquitto.log").read_text()  # the stock log_dest
    assert "gate-01" in log and "deprecated" not in log.lower()
    assert (data / "mosquitto.db").exists()  # the stock persistence_location


def test_host_settings_are_options(pki: Path, tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "b.log"
    out = ops_cli("broker-config", "--place", "site", "--pki", str(pki), "--site", SITE,
                  "--cloud", "cloud.example:8883", "--out", str(tmp_path / "s"),
                  "--user", "", "--data-dir", str(data), "--log-dest", f"file {log}",
                  "--max-queued-messages", "5000", "--session-expiry", "3d")
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "s" / "mosquitto.conf").read_text()
    assert f"persistence_location {data}/" in text and f"log_dest file {log}" in text
    assert "\nuser " not in text and "/var/lib/mosquitto" not in text and "syslog" not in text
    assert "max_queued_messages 5000" in text and "persistent_client_expiration 3d" in text
    assert "use_username_as_clientid true" in text and "message_size_limit" not in text
    default = ops_cli("broker-config", "--place", "cloud", "--pki", str(pki), "--out",
                      str(tmp_path / "c"))
    assert default.returncode == 0, default.stderr
    text = (tmp_path / "c" / "mosquitto.conf").read_text()  # the documented defaults
    assert "user mosquitto" in text and "persistence_location /var/lib/mosquitto/" in text
    assert "log_dest syslog" in text and "mosquitto_dynamic_security.so" in text
    dynsec = json.loads((tmp_path / "c" / "dynamic-security.json").read_text())
    assert {c["username"] for c in dynsec["clients"]} == {"gate-01", f"bridge:{SITE}"}


def test_server_certificate_reissued_with_force(pki: Path) -> None:
    old = serial_of(pki / "server" / "server.crt")
    again = ops_cli("server", "--pki", str(pki), "--name", "broker.example.jp")
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    forced = ops_cli("server", "--pki", str(pki), "--name", "broker.example.jp", "--force")
    assert forced.returncode == 0, forced.stderr
    assert int(json.loads(forced.stdout)["serial"], 16) == serial_of(pki / "server" / "server.crt")
    assert serial_of(pki / "server" / "server.crt") != old
    assert serial_of(pki / "server" / "server.old.crt") == old  # kept until revoked
    assert oct((pki / "server" / "server.key").stat().st_mode & 0o777) == "0o600"
    site = ops_cli("server", "--pki", str(pki), "--site", SITE, "--name", "gw.local", "--force")
    assert site.returncode == 0 and (pki / "sites" / SITE / "server" / "server.crt").exists()
