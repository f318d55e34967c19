"""`ccus sink run --check`: the checklist a sink's setup must pass before it runs.

Rules of this file:

- Each check is a function returning Check(name, ok, detail) and never raises: an unexpected
  fault is a failed check with its one-line cause. run_checks() runs them in order; a check
  whose input failed before (no TLS files -> no handshake) still runs and says why it fails.
- Checks: the store (opens without creating anything, schema version known to this sink),
  the certificate files (readable, PEM, not expired, the key matches the certificate, expiry
  within WARN_DAYS said), the broker (TCP, and with TLS flags the TLS handshake with the
  client certificate, verified against --ca), the metrics port (free to bind).
- format_checks() prints one line a check: ``[ ok ]`` / ``[FAIL]``, the name, the detail.
"""

import contextlib
import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

WARN_DAYS = 30
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_store(url: str) -> Check:
    from cloud_sink.model import NoStore, SinkError
    from cloud_sink.store import open_store
    from cloud_sink.stores import migrations

    name = "store"
    text = str(url)
    try:
        store = open_store(text, create=False)
    except NoStore:
        path = Path(text.removeprefix("sqlite:///"))
        if "://" not in text.replace("sqlite:///", "") and path.parent.is_dir():
            return Check(name, True, f"{path} does not exist yet: `ccus sink run` creates it")
        return Check(name, False, f"no store at {text}, and it cannot be created here")
    except SinkError as exc:
        return Check(name, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - a checklist line, never a traceback
        return Check(name, False, f"{text}: {type(exc).__name__}: {exc}")
    try:
        version = int(getattr(store, "schema_version", 0))
        pg = text.startswith(("postgresql://", "postgres://"))
        current = len(migrations.POSTGRES if pg else migrations.SQLITE)
        counts = store.counts()
    except Exception as exc:  # noqa: BLE001
        return Check(name, False, f"{text}: opened, but {type(exc).__name__}: {exc}")
    finally:
        store.close()
    if version > current:
        return Check(name, False, f"schema version {version} is newer than this sink knows "
                     f"({current}): upgrade ccus-touch")
    return Check(name, True, f"opens, schema version {version} (current), "
                 f"{counts['touches']} touches, {counts['dead_letters']} dead letters")


def check_cert_file(label: str, path: str, now: dt.datetime | None = None) -> Check:
    from cryptography import x509

    name = f"{label} {path}"
    try:
        data = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificate(data)
    except OSError as exc:
        return Check(name, False, f"cannot read: {exc.strerror or exc}")
    except ValueError as exc:
        return Check(name, False, f"not a PEM certificate: {exc}")
    now = now or dt.datetime.now(dt.UTC)
    end, start = cert.not_valid_after_utc, cert.not_valid_before_utc
    subject = cert.subject.rfc4514_string()
    if now > end:
        return Check(name, False, f"{subject} EXPIRED on {end:%Y-%m-%d}: issue a new one "
                     "(`ccus ops identity`)")
    if now < start:
        return Check(name, False, f"{subject} not valid before {start:%Y-%m-%d} (check the clock)")
    days = (end - now).days
    soon = f"; renew soon ({days} days left)" if days < WARN_DAYS else ""
    return Check(name, True, f"{subject}, valid until {end:%Y-%m-%d}{soon}")


def check_key_pair(cert: str, key: str, *, loose_mode_fails: bool = True) -> Check:
    """The key is readable, PEM and matches `cert`; a key readable by others fails the check
    unless `loose_mode_fails` is False (then it is only said)."""
    name = f"key {key}"
    try:
        ctx = ssl.create_default_context()
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        return Check(name, False, f"cannot read: {exc.strerror} ({exc.filename})")
    except (ssl.SSLError, OSError) as exc:
        return Check(name, False, f"does not match {cert} or is not a PEM key: {exc}")
    mode = Path(key).stat().st_mode & 0o077
    extra = f"; readable by others (mode {oct(Path(key).stat().st_mode & 0o777)}: chmod 600)" \
        if mode else ""
    return Check(name, not (mode and loose_mode_fails), f"matches the certificate{extra}")


def check_broker(host: str, port: int, tls: tuple[str, str, str] | None) -> Check:
    name = f"broker {host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=TIMEOUT_S)
    except OSError as exc:
        return Check(name, False, f"TCP: {exc.strerror or exc} (is the broker running? --broker)")
    with raw:
        if tls is None:
            return Check(name, True, "TCP connects (plain MQTT; give --ca/--cert/--key for TLS)")
        ca, cert, key = tls
        try:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.load_cert_chain(cert, key)
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                # TLS 1.3 reports a refused client certificate only on the first read
                s.settimeout(0.5)
                closed = False
                with contextlib.suppress(TimeoutError):
                    closed = s.recv(1) == b""
                version = s.version()
                if closed:
                    return Check(name, False, "the broker closed the TLS connection at once "
                                 "(is the client certificate accepted, or revoked?)")
        except ssl.SSLCertVerificationError as exc:
            return Check(name, False, f"TLS: the broker's certificate does not verify against "
                         f"{ca}: {exc.verify_message}")
        except (ssl.SSLError, OSError) as exc:
            return Check(name, False, f"TLS handshake failed: {exc} (a plain port? a client "
                         "certificate the broker does not accept?)")
    return Check(name, True, f"TCP and TLS ({version}) with the client certificate")


def check_metrics(listen: tuple[str, int] | None) -> Check:
    if listen is None:
        return Check("metrics", True, "off")
    host, port = listen
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return Check(f"metrics {host}:{port}", False, f"cannot bind: {exc.strerror or exc}")
    return Check(f"metrics {host}:{port}", True, "free")


def run_checks(store: str, host: str, port: int, tls: tuple[str, str, str] | None,
               metrics: tuple[str, int] | None) -> list[Check]:
    out = [check_store(store)]
    if tls is not None:
        ca, cert, key = tls
        out += [check_cert_file("CA", ca), check_cert_file("certificate", cert),
                check_key_pair(cert, key)]
    out += [check_broker(host, port, tls), check_metrics(metrics)]
    return out


def format_checks(checks: list[Check]) -> str:
    lines = [f"[{' ok ' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks]
    bad = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - bad} of {len(checks)} checks passed" if bad
                 else f"all {len(checks)} checks passed")
    return "\n".join(lines)
