"""The sinks and the simulated site devices that `ccus cluster up --sinks N --agents N` starts
beside the nodes, detached: each a real `ccus sink run --nats` or `ccus agent` process.

Rules of this file:

- One folder per process inside the cluster folder: ``DIR/sink-N/`` (sink.log, ready, proc.json)
  and ``DIR/agent-NN/`` (agent.toml, list.csv, data/, agent.log, proc.json). ``proc.json``
  holds the pid and what the command line must contain; a pid is signalled only while /proc
  says it is still that command (`procs.cmdline_has`), so a reused pid is left alone.
- Every sink consumes the same durable consumer (``--group sink``), so they share the load and
  one's loss leaves the other; `up` returns once each has touched its ready file (it is
  subscribed), or raises naming the sink's log.
- An agent is a gate with one nfcpy reader on an emulated-card field, ``udp:127.0.0.1:PORT``
  (the same port on every start of one folder, as its outbox in ``data/`` is kept), and a
  static list of `CARDS` technicians whose cards `ccus card emulate` makes (sim/agent_config.py).
  With a site broker every second agent is behind it (MQTT 5, its bridge carries the touches),
  the others are straight on the nodes (MQTT 3.1.1, every node in ``brokers``, acks at QoS 0).
- `down` stops the agents first (what is not acknowledged stays in their outboxes for the next
  `up`), then the sinks, before the site brokers, the nodes and the store stop.
"""

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.cluster_pki import Tls
from broker.launcher import BrokerError
from broker.procs import cmdline_has, stop_pid
from sim.agent_config import card_of, gate_agent_toml, technicians, tid_of, write_idlist_csv
from sim.nfc_card import free_udp_port

ROOT = Path(__file__).resolve().parents[1]
STATE = "proc.json"
CARDS = 40
CCUS = [sys.executable, "-m", "ccus.cli"]


def agent_name(i: int) -> str:
    return f"gate-{i:02d}"


def behind_site(i: int, has_site: bool) -> bool:
    """Is agent i (from 1) behind the site broker? The odd ones, when there is one."""
    return has_site and i % 2 == 1


@dataclass(frozen=True)
class Started:
    """One process `up` started: its name, pid, folder and the line `ccus cluster up` prints."""

    name: str
    pid: int
    folder: Path
    line: str


