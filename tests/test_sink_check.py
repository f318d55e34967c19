"""`ccus sink run --check` against a real TLS Mosquitto (cloud.conf, client certificates from
the project's PKI): a good setup passes every line; each bad one fails its line, exit 1."""

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.launcher import PrivateBroker, free_port
from cloud_sink.store import open_store
from ops import provision
from ops.acl import render_acl, render_dynsec
from ops.inventory import InventoryFile
from ops.pki import CA

CCUS = str(Path(sys.executable).parent / "ccus")
SITE = "12345678901234"


@pytest.fixture(scope="module")
def tls_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PrivateBroker]]:
    root = tmp_path_factory.mktemp("check")
    pki = root / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["127.0.0.1", "localhost"])
    provision.add_site(pki, SITE, ["gate-01"])
    provision.add_identity(pki, "sink", "sink-1")
    CA.init(root / "other")  # a foreign CA
    acl = root / "acl"
    acl.write_text(render_acl(InventoryFile(pki).inventory()))
    dynsec = root / "dynamic-security.json"
    dynsec.write_text(render_dynsec(InventoryFile(pki).inventory()))
    values = {"ca_file": pki / "ca.crt", "cert_file": pki / "server" / "server.crt",
              "key_file": pki / "server" / "server.key", "crl_file": pki / "crl.pem",
              "acl_file": acl, "dynsec_file": dynsec}
    with PrivateBroker(root / "broker", template="cloud.conf", values=values) as b:
        yield root, b


def check(*args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([CCUS, "sink", "run", "--check", "--metrics", f"127.0.0.1:{free_port()}",
                        *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p


def tls_args(root: Path, b: PrivateBroker, *, ca: Path | None = None, cert: Path | None = None,
             key: Path | None = None) -> list[str]:
    d = root / "pki" / "sinks" / "sink-1"
    return ["--broker", f"127.0.0.1:{b.port}", "--ca", str(ca or root / "pki" / "ca.crt"),
            "--cert", str(cert or d / "sink.crt"), "--key", str(key or d / "sink.key")]


def test_a_good_setup_passes_every_check(tls_world: tuple[Path, PrivateBroker],
                                         tmp_path: Path) -> None:
    root, b = tls_world
    store = tmp_path / "s.sqlite"
    open_store(store).close()
    p = check("--store", str(store), *tls_args(root, b))
    assert p.returncode == 0, p.stdout
    assert "[FAIL]" not in p.stdout and "all 6 checks passed" in p.stdout
    assert "schema version" in p.stdout and "TLS (TLSv1." in p.stdout
    assert "valid until" in p.stdout
    # a store not yet created is fine for run (it creates it), and nothing is created
    p = check("--store", str(tmp_path / "new.sqlite"), *tls_args(root, b))
    assert p.returncode == 0 and "does not exist yet" in p.stdout
    assert not (tmp_path / "new.sqlite").exists()


def expired_pair(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-sink")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now - dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "old.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp / "old.key").chmod(0o600)
    return tmp / "old.crt", tmp / "old.key"


def test_each_bad_setup_fails_its_line(tls_world: tuple[Path, PrivateBroker],
                                       tmp_path: Path) -> None:
    root, b = tls_world
    store = tmp_path / "s.sqlite"
    open_store(store).close()

    def failed(p: subprocess.CompletedProcess[str]) -> list[str]:
        assert p.returncode == 1, p.stdout
        return [ln for ln in p.stdout.splitlines() if ln.startswith("[FAIL]")]

    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(b"not a database" * 100)
    [line] = failed(check("--store", str(bad), *tls_args(root, b)))
    assert "store" in line and "not a usable SQLite store" in line

    [line] = failed(check("--store", str(store), *tls_args(root, b, ca=root / "other" / "ca.crt")))
    assert "broker" in line and "does not verify" in line

    crt, key = expired_pair(tmp_path)
    lines = failed(check("--store", str(store), *tls_args(root, b, cert=crt, key=key)))
    assert any("EXPIRED" in ln for ln in lines)
    assert any("broker" in ln for ln in lines)  # the broker refuses a certificate it did not sign

    lines = failed(check("--store", str(store),
                         *tls_args(root, b, key=tmp_path / "missing.key")))
    assert any("missing.key" in ln and "cannot read" in ln for ln in lines)

    [line] = failed(check("--store", str(store), "--broker", f"127.0.0.1:{free_port()}"))
    assert "TCP" in line and "refused" in line.lower()

    [line] = failed(check("--store", str(store), "--broker", f"127.0.0.1:{b.port}",
                          "--metrics", f"127.0.0.1:{b.port}"))
    assert "metrics" in line and "cannot bind" in line


def test_a_key_readable_by_others_fails_the_check_but_not_the_start(tmp_path: Path) -> None:
    """`--check` fails it; `ccus sink run` only wants the key readable and matching
    (check_key_pair(..., loose_mode_fails=False))."""
    from cloud_sink.check import check_key_pair

    CA.init(tmp_path / "pki")
    issued = CA(tmp_path / "pki").issue_identity(tmp_path / "s", "sink", "sink-1")
    key = issued.key
    key.chmod(0o644)
    strict = check_key_pair(str(issued.cert), str(key))
    assert not strict.ok and "readable by others" in strict.detail, strict
    loose = check_key_pair(str(issued.cert), str(key), loose_mode_fails=False)
    assert loose.ok and "readable by others" in loose.detail, loose
