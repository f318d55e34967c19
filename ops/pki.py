"""The site PKI with `cryptography`: a CA, broker server certs, client certs per identity, a CRL.

Identities are certificate subjects; the broker takes the CN as the MQTT username
(use_identity_as_username), so the CN *is* the identity the ACL names:

    device     CN = device id (never contains ':'),  OU = site id, SAN URI urn:ccus:{site}:{dev}
    operator   CN = operator:{name}
    sink       CN = sink:{name}
    console    CN = console:{name}                    (the operator's console: reads only)
    bridge     CN = bridge:{site}                     (a site broker talking to the cloud)

A device id can never spell another kind's CN (device ids have no ':'), so no device can
claim an operator's rights by choosing its name. Private keys are written 0600 from creation
(O_EXCL) and never logged or printed: callers only ever see paths, serials and fingerprints.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.atomic import write_atomic, write_new
from ops.errors import OpsError
from protocol.touch import DEVICE_ID, SITE_ID

KINDS = ("operator", "sink", "console", "bridge")
NAME = DEVICE_ID  # operator/sink names follow the device-id rule too: short and shell-safe
CRL_DAYS = 30     # a CRL past nextUpdate makes the broker refuse everyone: reissue it monthly
CALLOUT_URI = "urn:ccus:callout"  # the auth callout service's certificate (issue_callout)
ROUTE_URI = "urn:ccus:route"  # every NATS node's route certificate (issue_route) carries it
CRL_WARN_DAYS = 7  # `ccus ops cert status` (and the fleet view) warn this long before it lapses


class PkiError(OpsError, ValueError):
    """A PKI request that cannot be honoured; the message says why."""


@dataclass(frozen=True)
class Issued:
    """What an issue call made: paths, never key material."""
    cn: str
    serial: int
    cert: Path
    key: Path
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PEM, mode 0600 from creation; an existing file is never overwritten."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_new(path, pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CA:
    """A CA folder: ca.key (0600), ca.crt, crl.pem, revoked.txt (one serial per line)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    key_path = property(lambda self: self.root / "ca.key")
    cert_path = property(lambda self: self.root / "ca.crt")
    crl_path = property(lambda self: self.root / "crl.pem")
    revoked_path = property(lambda self: self.root / "revoked.txt")

    @classmethod
    def init(cls, root: str | Path, name: str = "ccus-touch CA", days: int = 3650) -> CA:
        ca = cls(root)
        if ca.key_path.exists():
            raise PkiError(f"{ca.key_path} exists: a CA is created once")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_private_key(ca.key_path, key)
        _write_public(ca.cert_path, _pem(cert))
        ca.revoked_path.touch()
        ca.write_crl()
        return ca

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError as exc:
            raise PkiError(f"no CA in {self.root}: run `ccus ops ca init` first") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.key_path}: not an EC key")
        return key, cert

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    # -- issuing ------------------------------------------------------------------------------
    def issue(self, out_dir: str | Path, stem: str, subject: x509.Name, *,
              san: Sequence[x509.GeneralName] = (), server: bool = False, days: int = 825,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              force: bool = False, client_too: bool = False) -> Issued:
        """A leaf cert and its new key as {out_dir}/{stem}.crt/.key (+ ca.crt beside them).

        An existing pair is kept unless `force`: then it moves aside as {stem}.old.crt/.key
        (replacing an older .old pair) and stays valid until revoked. `not_before`/`not_after`
        exist so tests can make an expired certificate. `client_too`: a server certificate
        that also has the clientAuth usage (a NATS node dials its peers' routes with it).
        """
        ca_key, ca_cert = self._load()
        out = Path(out_dir)
        key_path, cert_path = out / f"{stem}.key", out / f"{stem}.crt"
        if key_path.exists():
            if not force:
                raise PkiError(f"{key_path} exists: re-issue with --force (the old pair is kept "
                               f"as {stem}.old.*), or rotate with a new stem")
            for path in (cert_path, key_path):
                if path.exists():
                    os.replace(path, path.with_name(f"{stem}.old{path.suffix}"))
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - dt.timedelta(minutes=5)
        end = not_after or start + dt.timedelta(days=days)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        usages = [usage, ExtendedKeyUsageOID.CLIENT_AUTH] if server and client_too else [usage]
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private_key(key_path, key)
        _write_public(cert_path, _pem(cert))
        _write_public(out / "ca.crt", self.cert_path.read_bytes())
        cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return Issued(str(cn), cert.serial_number, cert_path, key_path, end)

    def issue_device(self, out_dir: str | Path, site: str, device: str, **kw: object) -> Issued:
        check_device(site, device)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site),
                             x509.NameAttribute(NameOID.COMMON_NAME, device)])
        san = [x509.UniformResourceIdentifier(f"urn:ccus:{site}:{device}")]
        return self.issue(out_dir, kw.pop("stem", "device"), subject, san=san, **kw)  # type: ignore[arg-type]

    def issue_identity(self, out_dir: str | Path, kind: str, name: str, **kw: object) -> Issued:
        """operator:{name}, sink:{name}, console:{name} or bridge:{site}."""
        if kind not in KINDS:
            raise PkiError(f"kind must be one of {', '.join(KINDS)}")
        if kind == "bridge" and not SITE_ID.match(name):
            raise PkiError("a bridge is named by its site id (14 digits)")
        if not NAME.match(name):
            raise PkiError(f"{kind} name: letters, digits, '-' and '_', at most 64")
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{kind}:{name}")])
        return self.issue(out_dir, kw.pop("stem", kind), subject, **kw)  # type: ignore[arg-type]

    def issue_server(self, out_dir: str | Path, names: Iterable[str], **kw: object) -> Issued:
        """The broker's certificate: DNS names and IP addresses it is reached by."""
        names = list(names)
        if not names:
            raise PkiError("a server certificate needs at least one DNS name or IP")
        san: list[x509.GeneralName] = []
        for n in names:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                san.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        return self.issue(out_dir, kw.pop("stem", "server"), subject, san=san, server=True,
                          **kw)  # type: ignore[arg-type]

    def issue_route(self, out_dir: str | Path, names: Iterable[str], **kw: object) -> Issued:
        """A NATS cluster node's route certificate: server and client usage, the node's names,
        and the SAN URI ROUTE_URI, which the route listeners map to their one route user (a
        device's URI is urn:ccus:{site}:{dev}, 14 digits in the site: never this one)."""
        names = list(names)
        if not names:
            raise PkiError("a route certificate needs at least one DNS name or IP")
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROUTE_URI)]
        for n in names:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                san.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "route"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"route:{names[0]}")])
        return self.issue(out_dir, kw.pop("stem", "route"), subject, san=san, server=True,
                          client_too=True, **kw)  # type: ignore[arg-type]

    def issue_callout(self, out_dir: str | Path, **kw: object) -> Issued:
        """The NATS nodes' auth callout service (broker/nats_callout.py): a client certificate
        only (pinned with the others), its SAN URI CALLOUT_URI, never a user of its own: it
        logs in as the callout user of the bundle's callout.conf."""
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "callout"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "callout:nats")])
        return self.issue(out_dir, kw.pop("stem", "callout"), subject,
                          san=[x509.UniformResourceIdentifier(CALLOUT_URI)], **kw)  # type: ignore[arg-type]

    # -- revocation ---------------------------------------------------------------------------
    def revoked(self) -> list[int]:
        if not self.revoked_path.exists():
            return []
        return [int(s, 16) for s in self.revoked_path.read_text().split() if s]

    def revoke(self, serial: int) -> None:
        serials = self.revoked()
        if serial not in serials:
            serials.append(serial)
            _write_public(self.revoked_path,
                          "".join(f"{s:x}\n" for s in serials).encode("ascii"))
        self.write_crl()

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """Re-sign the CRL from revoked.txt (also the monthly refresh before nextUpdate)."""
        ca_key, ca_cert = self._load()
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=days)))
        for s in self.revoked():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path