def _spawn(folder: Path, log_name: str, argv: list[str], marks: list[str]) -> int:
    with open(folder / log_name, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    (folder / STATE).write_text(json.dumps({"pid": proc.pid, "marks": marks,
                                            "log": log_name}, indent=1) + "\n")
    return proc.pid


def _saved(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return {}


def running(folder: Path) -> bool:
    """Is the process recorded in `folder` still alive and still that command?"""
    s = _saved(folder)
    return bool(s) and cmdline_has(int(s.get("pid", 0)), *s.get("marks", ["\0"]))


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-1][-300:]
    except (OSError, IndexError):
        return "(empty log)"


def start_sinks(cluster_dir: Path, n: int, store: str, nats_urls: list[str], *,
                tls: dict[str, Tls] | None = None, timeout: float = 60.0) -> list[Started]:
    """`n` sinks on the durable consumer `sink`, into `store`; return once all are subscribed.
    `tls`: sink-N's certificate by name, on a secure cluster."""
    out = []
    for i in range(1, n + 1):
        folder = cluster_dir / f"sink-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        if running(folder):
            raise BrokerError(f"{folder}: that sink is running already (pid "
                              f"{_saved(folder)['pid']}); `ccus cluster down --dir {cluster_dir}`")
        ready = folder / "ready"
        ready.unlink(missing_ok=True)
        argv = [*CCUS, "sink", "run", "--store", store, "--nats", ",".join(nats_urls),
                "--client-id", f"sink-{i}", "--ready-file", str(ready), "--metrics", "off",
                "--log-format", "text"]
        if tls:
            t = tls[f"sink-{i}"]
            argv += ["--ca", str(t.ca), "--cert", str(t.cert), "--key", str(t.key)]
        pid = _spawn(folder, "sink.log", argv, ["sink", "run", str(ready)])
        out.append(Started(f"sink-{i}", pid, folder, f"sink-{i}: pid {pid}, log {folder / 'sink.log'}"))
    _wait_all(out, "sink.log", "subscribed", lambda s: (s.folder / "ready").exists(), timeout)
    return out


def _agent_toml(folder: Path, dev: str, site: str, udp: int, *, site_port: int | None,
                mqtt_ports: list[int], tls: Tls | None) -> str:
    text = gate_agent_toml(dev=dev, site=site, data_dir=folder / "data", host="127.0.0.1",
                           port=site_port or mqtt_ports[0], list_path=folder / "list.csv",
                           udp_port=udp)
    if tls is not None and site_port is None:  # the site broker's device listener is plain
        text = text.replace("tls = false\n", f'tls = true\nca_file = "{tls.ca}"\n'
                            f'cert_file = "{tls.cert}"\nkey_file = "{tls.key}"\n', 1)
    if site_port is None:  # straight on the nodes: docs/operations.md, "Devices on the cluster"
        nodes = ", ".join(f'"127.0.0.1:{p}"' for p in mqtt_ports)
        text = text.replace("[idlist]", f'protocol = "3.1.1"\nbrokers = [{nodes}]\n'
                            "subscribe_qos = 0\n[idlist]", 1)
    return text


def start_agents(cluster_dir: Path, n: int, site: str, mqtt_ports: list[int],
                 site_port: int | None = None, *, tls: dict[str, Tls] | None = None,
                 timeout: float = 60.0) -> list[Started]:
    """`n` gate agents at `site` (every second one behind the site broker on `site_port`, when
    there is one); return once every agent has connected to its broker. `tls`: gate-NN's
    device certificate, on a secure cluster (used straight on the nodes)."""
    out = []
    for i in range(1, n + 1):
        dev = agent_name(i)
        folder = cluster_dir / f"agent-{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if running(folder):
            raise BrokerError(f"{folder}: that agent is running already (pid "
                              f"{_saved(folder)['pid']}); `ccus cluster down --dir {cluster_dir}`")
        udp = int(_saved(folder).get("udp") or free_udp_port())
        behind = site_port if behind_site(i, site_port is not None) else None
        conf = folder / "agent.toml"
        conf.write_text(_agent_toml(folder, dev, site, udp, site_port=behind,
                                    mqtt_ports=mqtt_ports, tls=(tls or {}).get(dev)))
        write_idlist_csv(folder / "list.csv", technicians(CARDS))
        log = folder / "agent.log"
        start_at = log.stat().st_size if log.exists() else 0
        pid = _spawn(folder, "agent.log", [*CCUS, "agent", "--config", str(conf), "--log-format",
                                           "text"], ["agent", str(conf)])
        state = _saved(folder)
        (folder / STATE).write_text(json.dumps({**state, "udp": udp, "dev": dev,
                                                "start_at": start_at}, indent=1) + "\n")
        via = f"site broker 127.0.0.1:{site_port} (MQTT 5)" if behind else \
            f"the nodes (MQTT 3.1.1{', TLS' if tls else ''})"
        line = (f"{dev}: reader udp:127.0.0.1:{udp} via {via}, pid {pid}; tap: ccus card emulate "
                f"felica --port {udp} --id {card_of(1).ident.hex().upper()} --tid {tid_of(1)}")
        out.append(Started(dev, pid, folder, line))
    def connected(s: Started) -> bool:  # since this start: the log is appended to
        start_at = int(_saved(s.folder).get("start_at", 0))
        return "mqtt: connected to" in _log_from(s.folder / "agent.log", start_at)

    _wait_all(out, "agent.log", "connected", connected, timeout)
    return out


def _wait_all(procs: list[Started], log_name: str, what: str,
              done: Callable[[Started], bool], timeout: float) -> None:
    """Until done(p) for each; BrokerError naming the one that exited or is late, and its log."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while not done(p):
            if not running(p.folder):
                raise BrokerError(f"{p.name} exited: {_tail(p.folder / log_name)}")
            if time.monotonic() > deadline:
                raise BrokerError(f"{p.name} not {what} within {timeout:.0f} s "
                                  f"(log {p.folder / log_name})")
            time.sleep(0.1)


def _log_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def down(cluster_dir: str | Path) -> list[str]:
    """Stop the agents, then the sinks, of the cluster folder; the names stopped."""
    stopped = []
    for pattern in ("agent-*", "sink-*"):
        for folder in sorted(Path(cluster_dir).glob(pattern)):
            if not running(folder):
                continue
            pid = int(_saved(folder)["pid"])
            stop_pid(pid, lambda f=folder: running(f), timeout=20.0)
            stopped.append(folder.name)
    return stopped
