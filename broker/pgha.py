"""The store tier on one machine: a pg_auto_failover monitor, a primary and a hot standby.

Rules of this file:

- Opt-in, beside the NATS cluster of broker/nats.py (`ccus cluster up --pg`): the
  single-machine store (SQLite, or one PostgreSQL) is not touched by anything here.
- Engines: Debian's ``postgresql-15-auto-failover`` (``pg_autoctl``) over the PostgreSQL 15
  binaries; the monitor decides, each node's keeper (``pg_autoctl run``) applies. Replication
  is PostgreSQL's own streaming replication, synchronous while the standby is up (a commit the
  sink acknowledges is on both nodes), so a failover loses no acknowledged touch.
- PostgreSQL refuses to run as root. Run as root, every pg_autoctl runs as the system user
  ``ccus-pg`` (created here when missing, no home, no shell) through ``setpriv`` (an exec,
  not a fork: the pid we keep is pg_autoctl's own), and the data lives in a folder that user
  can reach (DIR/pg when it can, else a fresh /tmp/ccus-pgha-* folder, recorded in
  ``pgha.json`` and removed by ``down(purge=True)``). Run as anyone else, as that user.
- Loopback only, ``--auth trust`` and ``--no-ssl``: a test and demo layout, never a
  production one (docs/operations.md, "The store tier"). Unix sockets go to the data folder,
  not /var/run/postgresql (another user's), and each node is kept small (32 MB buffers).
- One folder holds everything; ``pgha.json`` names the ports, pids and data folder, so
  ``down`` from another process finds what ``up`` started, and ``up`` again restarts the same
  pair with its data. A pid is signalled only while /proc says it is still a process on that
  node's data folder.
"""

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker.launcher import BrokerError, free_port
from broker.procs import stop_pid, stop_process

STATE = "pgha.json"
PG_USER = "ccus-pg"
DB = "ccus"
PG_BIN_SEARCH = ("/usr/lib/postgresql/15/bin",)
# what each node gets before pg_autoctl adds its own settings (postgresql.auto.conf is read
# last, and pg_basebackup copies it to the standby)
_AUTO_CONF = """unix_socket_directories = '{run}'
shared_buffers = '32MB'
max_connections = 60
"""
# the monitor notices a dead primary sooner than its 20 s default (a loopback test layout:
# no network jitter to ride out)
_MONITOR_CONF = """pgautofailover.health_check_period = 1000
pgautofailover.health_check_timeout = 1000
pgautofailover.health_check_max_retries = 2
pgautofailover.health_check_retry_delay = 500
pgautofailover.node_considered_unhealthy_timeout = 2500
pgautofailover.primary_demote_timeout = 2500
"""
# (primary_demote_timeout: how long the monitor waits for an unreachable primary to demote
# itself before promoting the standby; 30 s by default. Short is safe here because writes on a
# primary cut off from its synchronous standby block rather than commit.)


def find_pg_autoctl() -> tuple[str, str]:
    """(pg_autoctl, the PostgreSQL bin folder) or a BrokerError saying what to install."""
    autoctl = shutil.which("pg_autoctl") or ("/usr/bin/pg_autoctl"
                                             if Path("/usr/bin/pg_autoctl").exists() else None)
    bindir = next((d for d in PG_BIN_SEARCH if Path(d, "pg_ctl").exists()), None)
    if not autoctl or not bindir:
        raise BrokerError("pg_auto_failover is not installed: 'sudo apt-get install "
                          "postgresql-15-auto-failover'")
    return autoctl, bindir


@dataclass
class PgNode:
    name: str
    port: int
    pid: int = 0

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class _State:
    data: str
    user: str
    monitor: PgNode
    nodes: list[PgNode] = field(default_factory=list)


def _ensure_user() -> str:
    """The system user the nodes run as when we are root (created once)."""
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", PG_USER], check=True,
                       capture_output=True)
    return PG_USER