@dataclass(frozen=True)
class CrlStatus:
    """How long a CRL stays valid; `problem` is one line for an operator, or None."""
    path: Path
    next_update: dt.datetime
    days_left: float
    revoked: int
    problem: str | None


def crl_status(path: str | Path, *, now: dt.datetime | None = None,
               warn_days: float = CRL_WARN_DAYS) -> CrlStatus:
    """Check a crl.pem before it lapses (past nextUpdate the broker refuses every client).

    Pure but for reading the file: the fleet view calls it too."""
    path = Path(path)
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"no CRL at {path}: run `ccus ops ca crl --pki PKI`") from exc
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM CRL ({exc})") from exc
    nxt = crl.next_update_utc
    if nxt is None:
        raise PkiError(f"{path}: the CRL has no nextUpdate")
    left = (nxt - (now or _now())).total_seconds() / 86400
    problem = None
    if left <= 0:
        problem = (f"CRL {path} lapsed {-left:.1f} days ago: brokers refuse every client; "
                   "run `ccus ops ca crl` and copy crl.pem out now")
    elif left <= warn_days:
        problem = (f"CRL {path} lapses in {left:.1f} days ({nxt:%Y-%m-%d %H:%M} UTC): "
                   "run `ccus ops ca crl` and copy crl.pem to the brokers")
    return CrlStatus(path, nxt, left, len(list(crl)), problem)


def install_crl(crl: str | Path, bundles: Iterable[str | Path]) -> list[Path]:
    """Copy crl.pem into each bundle folder (atomically: a broker reloading mid-copy must
    never read half a CRL)."""
    done = []
    for b in bundles:
        dst = Path(b) / "crl.pem"
        write_atomic(dst, Path(crl).read_bytes(), mode=0o644)
        done.append(dst)
    return done


def hup_broker(pid: int) -> None:
    """SIGHUP: Mosquitto 2.0 rereads crlfile (and acl_file); connected clients stay."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise PkiError(f"no broker process {pid}: give --pid-file or `systemctl reload "
                       "mosquitto` on the broker host") from exc


def check_device(site: str, device: str) -> None:
    if not SITE_ID.match(site):
        raise PkiError("site: a CCUS site ID is 14 ASCII digits")
    if not DEVICE_ID.match(device):
        raise PkiError("device id: letters, digits, '-' and '_', starting with a letter or digit")


def serial_of(cert_path: str | Path) -> int:
    return x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).serial_number


def fingerprint(cert_path: str | Path) -> str:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()
