"""`ccus agent --check --config FILE`: is this device ready to run? One line per check.

Checks, in order: the config, the trusted operator keys, the data folder, the TLS files (CA,
client certificate and its expiry, key, and that they belong together), the ID list the
agent will decide against, the controller board's port (when one is configured), the
metrics endpoint (when [metrics] listen is set: the extra installed, the port free), and the
broker (TCP, the TLS handshake with the client certificate, and the moment after it when a
TLS 1.3 broker refuses a certificate; on plain TCP an MQTT CONNECT).

Rules: every check returns a `Check` and never raises; a failing line says what to do. The
checks are plain functions over the config (`check_agent`), printing is separate (`render`),
so tests read the list. Exit status: 0 when every check is ok, 1 otherwise, 2 for a config
that cannot be read at all.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge import config_apply
from edge.config import AgentConfig, ConfigError, load

EXPIRY_WARN_DAYS = 30   # a certificate expiring sooner is still ok, with a note to rotate it
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str     # what was found; for a failure, what is wrong and what to do


def render(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in checks)


def run_checks(config_path: str, keys_dir: str | None = None) -> int:
    """Print the checklist for the agent config at `config_path`; the process exit status."""
    checks = check_agent(config_path, keys_dir=keys_dir)
    print(render(checks), flush=True)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} ok, {len(failed)} failed", flush=True)
    if failed and failed[0].name == "config":
        return 2
    return 1 if failed else 0


def check_agent(config_path: str | Path, *, keys_dir: str | None = None,
                now: dt.datetime | None = None, timeout_s: float = TIMEOUT_S) -> list[Check]:
    try:
        base = load(config_path)
    except ConfigError as exc:
        return [Check("config", False, f"{exc}: fix the file and check again")]
    now = now or dt.datetime.now(dt.UTC)
    keys_dir = keys_dir or os.environ.get("CCUS_KEYS_DIR", config_apply.KEYS_DIR)
    keys = config_apply.load_keys(keys_dir) if Path(keys_dir).is_dir() else []
    # what the agent will run: the file with the signed overlays it saved on top
    cfg, applied = config_apply.boot_config(base, keys)
    pushed = f"; signed config v{applied.version} applied on top" if applied.version else ""
    out = [Check("config", True, f"{config_path}: {cfg.device.role} {cfg.device.id} at site "
                                 f"{cfg.device.site}{pushed}")]
    out.append(_keys(keys_dir))
    out.append(_data_dir(cfg))
    tls_ok = True
    if cfg.mqtt.tls:
        tls = list(_tls_files(cfg, now))
        tls_ok = all(c.ok for c in tls)
        out += tls
    out.append(_idlist(cfg, now))
    if cfg.vending.serial or cfg.device.role == "vending":
        out.append(_board(cfg))
    if cfg.metrics.listen:
        out.append(_metrics(cfg))
    out.append(_broker(cfg, timeout_s) if tls_ok else
               Check("broker", False, "not tried: fix the TLS files above first"))
    return out


# -- the checks -------------------------------------------------------------------------------

def _keys(keys_dir: str) -> Check:
    d = Path(keys_dir)
    if not d.is_dir():
        return Check("operator keys", False, f"{d} does not exist: copy the operator's public key "
                                             "(`ccus ops keygen` writes KEY.pub) there")
    keys = config_apply.load_keys(d)
    if not keys:
        return Check("operator keys", False, f"no usable *.pub in {d}: signed lists and config "
                                             "pushes would all be refused; copy the operator's KEY.pub there")
    return Check("operator keys", True, f"{len(keys)} trusted key(s) in {d}")


def _data_dir(cfg: AgentConfig) -> Check:
    d = cfg.data_dir
    probe = d if d.exists() else d.parent
    if d.exists() and not d.is_dir():
        return Check("data dir", False, f"{d} is a file: device.data_dir must be a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("data dir", False, f"{probe} is not writable by uid {os.getuid()}: "
                                        "chown it to the agent's user (ccus)")
    return Check("data dir", True, f"{d}" + ("" if d.exists() else " (created at the first start)"))


def _read(path: str, what: str) -> tuple[bytes | None, str]:
    if not path:
        return None, f"mqtt.{what} is not set (tls = true needs it)"
    try:
        return Path(path).read_bytes(), ""
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"


def _tls_files(cfg: AgentConfig, now: dt.datetime) -> Iterator[Check]:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    m = cfg.mqtt
    ca_pem, why = _read(m.ca_file, "ca_file")
    ca = None
    if ca_pem is None:
        yield Check("tls ca", False, f"{why}: copy the CA certificate (ca.crt) there")
    else:
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
            yield Check("tls ca", True, f"{m.ca_file}: {ca.subject.rfc4514_string()}")
        except ValueError:
            yield Check("tls ca", False, f"{m.ca_file} is not a PEM certificate: copy ca.crt again")
    cert_pem, why = _read(m.cert_file, "cert_file")
    cert = None
    if cert_pem is None:
        yield Check("tls cert", False, f"{why}: copy device.crt from `ccus ops device add`")
    else:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            yield Check("tls cert", False, f"{m.cert_file} is not a PEM certificate")
        else:
            yield _expiry(m.cert_file, cert, now)
            if ca is not None:
                try:
                    cert.verify_directly_issued_by(ca)
                except (InvalidSignature, ValueError, TypeError) as exc:
                    yield Check("tls chain", False, f"{m.cert_file} is not issued by {m.ca_file} "
                                                    f"({type(exc).__name__}): copy the matching pair")
                else:
                    yield Check("tls chain", True, "the certificate is issued by the CA")
    key_pem, why = _read(m.key_file, "key_file")
    if key_pem is None:
        yield Check("tls key", False, f"{why}: copy device.key (mode 0600, owner ccus)")
        return
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        yield Check("tls key", False, f"{m.key_file}: not an unencrypted PEM key ({exc})")
        return
    mode = Path(m.key_file).stat().st_mode & 0o077
    note = f" (mode allows group/others: chmod 600 {m.key_file})" if mode else ""
    if cert is not None and _public_der(key.public_key()) != _public_der(cert.public_key()):
        yield Check("tls key", False, f"{m.key_file} does not belong to {m.cert_file}: copy the pair "
                                      "from one `ccus ops device add`")
    else:
        yield Check("tls key", True, f"{m.key_file}{note}")


def _public_der(pub: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined,no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _expiry(path: str, cert: object, now: dt.datetime) -> Check:
    start: dt.datetime = cert.not_valid_before_utc  # type: ignore[attr-defined]
    end: dt.datetime = cert.not_valid_after_utc  # type: ignore[attr-defined]
    if now < start:
        return Check("tls cert", False, f"{path} is valid only from {start:%Y-%m-%d %H:%M} UTC: "
                                        "check the device clock (timedatectl)")
    if now >= end:
        return Check("tls cert", False, f"{path} expired on {end:%Y-%m-%d}: issue a new one with "
                                        "`ccus ops device rotate` and copy it here")
    days = (end - now).days
    soon = "; rotate it soon (`ccus ops device rotate`)" if days < EXPIRY_WARN_DAYS else ""
    return Check("tls cert", True, f"{path}: valid until {end:%Y-%m-%d} ({days} days){soon}")


def _idlist(cfg: AgentConfig, now: dt.datetime) -> Check:
    from edge.errors import ListError
    from edge.idlist import MemoryIdList, open_list, read_technicians_csv

    if cfg.idlist.name:
        path = cfg.data_dir / "idlist" / f"{cfg.idlist.name}.idl"
        missing = (f"no cached list {cfg.idlist.name!r} yet ({path}): every card is denied until "
                   "one arrives; publish it with `ccus ops list publish`")
    elif cfg.idlist.path:
        path = Path(cfg.idlist.path)
        missing = f"{path} does not exist: every card is denied; copy the list there"
    else:
        return Check("id list", False, "no list configured: every card is denied; set idlist.name "
                                       "(a signed list over MQTT) or idlist.path")
    if not path.exists():
        return Check("id list", False, missing)
    if path.is_dir():
        return Check("id list", False, f"{path} is a folder, not a list file: point idlist.path at "
                                       "a file, or use idlist.name for signed lists")
    try:
        lst = (MemoryIdList(read_technicians_csv(str(path))) if path.suffix == ".csv"
               else open_list(path))
    except (OSError, ValueError, ListError) as exc:
        return Check("id list", False, f"{path} is unusable ({exc}): every card is denied; "
                                       "publish the list again")
    issued = getattr(lst, "issued_ms", 0) or 0
    age_h = (now.timestamp() * 1000 - issued) / 3_600_000 if issued else None
    close = getattr(lst, "close", None)
    if callable(close):
        close()
    if age_h is not None and age_h > cfg.idlist.max_age_h:
        return Check("id list", False, f"{path}: version {lst.version} is {age_h:.0f} h old "
                                       f"(> idlist.max_age_h {cfg.idlist.max_age_h:g}): publish a fresh one")
    return Check("id list", True, f"{path}: version {lst.version}, {len(lst)} entries")


def _metrics(cfg: AgentConfig) -> Check:
    """[metrics] listen: prometheus_client present (looked up, not imported) and the port free."""
    import importlib.util

    from edge.config import parse_listen

    host, port = parse_listen(cfg.metrics.listen)  # checked by load(): cannot raise here
    if importlib.util.find_spec("prometheus_client") is None:
        return Check("metrics", False, "metrics.listen is set but prometheus-client is not "
                                       "installed: pip install 'ccus-touch[metrics]'")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return Check("metrics", False, f"{host}:{port}: cannot bind ({exc.strerror or exc}): "
                                       "another process has it; set another metrics.listen")
    return Check("metrics", True, f"{host}:{port}: free")


def _board(cfg: AgentConfig) -> Check:
    port = cfg.vending.serial
    if not port:
        return Check("board", False, "role vending needs vending.serial (the board's port)")
    try:
        import serial

        s = serial.Serial(port, cfg.vending.baud, timeout=0)
        s.close()
    except (OSError, ValueError) as exc:  # SerialException is an OSError
        return Check("board", False, f"cannot open {port} ({exc}): check the cable, the port name "
                                     "and that the agent's user is in group dialout")
    return Check("board", True, f"{port} opens at {cfg.vending.baud} baud")


# -- the broker ---------------------------------------------------------------------------------

def _broker(cfg: AgentConfig, timeout_s: float) -> Check:
    m = cfg.mqtt
    where = f"{m.host}:{m.port}"
    try:
        raw = socket.create_connection((m.host, m.port), timeout=timeout_s)
    except socket.gaierror as exc:
        return Check("broker", False, f"unknown host {m.host!r} ({exc.strerror}): check mqtt.host")
    except ConnectionRefusedError:
        return Check("broker", False, f"{where} refused the connection: nothing listens there; "
                                      "check mqtt.port and that the broker runs")
    except TimeoutError:
        return Check("broker", False, f"{where}: no answer within {timeout_s:g} s (firewall, wrong host?)")
    except OSError as exc:
        return Check("broker", False, f"{where}: {exc.strerror or exc}")
    sock: socket.socket = raw
    try:
        if not m.tls:
            return _mqtt_connect(sock, f"{cfg.device.id}-check", where, timeout_s)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(m.ca_file)
        ctx.load_cert_chain(m.cert_file, m.key_file)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=m.host)
        except ssl.SSLCertVerificationError as exc:
            return Check("broker", False, f"{where}: the broker's certificate fails verification "
                                          f"({exc.verify_message}): check mqtt.ca_file and mqtt.host")
        except (ssl.SSLError, OSError) as exc:
            return Check("broker", False, f"{where}: TLS handshake failed ({_why(exc)}): is it a "
                                          "TLS port? (mqtt.tls, mqtt.port)")
        return _client_cert_accepted(sock, where)
    finally:
        sock.close()


def _why(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def _client_cert_accepted(sock: ssl.SSLSocket, where: str, wait_s: float = 1.0) -> Check:
    """With TLS 1.3 the client's handshake ends before the broker has judged the client
    certificate: a refusal arrives as an alert just after. So wait a moment for one; an MQTT
    broker says nothing until CONNECT, so silence means accepted. No CONNECT is sent: the
    cloud broker takes the client id from the certificate, and a CONNECT would take over the
    running agent's session."""
    version = sock.version()
    sock.settimeout(wait_s)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return Check("broker", True, f"{where}: {version}, client certificate accepted")
    except ssl.SSLError as exc:
        return Check("broker", False, f"{where}: the broker refused the client certificate "
                                      f"({_why(exc)}): check mqtt.cert_file, the CA and the CRL")
    except OSError as exc:
        return Check("broker", False, f"{where}: {exc.strerror or exc} right after the TLS handshake")
    if not data:
        return Check("broker", False, f"{where}: closed the connection right after the TLS "
                                      "handshake: the client certificate was refused")
    return Check("broker", False, f"{where}: spoke first after the TLS handshake: not an MQTT broker?")


