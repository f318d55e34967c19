"""A site Mosquitto bridged to the local NATS cluster's MQTT gateway (`ccus cluster up --site`).

Rules of this file:

- The config is broker/templates/site-cluster.conf: the bridge topics of site.conf, every
  node's MQTT port in one ``address`` line (Mosquitto fails over between them), MQTT 3.1.1.
- Its folder is ``DIR/site-SITE`` inside the cluster's folder: mosquitto.conf, its log, its
  persistence, and ``site.json`` (site, port, pid), so ``ccus cluster down --dir DIR`` from
  another process stops it. A pid is signalled only while /proc says it is still a mosquitto
  on that config (a reused pid is left alone).
- Same port on every start of one folder: the devices and a restarted bridge find it again.
- On a secure cluster (`cluster up --secure --pki`) the bridge speaks TLS to the nodes with the
  site's bridge certificate (broker/cluster_pki.py finds it); the files are kept in
  ``site.json``, so a restart by the watchdog (which knows only the folder) keeps them.
- `ccus cluster up --site` also starts the bridge watchdog (`ccus site-watchdog --site-dir`,
  broker/bridge_watchdog.py), detached, its pid in ``watchdog.json`` and its log in
  ``watchdog.log`` beside the broker's; `down` stops it before the broker, so it never
  restarts a broker that is only stopping. It runs with ``--keep-retained``
  (broker/retain_keep.py): NATS sends the bridge live config and lists unretained, and the
  keeper makes the site broker keep them retained.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from broker.cluster_pki import Tls
from broker.launcher import BrokerError, PrivateBroker, find_mosquitto, free_port
from broker.procs import cmdline_has, stop_pid, stop_process

STATE = "site.json"
WATCHDOG = "watchdog.json"


def cloud_addresses(mqtt_ports: list[int], host: str = "127.0.0.1") -> str:
    """The bridge's ``address`` value: every node, space-separated."""
    return " ".join(f"{host}:{p}" for p in mqtt_ports)


def bridge_tls(tls: Tls | None) -> str:
    """The bridge's TLS lines (site.conf's), or a comment when the nodes speak plain MQTT."""
    if tls is None:
        return "# plain MQTT to the nodes (a cluster without --secure)"
    return (f"bridge_cafile {tls.ca}\nbridge_certfile {tls.cert}\nbridge_keyfile {tls.key}\n"
            "bridge_insecure false")


class SiteBridge:
    """``SiteBridge(folder, site, mqtt_ports).start()``; ``.kill()``, ``.start()`` again, ``.stop()``."""

    def __init__(self, folder: str | Path, site: str, mqtt_ports: list[int],
                 tls: Tls | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.site = site
        state = self.folder / STATE
        saved = json.loads(state.read_text()) if state.exists() else {}
        self.port: int = saved.get("port") or free_port()
        self.pid: int = saved.get("pid", 0)
        if tls is None and saved.get("tls"):
            tls = Tls(*(Path(saved["tls"][k]) for k in ("ca", "cert", "key")))
        self.tls = tls
        self.broker = PrivateBroker(self.folder, port=self.port, template="site-cluster.conf",
                                    values={"site": site,
                                            "cloud_addresses": cloud_addresses(mqtt_ports),
                                            "bridge_tls": bridge_tls(tls)})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.broker.conf_path

    @property
    def log_path(self) -> Path:
        return self.broker.log_path

    def _save(self) -> None:
        tls = None if self.tls is None else \
            {"ca": str(self.tls.ca), "cert": str(self.tls.cert), "key": str(self.tls.key)}
        (self.folder / STATE).write_text(json.dumps({"site": self.site, "port": self.port,
                                                     "pid": self.pid, "tls": tls},
                                                    indent=1) + "\n")

    def start(self, timeout: float = 10.0, *, detach: bool = False) -> "SiteBridge":
        """Start Mosquitto (its bridge connects by itself); return once it listens."""
        self.broker.write_config()
        # detach: `ccus cluster up` returns and the broker keeps running in its own session
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=detach)
        self.pid = self.proc.pid
        self._save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"site mosquitto exited ({self.proc.returncode}): "
                                  f"{self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"site mosquitto did not listen on {self.port} within {timeout:.0f}s "
                          f"(log {self.log_path})")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-400:]
        except OSError:
            return ""

    def running(self) -> bool:
        """Is self.pid still the mosquitto started on this config?"""
        return cmdline_has(self.pid, str(self.conf_path))

    def kill(self) -> None:
        """kill -9: no clean shutdown, no final persistence write."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        else:
            stop_pid(self.pid, self.running)


def site_folder(cluster_dir: str | Path, site: str) -> Path:
    return Path(cluster_dir) / f"site-{site}"


def up(cluster_dir: str | Path, site: str, mqtt_ports: list[int], *,
       watchdog_limit_s: float = 15.0, tls: Tls | None = None) -> SiteBridge:
    """`ccus cluster up --site SITE`: start (detached) the site broker of the cluster folder,
    and its bridge watchdog."""
    b = SiteBridge(site_folder(cluster_dir, site), site, mqtt_ports, tls)
    if b.running():
        raise BrokerError(f"{b.folder}: the site broker is running already (pid {b.pid})")
    b.start(detach=True)
    start_watchdog(b, mqtt_ports, watchdog_limit_s)
    return b


def start_watchdog(b: SiteBridge, mqtt_ports: list[int], limit_s: float) -> int:
    """`ccus site-watchdog` on this site broker, detached (restarts it with --site-dir); its pid."""
    argv = [sys.executable, "-m", "ccus.cli", "site-watchdog", "--broker", f"127.0.0.1:{b.port}",
            "--site", b.site, "--cloud", cloud_addresses(mqtt_ports), "--limit", str(limit_s),
            "--site-dir", str(b.folder), "--keep-retained", "--log-format", "text"]
    with open(b.folder / "watchdog.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True,
                                cwd=Path(__file__).resolve().parents[1])
    (b.folder / WATCHDOG).write_text(json.dumps({"pid": proc.pid}) + "\n")
    return proc.pid


def watchdog_running(folder: Path, pid: int) -> bool:
    """Is `pid` still the `ccus site-watchdog` of this site folder?"""
    return cmdline_has(pid, "site-watchdog", str(folder))


def stop_watchdog(folder: Path) -> bool:
    """SIGTERM the folder's watchdog (only while /proc says it is that one); True if it ran."""
    state = folder / WATCHDOG
    if not state.exists():
        return False
    pid = int(json.loads(state.read_text()).get("pid", 0))
    if not watchdog_running(folder, pid):
        return False
    stop_pid(pid, lambda: watchdog_running(folder, pid))
    return True


def down(cluster_dir: str | Path) -> list[str]:
    """`ccus cluster down`: stop every site broker of the cluster folder; the sites stopped."""
    stopped = []
    for state in sorted(Path(cluster_dir).glob(f"site-*/{STATE}")):
        site = json.loads(state.read_text())["site"]
        stop_watchdog(state.parent)
        b = SiteBridge(state.parent, site, [])
        if b.running():
            b.stop()
            stopped.append(site)
    return stopped
