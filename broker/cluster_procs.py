"""The processes that `ccus cluster up --sinks N --agents N` starts beside the nodes, detached:
each a real `ccus sink run --nats` (started here) or `ccus agent` (ccus/cluster_agents.py,
which writes their configs with the simulator's cards) in a folder of its own.

Rules of this file:

- One folder per process inside the cluster folder: ``DIR/sink-N/`` (sink.log, ready, proc.json,
  metrics-port: its Prometheus endpoint on loopback, the same port on every `up`)
  and ``DIR/agent-NN/`` (agent.toml, list.csv, data/, agent.log, proc.json). ``proc.json``
  holds the pid and what the command line must contain; a pid is signalled only while /proc
  says it is still that command (`procs.cmdline_has`), so a reused pid is left alone.
- Every sink consumes the same durable consumer (``--group sink``), so they share the load and
  one's loss leaves the other; `up` returns once each has touched its ready file (it is
  subscribed), or raises naming the sink's log.
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
from broker.launcher import BrokerError, free_port
from broker.procs import cmdline_has, stop_pid

ROOT = Path(__file__).resolve().parents[1]
STATE = "proc.json"
CCUS = [sys.executable, "-m", "ccus.cli"]


@dataclass(frozen=True)
class Started:
    """One process `up` started: its name, pid, folder and the line `ccus cluster up` prints."""

    name: str
    pid: int
    folder: Path
    line: str


def spawn(folder: Path, log_name: str, argv: list[str], marks: list[str],
          keep: dict[str, object] | None = None, env: dict[str, str] | None = None) -> int:
    """Start `argv` detached (with `env`, default ours), its output appended to the folder's
    log; proc.json gets its pid, `marks` and whatever else the next start needs (`keep`)."""
    with open(folder / log_name, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                env=env)
    (folder / STATE).write_text(json.dumps({"pid": proc.pid, "marks": marks, "log": log_name,
                                            **(keep or {})}, indent=1) + "\n")
    return proc.pid


def saved(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return {}


def running(folder: Path) -> bool:
    """Is the process recorded in `folder` still alive and still that command?"""
    s = saved(folder)
    return bool(s) and cmdline_has(int(s.get("pid", 0)), *s.get("marks", ["\0"]))


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-1][-300:]
    except (OSError, IndexError):
        return "(empty log)"


def metrics_port(folder: Path) -> int:
    """The sink's metrics port: chosen free once, kept in its folder (the same on every `up`,
    so a Prometheus scrape config written once stays right)."""
    f = folder / "metrics-port"
    if f.exists() and f.read_text().strip().isdigit():
        return int(f.read_text())
    port = free_port()
    f.write_text(f"{port}\n")
    return port


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
                              f"{saved(folder)['pid']}); `ccus cluster down --dir {cluster_dir}`")
        ready = folder / "ready"
        ready.unlink(missing_ok=True)
        port = metrics_port(folder)
        argv = [*CCUS, "sink", "run", "--store", store, "--nats", ",".join(nats_urls),
                "--client-id", f"sink-{i}", "--ready-file", str(ready),
                "--metrics", f"127.0.0.1:{port}", "--log-format", "text"]
        if tls:
            t = tls[f"sink-{i}"]
            argv += ["--ca", str(t.ca), "--cert", str(t.cert), "--key", str(t.key)]
        pid = spawn(folder, "sink.log", argv, ["sink", "run", str(ready)])
        out.append(Started(f"sink-{i}", pid, folder, f"sink-{i}: pid {pid}, log "
                           f"{folder / 'sink.log'}, metrics http://127.0.0.1:{port}/metrics"))
    wait_all(out, "sink.log", "subscribed", lambda s: (s.folder / "ready").exists(), timeout)
    return out


def wait_all(procs: list[Started], log_name: str, what: str,
              done: Callable[[Started], bool], timeout: float) -> None:
    """Until done(p) for each; BrokerError naming the one that exited or is late, and its log."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while not done(p):
            if not running(p.folder):
                raise BrokerError(f"{p.name} exited: {log_tail(p.folder / log_name)}")
            if time.monotonic() > deadline:
                raise BrokerError(f"{p.name} not {what} within {timeout:.0f} s "
                                  f"(log {p.folder / log_name})")
            time.sleep(0.1)


def log_from(path: Path, offset: int) -> str:
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
            pid = int(saved(folder)["pid"])
            stop_pid(pid, lambda f=folder: running(f), timeout=20.0)
            stopped.append(folder.name)
    return stopped