class PgHa:
    """``with PgHa(folder) as ha: ha.url; ha.primary(); ha.kill_node("node1")``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.autoctl, self.bindir = find_pg_autoctl()
        path = self.folder / STATE
        if path.exists():
            raw = json.loads(path.read_text())
            self.state = _State(raw["data"], raw["user"], PgNode(**raw["monitor"]),
                                [PgNode(**n) for n in raw["nodes"]])
        else:
            ports: set[int] = set()
            while len(ports) < 3:
                ports.add(free_port())
            p = sorted(ports)
            user = _ensure_user() if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
            self.state = _State(str(self._data_folder(user)), user, PgNode("monitor", p[0]),
                                [PgNode("node1", p[1]), PgNode("node2", p[2])])

    # -- where and as whom ---------------------------------------------------------------------
    def _data_folder(self, user: str) -> Path:
        own = self.folder / "pg"
        if os.geteuid() != 0:
            return own
        own.mkdir(exist_ok=True)
        shutil.chown(own, user, user)
        if subprocess.run(self._as_user(["test", "-w", str(own), "-a", "-x", str(own)], user),
                          capture_output=True).returncode == 0:
            return own
        # DIR's parents are closed to other users (pytest's tmp_path is): a folder it can reach
        own.rmdir()
        data = Path(tempfile.mkdtemp(prefix="ccus-pgha-", dir="/tmp"))
        shutil.chown(data, user, user)
        return data

    def _as_user(self, argv: list[str], user: str | None = None) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["setpriv", f"--reuid={user or self.state.user}", f"--regid={user or self.state.user}",
                "--init-groups", "--", *argv]

    @property
    def data(self) -> Path:
        return Path(self.state.data)

    def _env(self) -> dict[str, str]:
        d = str(self.data)
        return {"PATH": f"{self.bindir}:/usr/bin:/bin", "HOME": d, "LANG": "C.UTF-8",
                "XDG_CONFIG_HOME": f"{d}/config", "XDG_DATA_HOME": f"{d}/share",
                "XDG_RUNTIME_DIR": f"{d}/run", "PGHOST": f"{d}/run"}

    def _run(self, argv: list[str], what: str, timeout: float = 120.0) -> str:
        try:
            r = subprocess.run(self._as_user(argv), env=self._env(), capture_output=True,
                               text=True, timeout=timeout, cwd=self.data)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"{what} did not finish within {timeout:.0f}s") from exc
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise BrokerError(f"{what} failed ({r.returncode}): {' | '.join(tail)}")
        return r.stdout

    def _save(self) -> None:
        (self.folder / STATE).write_text(json.dumps(asdict(self.state), indent=1) + "\n")

    def pgdata(self, node: PgNode) -> Path:
        return self.data / node.name

    @property
    def monitor_uri(self) -> str:
        return (f"postgres://autoctl_node@127.0.0.1:{self.state.monitor.port}/pg_auto_failover"
                "?sslmode=disable")

    @property
    def url(self) -> str:
        """The multi-host connection string the sink uses: the primary wherever it is now."""
        hosts = ",".join(n.hostport for n in self.state.nodes)
        return f"postgresql://{self.state.user}@{hosts}/{DB}?target_session_attrs=read-write"

    def node(self, name: str) -> PgNode:
        for n in [self.state.monitor, *self.state.nodes]:
            if n.name == name:
                return n
        raise BrokerError(f"no node {name!r} in {self.folder / STATE}")

    # -- starting ------------------------------------------------------------------------------
    def _initdb(self, node: PgNode, extra: str = "") -> None:
        """A fresh data folder with our socket folder and sizes; pg_autoctl adopts it."""
        pgdata = self.pgdata(node)
        if pgdata.exists():
            return
        self._run([f"{self.bindir}/initdb", "-D", str(pgdata), "--auth=trust", "-U",
                   self.state.user, "-E", "UTF8", "--locale=C.UTF-8"], f"initdb {node.name}")
        conf = _AUTO_CONF.format(run=self.data / "run") + extra
        with open(pgdata / "postgresql.auto.conf", "a") as f:
            f.write(conf)

    def _common(self, node: PgNode) -> list[str]:
        return ["--pgdata", str(self.pgdata(node)), "--pgport", str(node.port), "--hostname",
                "127.0.0.1", "--listen", "127.0.0.1", "--auth", "trust", "--no-ssl",
                "--pgctl", f"{self.bindir}/pg_ctl"]

    def _start_keeper(self, node: PgNode, detach: bool) -> None:
        log = open(self.data / f"{node.name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(self._as_user([self.autoctl, "run", "--pgdata",
                                               str(self.pgdata(node))]),
                                env=self._env(), stdout=log, stderr=log, cwd=self.data,
                                start_new_session=detach)
        log.close()
        self.procs[node.name] = proc
        node.pid = proc.pid
        self._save()

    def start(self, timeout: float = 180.0, *, detach: bool = False) -> "PgHa":
        """Monitor, primary, standby (created on first start), then wait for the pair."""
        for sub in ("run", "config", "share"):
            (self.data / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for sub in ("", "run", "config", "share"):
                shutil.chown(self.data / sub, self.state.user, self.state.user)
        (self.data / "run").chmod(0o700)
        self._save()
        mon, first, second = self.state.monitor, *self.state.nodes
        if all(self._created(n) for n in (mon, first, second)):
            return self._restart(timeout, detach)
        if not self._created(mon):
            self._initdb(mon, _MONITOR_CONF)
            self._run([self.autoctl, "create", "monitor", *self._common(mon)], "create monitor")
        self._start_keeper(mon, detach)
        self._wait(lambda: self._monitor_up(), timeout, "the pg_auto_failover monitor")
        if not self._created(first):
            first.port = self._fresh_port()
            self._initdb(first)
            self._run([self.autoctl, "create", "postgres", *self._common(first), "--name",
                       first.name, "--dbname", DB, "--monitor", self.monitor_uri],
                      f"create postgres {first.name}")
        self._start_keeper(first, detach)
        self._wait(lambda: self.states().get(first.name, ("", ""))[0] in ("single", "primary",
                                                                          "wait_primary"),
                   timeout, f"{first.name} to run as the primary")
        if not self._created(second):
            second.port = self._fresh_port()
            # no initdb: pg_autoctl clones the primary (pg_basebackup), our settings with it
            self._run([self.autoctl, "create", "postgres", *self._common(second), "--name",
                       second.name, "--dbname", DB, "--monitor", self.monitor_uri],
                      f"create postgres {second.name}", timeout=timeout)
        self._start_keeper(second, detach)
        self.wait_pair(timeout)
        return self

    def _fresh_port(self) -> int:
        """A free port picked just before its node is made: other processes on this machine
        pick free ports too, and one picked a while ago may be taken by now."""
        taken = {n.port for n in [self.state.monitor, *self.state.nodes]}
        while (port := free_port()) in taken:
            pass
        return port

    def _restart(self, timeout: float, detach: bool) -> "PgHa":
        """A pair made before (`up` after `down`): the monitor, then both keepers at once (a
        keeper will not start without its monitor; and a monitor that found one node back
        long before the other would, with its short timeouts, begin a failover)."""
        self._start_keeper(self.state.monitor, detach)
        self._wait(self._monitor_up, timeout, "the pg_auto_failover monitor")
        for node in self.state.nodes:
            self._start_keeper(node, detach)
        self.wait_pair(timeout)
        return self

    def _accepting(self, node: PgNode) -> bool:
        return subprocess.run(self._as_user([f"{self.bindir}/pg_isready", "-q", "-h", "127.0.0.1",
                                             "-p", str(node.port)]),
                              env=self._env()).returncode == 0

    def _created(self, node: PgNode) -> bool:
        return (self.data / "config" / "pg_autoctl" / str(self.pgdata(node)).lstrip("/")
                / "pg_autoctl.cfg").exists()

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise BrokerError(f"pg_autoctl {name} exited ({proc.returncode}): see "
                                      f"{self.data / (name + '.log')}")
            if time.monotonic() > deadline:
                raise BrokerError(f"timed out after {timeout:.0f}s waiting for {what} "
                                  f"(logs in {self.data})")
            time.sleep(0.3)

    def _monitor_up(self) -> bool:
        return self._accepting(self.state.monitor)

    def states(self) -> dict[str, tuple[str, str]]:
        """node name -> (reported state, assigned state), as the monitor sees them now."""
        try:
            out = subprocess.run(
                self._as_user([f"{self.bindir}/psql", "-qtAX", "-h", "127.0.0.1", "-p",
                               str(self.state.monitor.port), "-U", "autoctl_node", "-d",
                               "pg_auto_failover", "-F", "|", "-c",
                               "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node"]),
                env=self._env(), capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return {}
        rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 2]
        return {n: (r, g) for n, r, g in rows}

    def pair_ready(self) -> bool:
        """One primary and one secondary, as reported and assigned, both accepting connections
        (after a restart the monitor still holds the states reported before the stop)."""
        s = set(self.states().values())
        return (("primary", "primary") in s and ("secondary", "secondary") in s
                and all(self._accepting(n) for n in self.state.nodes))

    def wait_pair(self, timeout: float = 120.0) -> None:
        """Until one node is primary and the other a streaming secondary, both as assigned."""
        self._wait(self.pair_ready, timeout, "a primary and a secondary")

    def primary(self) -> PgNode:
        """The node the monitor says takes writes now (wait_primary: its standby is gone, so
        it commits alone until one is back)."""
        for name, (rep, goal) in self.states().items():
            if rep == goal and rep in ("primary", "wait_primary", "single"):
                return self.node(name)
        raise BrokerError("no primary right now (pg_autoctl show state)")

    # -- faults and stopping -------------------------------------------------------------------
    def postmaster_pid(self, node: PgNode) -> int:
        """The node's postgres (postmaster) pid from its postmaster.pid, 0 when not running."""
        try:
            return int((self.pgdata(node) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def kill_node(self, name: str) -> None:
        """kill -9 of the node's keeper, its sub-processes and its postgres: the machine is
        gone, as far as the monitor can tell (kill only postgres and the keeper's postgres
        controller starts it again in place, within a second)."""
        node = self.node(name)
        keeper = node.pid if node.pid and self._ours(node) else 0
        pm = self.postmaster_pid(node)
        pids = [keeper, *_descendants(keeper), pm if pm and self._ours(node, pm) else 0]
        pids = [p for p in pids if p]
        for pid in dict.fromkeys(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self.procs.get(name)
        if proc is not None:
            proc.wait(5)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart_node(self, name: str, *, detach: bool = False) -> None:
        """Start a killed node's keeper again: it rejoins as a standby (pg_rewind if needed)."""
        self._start_keeper(self.node(name), detach)

    def _ours(self, node: PgNode, pid: int | None = None) -> bool:
        """Is this pid still a process working on this node's data folder?"""
        try:
            cmd = Path(f"/proc/{pid or node.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.pgdata(node)).encode() in cmd

    def stop(self, *, purge: bool = False) -> int:
        """Stop every keeper (the monitor first, so that it never fails over a node that is
        only stopping; then the standby, the primary); -> how many ran. purge: the data
        folder goes too."""
        ran = 0
        try:
            primary = self.primary().name
        except BrokerError:
            primary = ""
        nodes = sorted(self.state.nodes, key=lambda n: n.name == primary)
        for node in [self.state.monitor, *nodes]:
            if not (node.pid and self._ours(node)):
                continue
            ran += 1
            proc = self.procs.get(node.name)
            if proc is not None:
                stop_process(proc, timeout=30)
            else:
                stop_pid(node.pid, lambda n=node: self._ours(n), timeout=30, poll_s=0.1)
            # a keeper killed earlier may have left its postgres behind
        for node in [*self.state.nodes, self.state.monitor]:
            pm = self.postmaster_pid(node)
            if pm and self._ours(node, pm):
                os.kill(pm, signal.SIGQUIT)
        if purge:
            shutil.rmtree(self.data, ignore_errors=True)
            (self.folder / STATE).unlink(missing_ok=True)
        return ran

    def __enter__(self) -> "PgHa":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(purge=True)


def _descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc), children first."""
    if not pid:
        return []
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def up(folder: str | Path) -> PgHa:
    """`ccus cluster up --pg`: start (detached) the folder's monitor and pair, or fail on a
    running one."""
    ha = PgHa(folder)
    running = [n.name for n in [ha.state.monitor, *ha.state.nodes] if n.pid and ha._ours(n)]
    if running:
        raise BrokerError(f"{folder}: {', '.join(running)} running already "
                          f"(ccus cluster down --dir {folder})")
    return ha.start(detach=True)


def down(folder: str | Path) -> int | None:
    """`ccus cluster down`: stop what `up` started in the folder; None: nothing was."""
    if not (Path(folder) / STATE).exists():
        return None
    return PgHa(folder).stop()
