"""Start and stop a private Mosquitto from the project's own config, on a free loopback port."""

import getpass
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from broker.procs import stop_process

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next((p for p in SEARCH if Path(p).exists()), None)
    if not path:
        raise BrokerError("mosquitto is not installed: run ./dev.sh setup "
                          "(or 'sudo apt-get install mosquitto')")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
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
                 values: Mapping[str, object] | None = None) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="ccus-broker-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.persistence = persistence
        self.template = template
        self.values = dict(values or {})  # extra template values (TLS files, ACL, bridge)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def write_config(self) -> Path:
        values: dict[str, object] = {
            "port": self.port, "user": getpass.getuser(),
            "persistence": "true" if self.persistence else "false",
            "data_dir": self.data_dir, "log_file": self.log_path,
            "listener": f"{self.port} {self.host}", "log_dest": f"file {self.log_path}"}
        self.conf_path.write_text(render(self.template, **{**values, **self.values}))
        return self.conf_path

    def reload(self) -> None:
        """SIGHUP: Mosquitto rereads its ACL file (not its TLS files; restart for a new CRL)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def start(self, timeout: float = 10.0) -> "PrivateBroker":
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
