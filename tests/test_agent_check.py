"""`ccus agent --check`: a checklist against a private TLS broker (the cloud bundle: client
certificates, CRL, ACL) with a good config, then with one thing broken at a time."""

import datetime as dt
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.launcher import PrivateBroker, free_port
from demo.site_day import card_of, write_idlist_csv
from edge.check import check_agent
from edge.idlist import Entry, Status
from edge.signing import write_keypair
from ops import provision
from ops.acl import render_acl, render_dynsec
from ops.inventory import InventoryFile
from ops.pki import CA

SITE = "12345678901234"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


@dataclass
class Site:
    root: Path
    pki: Path
    broker: PrivateBroker
    keys: Path
    values: dict[str, Path]

    def config(self, name: str, *, cert: Path | None = None, key: Path | None = None,
               port: int | None = None, tls: bool = True, extra: str = "",
               idlist: Path | None = None) -> Path:
        dev = provision.device_dir(self.pki, SITE, "gate-01")
        conf = self.root / f"{name}.toml"
        conf.write_text(f"""
[device]
id = "gate-01"
site = "{SITE}"
data_dir = "{self.root / 'data'}"
[mqtt]
host = "127.0.0.1"
port = {port or self.broker.port}
tls = {"true" if tls else "false"}
ca_file = "{self.pki / 'ca.crt'}"
cert_file = "{cert or dev / 'device.crt'}"
key_file = "{key or dev / 'device.key'}"
[idlist]
path = "{idlist or self.root / 'list.csv'}"
{extra}
""")
        return conf


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("check")
    pki = root / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["127.0.0.1", "localhost"])
    provision.add_site(pki, SITE, ["gate-01"])
    acl = root / "acl"
    acl.write_text(render_acl(InventoryFile(pki).inventory()))
    (root / "keys").mkdir()
    write_keypair(root / "operator.key", root / "keys" / "operator.pub")
    write_idlist_csv(root / "list.csv", [Entry("10000000000001", Status.ACTIVE,
                                               cards=(card_of(1).ident,))])
    dynsec = root / "dynamic-security.json"
    dynsec.write_text(render_dynsec(InventoryFile(pki).inventory()))
    values = {"ca_file": pki / "ca.crt", "cert_file": pki / "server" / "server.crt",
              "key_file": pki / "server" / "server.key", "crl_file": pki / "crl.pem", "acl_file": acl,
              "dynsec_file": dynsec}
    broker = PrivateBroker(root / "broker", template="cloud.conf", values=values).start()
    try:
        yield Site(root, pki, broker, root / "keys", values)
    finally:
        broker.close()


def check(site: Site, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccus.cli", "agent", "--check", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "CCUS_KEYS_DIR": str(site.keys)})


def failed(site: Site, conf: Path) -> dict[str, str]:
    return {c.name: c.detail for c in check_agent(conf, keys_dir=str(site.keys), timeout_s=3)
            if not c.ok}


def test_a_good_config_passes_every_check(site: Site) -> None:
    r = check(site, site.config("good"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    names = [line.split()[1] for line in lines[:-1]]
    assert names == ["config", "operator", "data", "tls", "tls", "tls", "tls", "id", "broker"]
    assert all(line.startswith("ok") for line in lines[:-1]), r.stdout
    assert "TLSv1.3, client certificate accepted" in r.stdout
    assert lines[-1] == "9 ok, 0 failed"


def test_a_missing_key_fails_and_names_the_file(site: Site) -> None:
    missing = site.root / "nope" / "device.key"
    r = check(site, site.config("nokey", key=missing))
    assert r.returncode == 1
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert [f.split()[1:3] for f in fails] == [["tls", "key"], ["broker", "not"]]
    assert f"cannot read {missing}: No such file or directory" in fails[0]
    assert "Traceback" not in r.stdout + r.stderr


def test_an_expired_certificate_fails_with_its_date(site: Site) -> None:
    old = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    issued = CA(site.pki).issue_device(site.root / "expired", SITE, "gate-01", not_before=old,
                                       not_after=old + dt.timedelta(days=30))
    bad = failed(site, site.config("expired", cert=issued.cert, key=issued.key))
    assert list(bad) == ["tls cert", "broker"]
    assert "expired on 2024-01-31" in bad["tls cert"] and "ccus ops device rotate" in bad["tls cert"]


def test_a_wrong_port_fails_as_refused(site: Site) -> None:
    port = free_port()   # a port that was free a moment ago: nothing listens
    bad = failed(site, site.config("port", port=port))
    assert list(bad) == ["broker"] and "refused the connection" in bad["broker"]


def test_tls_against_a_plain_port_fails_the_handshake(site: Site, broker: PrivateBroker) -> None:
    bad = failed(site, site.config("plain", port=broker.port))
    assert list(bad) == ["broker"] and "TLS handshake failed" in bad["broker"]


def test_a_certificate_of_another_ca_fails_the_chain_and_the_broker(site: Site) -> None:
    other = CA.init(site.root / "other-pki")
    issued = other.issue_device(site.root / "foreign", SITE, "gate-01")
    bad = failed(site, site.config("foreign", cert=issued.cert, key=issued.key))
    assert list(bad) == ["tls chain", "broker"], bad


def test_a_revoked_certificate_is_refused_by_the_broker(site: Site) -> None:
    # every file checks out locally; only the broker (CRL read at its start) knows better
    ca = CA(site.pki)
    issued = ca.issue_device(site.root / "revoked", SITE, "gate-01")
    ca.revoke(issued.serial)
    with PrivateBroker(site.root / "broker-crl", template="cloud.conf", values=site.values) as b:
        bad = failed(site, site.config("revoked", cert=issued.cert, key=issued.key, port=b.port))
    assert list(bad) == ["broker"], bad
    assert "refused the client certificate" in bad["broker"] or "closed the connection" in bad["broker"]


def test_a_list_path_that_is_a_folder_fails(site: Site) -> None:
    folder = site.root / "idlist"
    folder.mkdir(exist_ok=True)
    bad = failed(site, site.config("folder", idlist=folder))
    assert list(bad) == ["id list"] and "is a folder" in bad["id list"]


def test_the_board_port_is_opened(site: Site) -> None:
    master, slave = os.openpty()
    try:
        ok = site.config("board", extra=f'[vending]\nserial = "{os.ttyname(slave)}"')
        assert failed(site, ok) == {}
    finally:
        os.close(master)
        os.close(slave)
    bad = failed(site, site.config("noboard", extra='[vending]\nserial = "/dev/ttyNOPE9"'))
    assert list(bad) == ["board"] and "/dev/ttyNOPE9" in bad["board"]


def test_the_metrics_port_and_extra_are_checked_when_metrics_are_on(site: Site) -> None:
    ok = {c.name: c for c in check_agent(site.config("m-on", extra='[metrics]\nlisten = "127.0.0.1:0"'),
                                         keys_dir=str(site.keys), timeout_s=3)}
    assert ok["metrics"].ok and ok["metrics"].detail == "127.0.0.1:0: free"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = failed(site, site.config("m-taken", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"'))
    assert list(bad) == ["metrics"] and "cannot bind" in bad["metrics"]
    off = check_agent(site.config("m-off"), keys_dir=str(site.keys), timeout_s=3)
    assert "metrics" not in [c.name for c in off]  # off: no line at all


def test_an_unreadable_config_exits_2_with_one_line(site: Site, tmp_path: Path) -> None:
    r = check(site, tmp_path / "absent.toml")
    assert r.returncode == 2 and r.stdout.startswith("FAIL  config  cannot read config")
