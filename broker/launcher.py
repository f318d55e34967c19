"""Start and stop a private Mosquitto from the project's own config, on a free loopback port;
the pieces of config every template shares (host settings, per-client limits)."""

import getpass
import glob
import logging
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.procs import stop_process

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
# Debian/Ubuntu/Raspberry Pi OS put the plugin under the multiarch folder; a source build
# under /usr/local/lib
DYNSEC_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                "/usr/local/lib/mosquitto_dynamic_security.so")


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next((p for p in SEARCH if Path(p).exists()), None)
    if not path:
        raise BrokerError("mosquitto is not installed: run ./dev.sh setup "
                          "(or 'sudo apt-get install mosquitto')")
    return path


def find_dynsec_plugin() -> str:
    """The dynamic-security plugin Mosquitto 2.0 ships (package mosquitto), or BrokerError."""
    for pattern in DYNSEC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise BrokerError("mosquitto_dynamic_security.so not found (it ships with mosquitto 2.0): "
                      "install mosquitto 2.0 or pass its path (--dynsec-plugin)")


@dataclass(frozen=True)
class Limits:
    """Per-client caps. Mosquitto 2.0 has no per-listener or per-user queue limits: these hold
    for every client, sized for the biggest honest one (a sink down for a while, a site whose
    uplink is down). Each identity has one session (client id = CN), so the total is bounded
    by the inventory; a queue over its cap drops, and the end-to-end acks make the devices
    resend what was dropped."""
    max_queued_messages: int = 100_000            # ~20 MB of touches at ~200 B each
    max_queued_bytes: int = 64 * 1024 * 1024
    max_inflight_messages: int = 100
    # the whole packet (payload, topic, properties): a 60 KiB ID-list chunk fits with room;
    # replaces message_size_limit, deprecated in 2.0 (the broker warns at every start)
    max_packet_size: int = 65536
    # a session (of an MQTT 3 or 5 client) not resumed within this is dropped with its queue;
    # Mosquitto's units: h d w m y
    session_expiry: str = "14d"

    def render(self) -> str:
        return "\n".join([
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_packet_size {self.max_packet_size}",
            f"persistent_client_expiration {self.session_expiry}"])


def host_settings(user: str = "", data_dir: str | Path = "", log_dest: str = "") -> str:
    """The lines that depend on the host, each left out when empty: `user`,
    `persistence_location`, `log_dest`. Left out, the including config (Debian's stock
    /etc/mosquitto/mosquitto.conf sets persistence_location and log_dest) or Mosquitto's
    default decides; set twice, Mosquitto refuses to start (`Duplicate persistence_location`)."""
    lines = []
    if user:
        lines.append(f"user {user}")
    if str(data_dir):
        lines.append(f"persistence_location {str(data_dir).rstrip('/')}/")
    if log_dest:
        lines.append(f"log_dest {log_dest}")
    return "\n".join(lines)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768   # Linux's default


def free_port() -> int:
    """A free loopback TCP port below the kernel's ephemeral range. In that range a client that
    keeps connecting to a stopped listener can be given the very port as its own source and
    connect to itself (a TCP self-connect), holding the port, so the listener's restart fails
    with 'Address already in use' (seen in tests/test_faults.py: an agent reconnecting while
    its broker was down)."""
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue   # taken
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:   # the range is full
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(template: str, **values: object) -> str:
    text = (TEMPLATES / template).read_text()
    return text.format(**values)


class PrivateBroker:
    """A Mosquitto of our own: `with PrivateBroker() as b: ... b.port`.

    The data folder holds the generated config, the log and (with persistence) the database,
    so a test can kill -9 the broker and start it again over the same state.
    """

    def __init__(self, data_dir: str | Path | None = None, *, port: int | None = None,
                 persistence: bool = False, template: str = "dev.conf",
                 values: Mapping[str, object] | None = None,
                 conf_file: str | Path | None = None) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="ccus-broker-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.persistence = persistence
        self.template = template
        self.values = dict(values or {})  # extra template values (TLS files, ACL, bridge)
        # a config written elsewhere (a `ccus ops broker-config` bundle): used as it is
        self.conf_file = Path(conf_file) if conf_file else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.conf_file or self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def write_config(self) -> Path:
        values: dict[str, object] = {
            "port": self.port, "user": getpass.getuser(),
            "persistence": "true" if self.persistence else "false",
            "data_dir": self.data_dir, "log_file": self.log_path,
            "listener": f"{self.port} {self.host}", "log_dest": f"file {self.log_path}",
            "host_settings": host_settings(getpass.getuser(), self.data_dir,
                                           f"file {self.log_path}"),
            "limits": Limits().render()}
        if self.template == "cloud.conf" and "dynsec_plugin" not in self.values:
            values["dynsec_plugin"] = find_dynsec_plugin()
        self.conf_path.write_text(render(self.template, **{**values, **self.values}))
        return self.conf_path

    def reload(self) -> None:
        """SIGHUP: Mosquitto 2.0 rereads its ACL file and its CRL (not the dynamic-security
        plugin's file: restart for that)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def start(self, timeout: float = 10.0) -> "PrivateBroker":
        if self.conf_file is None:
            self.write_config()
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited ({self.proc.returncode}): {err.strip()} "
                                  f"{self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("private broker on %s:%d (pid %d)", self.host, self.port, self.proc.pid)
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-500:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no clean shutdown, no final persistence write."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "PrivateBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