CONNACK_CODES = {1: "unacceptable protocol version", 2: "client id refused",
                 3: "server unavailable", 4: "bad user name or password",
                 5: "not authorized"}


def _mqtt_connect(sock: socket.socket, client_id: str, where: str, timeout_s: float) -> Check:
    """Plain TCP (a private test broker): one MQTT 3.1.1 CONNECT under a client id of its own
    (clean session) and its CONNACK, so a port that is not MQTT shows."""
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 10)      # level 4, clean session, 10 s
    body = var + struct.pack(">H", len(cid)) + cid
    try:
        sock.settimeout(timeout_s)
        sock.sendall(bytes([0x10, len(body)]) + body)
        ack = _recv(sock, 4)
    except TimeoutError:
        return Check("broker", False, f"{where}: no CONNACK within {timeout_s:g} s: is it an MQTT port?")
    except OSError as exc:
        return Check("broker", False, f"{where}: {exc.strerror or exc}")
    if len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0:
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        return Check("broker", True, f"{where}: plain TCP (mqtt.tls = false), MQTT CONNECT accepted")
    if len(ack) == 4 and ack[0] == 0x20:
        return Check("broker", False, f"{where}: CONNECT refused: {CONNACK_CODES.get(ack[3], ack[3])}")
    return Check("broker", False, f"{where}: no CONNACK: is it an MQTT port? (or a TLS one: mqtt.tls)")


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
