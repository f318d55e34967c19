"""A local 3-node NATS cluster with JetStream and the MQTT gateway, on free loopback ports.

Rules of this file:

- The cloud tier's opt-in layout (docs/operations.md "National layout"): the single-machine
  default (one Mosquitto, broker/launcher.py) is not touched by anything here.
- One folder holds everything: a config, a log and a JetStream store per node, and
  ``cluster.json`` (names, ports, pids, the nats-server binary and mode the last start chose),
  so ``ccus cluster down --dir DIR`` from another process finds what ``ccus cluster up --dir
  DIR`` started, and a node started again runs the same binary. A pid is signalled only while
  /proc says it is still a nats-server on that node's config (a reused pid is left alone).
- Nodes are Debian's ``nats-server`` (2.9 here); a newer build is used when ``CCUS_NATS_SERVER``
  names it. Never the system one's ports: every port is a free loopback one. The nodes share
  one machine, so each runs with GOMAXPROCS its share of the CPUs (``node_env``).
- ``secure``: a folder made by ``ccus ops nats-auth`` (ca.crt, server.crt/.key, route.crt/.key,
  auth.conf, pinned.conf; broker/ knows only those file names): every listener then speaks TLS
  only, verifies the peer's certificate against ca.crt and maps it to a user of auth.conf
  (``verify_and_map``). /healthz stays plain HTTP on loopback (NATS never verifies there).
  NATS 2.9 cannot reload anything of the ``mqtt`` block (a changed one fails the whole
  reload, users included), so the MQTT listener pins the certificates of a copy of
  pinned.conf taken when the node starts (``mqtt-pinned.conf`` in its folder): ``reload``
  (SIGHUP) applies users and the native listener's pins, ``restart_node`` one by one (the
  cluster stays up) the MQTT listener's pins.
- The auth callout: a secure bundle with callout.conf on a nats-server of CALLOUT_SINCE or
  later runs the client and MQTT listeners with ``verify`` (not ``verify_and_map``), includes
  callout.conf instead of auth.conf, and starts one broker/nats_callout.py per node (pid in
  ``cluster.json``, log ``nN/callout.log``) before anyone may log in; ``stop`` ends them after
  the nodes. Debian's 2.9 keeps the mapping: the same bundle works on both.
- Streams are not created here: the sink creates the touch stream it consumes (it knows the
  topic tree; broker/ imports nothing of ours). Touches published before that are replayed by
  the devices, which forget a touch only on the end-to-end acknowledgement.
"""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.launcher import TEMPLATES, BrokerError, free_port
from broker.nats_callout import CONF as CALLOUT_CONF
from broker.procs import cmdline_has, poll_until, stop_pid, stop_process

SEARCH = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")
STATE = "cluster.json"
NODES = 3
# How long a start may take until every node answers /healthz. A fresh folder needs one Raft
# election per group (meta, then each stream): a few seconds. A folder with JetStream state
# (`cluster up` again, a node restarted) makes every group elect again from its old term;
# NATS 2.9's election timeouts are 4-9 s and a split vote starts another round, so the slowest
# group took 4-25 s here (40 restarts of one folder, idle and with two CPU burners) and more
# than 30 s once in CI.
START_S = 30.0
RESTART_S = 120.0


def find_nats_server() -> str:
    path = (os.environ.get("CCUS_NATS_SERVER") or shutil.which("nats-server")
            or next((p for p in SEARCH if Path(p).exists()), None))
    if not path:
        raise BrokerError("nats-server is not installed: 'sudo apt-get install nats-server' "
                          "(or set CCUS_NATS_SERVER to a nats-server binary)")
    return path


CALLOUT_SINCE = (2, 10)   # NATS's auth callout (and its MQTT client id) came with 2.10


