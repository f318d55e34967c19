"""The PKI: what certificates say, how keys are kept, revocation into the CRL."""

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ops import provision
from ops.inventory import InventoryFile
from ops.pki import CA, PkiError, serial_of

SITE = "12345678901234"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    CA.init(tmp_path / "pki")
    return tmp_path / "pki"


def test_ca_and_device_certificate(pki: Path) -> None:
    ca = CA(pki)
    assert mode(ca.key_path) == 0o600
    issued = provision.add_device(pki, SITE, "gate-01")
    assert mode(issued.key) == 0o600 and mode(issued.cert) & 0o077 != 0o077
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gate-01"
    assert cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == SITE
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:ccus:{SITE}:gate-01"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.cert)
    agent_toml = (issued.cert.parent / "agent.toml").read_text()
    assert 'id = "gate-01"' in agent_toml and "PRIVATE" not in agent_toml


def test_keys_are_never_overwritten(pki: Path) -> None:
    with pytest.raises(PkiError):
        CA.init(pki)
    provision.add_device(pki, SITE, "gate-01")
    key = pki / "sites" / SITE / "devices" / "gate-01" / "device.key"
    before = key.read_bytes()
    with pytest.raises(PkiError):
        provision.add_device(pki, SITE, "gate-01")
    assert key.read_bytes() == before


def test_device_ids_are_unique_across_sites(pki: Path) -> None:
    provision.add_device(pki, SITE, "gate-01")
    with pytest.raises(PkiError, match="already belongs"):
        provision.add_device(pki, "99999999999999", "gate-01")


@pytest.mark.parametrize("site, dev", [("1234", "gate-01"), (SITE, "_site"), (SITE, "a:b"),
                                       (SITE, "operator:alice"), (SITE, "")])
def test_bad_names_refused(pki: Path, site: str, dev: str) -> None:
    with pytest.raises(PkiError):
        provision.add_device(pki, site, dev)


def test_identity_cns_cannot_be_device_ids(pki: Path) -> None:
    op = provision.add_identity(pki, "operator", "alice")
    assert op.cn == "operator:alice"
    with pytest.raises(PkiError):
        provision.add_identity(pki, "bridge", "alice")  # bridges come with their site


def test_rotate_then_revoke(pki: Path) -> None:
    first = provision.add_device(pki, SITE, "gate-01")
    issued, old = provision.rotate_device(pki, "gate-01")
    assert old == first.serial and issued.serial != old
    assert serial_of(issued.cert) == issued.serial
    assert (issued.cert.parent / "device.old.crt").exists()
    serials = provision.revoke_device(pki, "gate-01")
    assert set(serials) == {first.serial, issued.serial}
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert crl.is_signature_valid(CA(pki).cert.public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == set(serials)
    assert crl.next_update_utc > dt.datetime.now(dt.UTC)
    assert InventoryFile(pki).device("gate-01") is None


def test_expired_certificate_can_be_made_for_tests(pki: Path, tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    i = CA(pki).issue_device(tmp_path / "x", SITE, "gate-01", not_before=past,
                             not_after=past + dt.timedelta(days=1))
    cert = x509.load_pem_x509_certificate(i.cert.read_bytes())
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