def node_env(environ: dict[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """The environment a node runs in: the caller's, and GOMAXPROCS its share of this machine's
    CPUs (at least 1) unless the caller set one. Go gives each process one thread per CPU, so
    three nodes on one 2-CPU box ran six, spinning for work against each other, the sink and
    the store: with one each, freshness p99 was 29-67 ms (median 51) against 39-108 ms
    (median 63) in 9 and 10 alternating runs of bench/bench_freshness.py --paths cluster. A
    node on its own machine (production) is not started here."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("GOMAXPROCS"):
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["GOMAXPROCS"] = str(max(1, cpus // NODES))
    return env


def server_version(path: str) -> tuple[int, ...]:
    """`nats-server --version` as a tuple ((0,) when it says nothing readable)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except OSError:
        return (0,)
    digits = out.strip().rsplit("v", 1)[-1].split("-")[0].split(".")
    return tuple(int(d) for d in digits if d.isdigit()) or (0,)


@dataclass
class Node:
    name: str
    client_port: int
    route_port: int
    mqtt_port: int
    http_port: int
    pid: int = 0
    callout_pid: int = 0      # its auth callout service (a secure cluster on NATS >= 2.10)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


MQTT_PINNED = "mqtt-pinned.conf"  # the node's start-time copy of the bundle's pinned.conf
ROUTE_USER = "urn:ccus:route"   # the SAN URI of every route certificate (ops/pki.py issue_route)


def _tls_block(indent: str, cert: Path, key: Path, ca: Path, pinned: Path | None,
               verify: str = "verify_and_map") -> str:
    # the peer's certificate must be from our CA and name a user (or the route user); with
    # the auth callout ("verify") the callout maps it, from the chain NATS verified
    lines = ["tls {", f'    cert_file: "{cert}"', f'    key_file: "{key}"', f'    ca_file: "{ca}"',
             f"    {verify}: true", "    timeout: 2"]
    if pinned is not None:  # revocation: only certificates listed there (NATS 2.9 has no CRL)
        lines.append(f'    include "{pinned}"')
    return "".join(f"{indent}{ln}\n" for ln in [*lines, "}"])


def secure_blocks(secure: Path | None, conf_dir: Path, callout: bool = False) -> dict[str, str]:
    """The TLS and authorization parts of a node's config ('' each without `secure`); with
    `callout`, clients are verified (not mapped) and callout.conf is the authorization.

    nats-server resolves `include` against the config file's folder, absolute paths too: so
    included files are named relative to `conf_dir`."""
    if secure is None:
        return {"client_tls": "", "route_tls": "", "mqtt_tls": "", "auth": ""}
    rel = Path(os.path.relpath(secure.resolve(), conf_dir.resolve()))
    ca, pinned = secure / "ca.crt", rel / "pinned.conf"
    server = (secure / "server.crt", secure / "server.key")
    route = _tls_block("    ", secure / "route.crt", secure / "route.key", ca, None)
    # a route is let in only with a route certificate: verify_and_map against this one user
    route += f'    authorization {{\n        user: "{ROUTE_USER}"\n    }}\n'
    verify = "verify" if callout else "verify_and_map"
    return {"client_tls": _tls_block("", *server, ca, pinned, verify),
            "route_tls": route,
            "mqtt_tls": _tls_block("    ", *server, ca, Path(MQTT_PINNED), verify),
            "auth": f'include "{rel / (CALLOUT_CONF if callout else "auth.conf")}"\n'}


def render_node(node: Node, peers: list[Node], folder: Path, secure: Path | None = None,
                callout: bool = False) -> str:
    """The config text of one node (pure but for reading the template)."""
    routes = ",\n".join(f"        nats-route://127.0.0.1:{p.route_port}" for p in peers
                        if p.name != node.name)
    text = (TEMPLATES / "nats-node.conf").read_text()
    return text.format(name=node.name, client_port=node.client_port, http_port=node.http_port,
                       route_port=node.route_port, mqtt_port=node.mqtt_port, routes=routes,
                       store_dir=folder / node.name / "js", log_file=folder / node.name / "nats.log",
                       **secure_blocks(secure, folder / node.name, callout))


def mqtt_hello(port: int, client_id: str, timeout: float = 20.0) -> bool:
    """One MQTT 3.1.1 CONNECT (clean session) to 127.0.0.1:port, then DISCONNECT: True once the
    CONNACK accepts it. Raw bytes: broker/ does not depend on paho."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128  # one-byte remaining length
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"\x10" + bytes([len(body)]) + body)
            ack = b""
            while len(ack) < 4:
                chunk = s.recv(4 - len(ack))
                if not chunk:
                    return False
                ack += chunk
            s.sendall(b"\xe0\x00")
            return ack[0] == 0x20 and ack[3] == 0
    except OSError:
        return False


def _distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class NatsCluster:
    """``with NatsCluster(folder) as c: c.urls, c.mqtt_ports; c.kill(1); c.start_node(1)``."""

    def __init__(self, folder: str | Path, nodes: int = NODES,
                 secure: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.secure = Path(secure).resolve() if secure else None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        state = self.folder / STATE
        saved: dict[str, object] = {}
        if state.exists():  # the same folder again: same ports, same JetStream data
            saved = json.loads(state.read_text())
            self.nodes = [Node(**n) for n in saved["nodes"]]  # type: ignore[attr-defined]
            if self.secure is None and saved.get("secure"):
                self.secure = Path(str(saved["secure"]))
        else:
            ports = _distinct_ports(4 * nodes)
            self.nodes = [Node(f"n{i + 1}", *ports[4 * i:4 * i + 4]) for i in range(nodes)]
        # what the last start() chose (cluster.json): a node started again later (`cluster
        # restart`, a fault test) runs that binary on those configs, whatever this process's
        # CCUS_NATS_SERVER says (a 2.9 refuses a callout config and exits)
        self.server = str(saved.get("server", ""))
        self.callout = bool(saved.get("callout", False))
        self.callout_procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def mqtt_ports(self) -> list[int]:
        return [n.mqtt_port for n in self.nodes]

    def conf_path(self, node: Node) -> Path:
        return self.folder / node.name / "nats.conf"

    def write_configs(self) -> None:
        for node in self.nodes:
            (self.folder / node.name / "js").mkdir(parents=True, exist_ok=True)
            self.conf_path(node).write_text(render_node(node, self.nodes, self.folder,
                                                        self.secure, self.callout))

    def _save(self) -> None:
        doc: dict[str, object] = {"nodes": [asdict(n) for n in self.nodes],
                                  "server": self.server, "callout": self.callout}
        if self.secure is not None:
            doc["secure"] = str(self.secure)
        (self.folder / STATE).write_text(json.dumps(doc, indent=1) + "\n")

    def has_state(self) -> bool:
        """Has a node of this folder run before (a JetStream store to recover)?"""
        return any(any((self.folder / n.name / "js").glob("*")) for n in self.nodes
                   if (self.folder / n.name / "js").is_dir())

    def start_timeout(self) -> float:
        return RESTART_S if self.has_state() else START_S

    def start(self, timeout: float | None = None, *, detach: bool = False) -> "NatsCluster":
        """Every node, then wait until each answers /healthz (JetStream current); `timeout`
        defaults to START_S, or RESTART_S when the folder has JetStream state."""
        timeout = timeout or self.start_timeout()
        # the binary, and so the mode, are chosen here: a secure bundle with the callout's files
        # on a server that has the auth callout binds the MQTT client id to the certificate
        self.server = find_nats_server()
        self.callout = (self.secure is not None and (self.secure / CALLOUT_CONF).exists()
                        and server_version(self.server) >= CALLOUT_SINCE)
        self.write_configs()
        for node in self.nodes:
            self.start_node(node.name, wait=False, detach=detach)
        if self.callout:
            for node in self.nodes:
                self.start_callout(node, detach=detach)
        self.wait_healthy(timeout)
        if self.callout:
            self.wait_callouts(timeout)
        if self.secure is None:  # a secure node's MQTT port wants TLS and a certificate
            self.warm_mqtt(timeout)
        return self

    def start_node(self, name: str, *, wait: bool = True, detach: bool = False,
                   timeout: float | None = None) -> None:
        node = self.node(name)
        if self.secure is not None:  # what the MQTT listener pins until the node's next start
            shutil.copyfile(self.secure / "pinned.conf", self.folder / name / MQTT_PINNED)
        # detach: `ccus cluster up` returns and the nodes keep running in their own session
        proc = subprocess.Popen([self.server or find_nats_server(), "-c", str(self.conf_path(node))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=detach, env=node_env())
        self.procs[name] = proc
        node.pid = proc.pid
        self._save()
        if wait:
            self.wait_healthy(timeout or self.start_timeout(), [node])

    def start_callout(self, node: Node, *, detach: bool = False) -> None:
        """The node's auth callout service (its own node first, then the others), its output in
        the node's callout.log."""
        assert self.secure is not None
        servers = [node.url] + [n.url for n in self.nodes if n.name != node.name]
        ready = self.folder / node.name / "callout.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "broker.nats_callout", "--bundle", str(self.secure),
                "--servers", ",".join(servers), "--ready-file", str(ready)]
        with open(self.folder / node.name / "callout.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=detach,
                                    cwd=Path(__file__).resolve().parents[1])
        self.callout_procs[node.name] = proc
        node.callout_pid = proc.pid
        self._save()

    def wait_callouts(self, timeout: float) -> None:
        """Until every node's callout answers (its ready file): before, a login would wait for
        an answer nobody gives and fail."""
        for node in self.nodes:
            ready = self.folder / node.name / "callout.ready"
            if not poll_until(ready.exists, timeout, 0.1):
                log = self.folder / node.name / "callout.log"
                tail = log.read_text()[-300:] if log.exists() else ""
                raise BrokerError(f"the auth callout of {node.name} did not answer within "
                                  f"{timeout:.0f}s (log {log}: {tail!r})")

    def _callout_ours(self, node: Node) -> bool:
        return bool(node.callout_pid) and cmdline_has(node.callout_pid, "broker.nats_callout",
                                                      str(self.secure))

    def warm_mqtt(self, timeout: float = 30.0, nodes: list[Node] | None = None) -> None:
        """One MQTT client on each node while all are up: a node makes its MQTT gateway's
        per-server JetStream state (a retained-messages consumer, R3) at its first MQTT client.
        Seen on 2.9.10: a node whose first MQTT client came after another node's kill -9 hung
        that client's CONNECT for good (a bridge failing over to it never got its CONNACK).

        A node's first CONNECTs may fail while it makes that state (connection closed, or no
        CONNACK, seen in CI 1 of ~40 fresh clusters on a loaded box): each node is asked again
        (a new connection, at most 10 s each) until `timeout` has passed for it."""
        for node in nodes or self.nodes:
            deadline = time.monotonic() + timeout
            tries = 0

            def hello(node: Node = node, deadline: float = deadline) -> bool:
                nonlocal tries
                tries += 1
                left = max(1.0, deadline - time.monotonic())
                return mqtt_hello(node.mqtt_port, f"ccus-warmup-{node.name}", min(10.0, left))

            if not poll_until(hello, timeout, 0.5):
                raise BrokerError(
                    f"nats-server {node.name}: its MQTT port {node.mqtt_port} did not accept "
                    f"a connection in {tries} tries within {timeout:.0f}s "
                    f"(log {self.folder / node.name / 'nats.log'}: {self._log_tail(node)!r})")

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise BrokerError(f"no node {name!r} in {self.folder / STATE}")

    def healthy(self, node: Node) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz",
                                        timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float, nodes: list[Node] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            while not self.healthy(node):
                proc = self.procs.get(node.name)
                if proc is not None and proc.poll() is not None:
                    raise BrokerError(f"nats-server {node.name} exited ({proc.returncode}): "
                                      f"{self._log_tail(node)}")
                if time.monotonic() > deadline:
                    raise BrokerError(f"nats-server {node.name} not healthy within {timeout:.0f}s "
                                      f"(log {self.folder / node.name / 'nats.log'})")
                time.sleep(0.1)

    def _log_tail(self, node: Node) -> str:
        try:
            return (self.folder / node.name / "nats.log").read_text()[-400:]
        except OSError:
            return ""

    def reload(self) -> None:
        """SIGHUP every running node: auth.conf and pinned.conf are read again; a user no
        longer listed is disconnected (NATS re-checks every client's authorization)."""
        for node in self.nodes:
            if node.pid and self._ours(node):
                os.kill(node.pid, signal.SIGHUP)

    def restart_node(self, name: str, timeout: float | None = None) -> None:
        """Stop one node (SIGTERM) and start it again on its config: its MQTT listener then
        pins the bundle's current pinned.conf. One at a time, the cluster keeps serving."""
        node = self.node(name)
        proc = self.procs.get(name)
        if proc is not None:
            stop_process(proc)
        else:
            stop_pid(node.pid, lambda: self._ours(node))
        self.start_node(name, timeout=timeout, detach=proc is None)

    def kill(self, name: str) -> None:
        """kill -9 one node: no clean shutdown, no leadership hand-over."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def _ours(self, node: Node) -> bool:
        """Is node.pid still the nats-server started on this node's config?"""
        return cmdline_has(node.pid, str(self.conf_path(node)))

    def stop(self) -> None:
        """SIGTERM every node (ours as children, or by the pids in cluster.json)."""
        for node in self.nodes:
            proc = self.procs.get(node.name)
            if proc is not None:
                stop_process(proc)
            elif node.pid and self._ours(node):
                os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in self.nodes:
            while node.pid and self._ours(node) and time.monotonic() < deadline:
                time.sleep(0.05)
            if node.pid and self._ours(node):
                os.kill(node.pid, signal.SIGKILL)
        for node in self.nodes:   # the callouts after the nodes: no login is left to answer
            callout = self.callout_procs.get(node.name)
            if callout is not None:
                stop_process(callout)
            elif self._callout_ours(node):
                stop_pid(node.callout_pid, functools.partial(self._callout_ours, node))

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def up(folder: str | Path, secure: str | Path | None = None) -> NatsCluster:
    """`ccus cluster up`: start (detached) the nodes of the folder, or fail on a running one."""
    if secure is not None:
        missing = [f for f in ("ca.crt", "server.crt", "server.key", "route.crt", "route.key",
                               "auth.conf", "pinned.conf") if not (Path(secure) / f).exists()]
        if missing:
            raise BrokerError(f"{secure}: no {', '.join(missing)}: make the folder with "
                              f"`ccus ops nats-auth --pki PKI --out {secure}`")
    c = NatsCluster(folder, secure=secure)
    running = [n.name for n in c.nodes if n.pid and c._ours(n)]
    if running:
        raise BrokerError(f"{folder}: nodes {', '.join(running)} are running already "
                          f"(ccus cluster down --dir {folder})")
    return c.start(detach=True)


def _running(folder: str | Path) -> NatsCluster:
    if not (Path(folder) / STATE).exists():
        raise BrokerError(f"{folder}: no {STATE} here (nothing started with ccus cluster up)")
    c = NatsCluster(folder)
    if not any(n.pid and c._ours(n) for n in c.nodes):
        raise BrokerError(f"{folder}: no node is running (ccus cluster up --dir {folder})")
    return c


def reload(folder: str | Path) -> int:
    """`ccus cluster reload`: SIGHUP every running node (users, native pins); how many."""
    c = _running(folder)
    n = sum(1 for node in c.nodes if node.pid and c._ours(node))
    c.reload()
    return n


def restart(folder: str | Path) -> int:
    """`ccus cluster restart`: one node after the other (each healthy before the next), so
    the MQTT listeners pin the bundle's current certificates; how many were restarted."""
    c = _running(folder)
    for node in c.nodes:
        c.restart_node(node.name)
    return len(c.nodes)


def down(folder: str | Path) -> int:
    """`ccus cluster down`: stop the nodes named in the folder's cluster.json; how many ran."""
    if not (Path(folder) / STATE).exists():
        raise BrokerError(f"{folder}: no {STATE} here (nothing started with ccus cluster up)")
    c = NatsCluster(folder)
    n = sum(1 for node in c.nodes if node.pid and c._ours(node))
    c.stop()
    return n
