"""The documented path as a test: docs/operations.md's blocks marked
`<!-- deploy-test: step NAME -->` run as written (only documented placeholders substituted) in
a temp root: the real cloud and site brokers from their bundles (the site bridged to the cloud),
the site in the sink's registry, `ccus sink run` on SQLite with sink.env's TLS flags, a signed
list over TLS, agents from their generated agent.toml on the site broker under a Restart=always
supervisor, a signed config push (acked, exit 3, restarted), taps on emulated cards, two SIGKILL
"reboots", a SIGKILL of the sink mid-taps, the store moved to PostgreSQL, more taps; every tap
stored exactly once, backlogs 0, the fleet view clean, the work history as expected."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cbor2
import psycopg
import pytest
from doc_blocks import doc_steps, run_block

from broker.launcher import find_mosquitto, free_port
from broker.procs import stop_process, wait_until
from edge.clock import SystemClock
from ops.mqttc import BrokerOpts, snapshot
from protocol import topics
from protocol.timequality import TimeQuality
from sim.nfc_card import free_udp_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SITE = "12345678901234"
AGENTS = ("gate-01", "gate-02", "vend-01", "train-01")
T0 = time.monotonic()


def say(step: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {step}", flush=True)


def restart_sec(unit: str) -> float:
    """RestartSec of deploy/systemd/UNIT, which must say Restart=always."""
    text = (REPO / "deploy/systemd" / unit).read_text()
    assert re.search(r"^Restart=always$", text, re.M), unit
    return float(re.search(r"^RestartSec=(\d+)$", text, re.M).group(1))


class Supervisor:
    """systemd's Restart=always: starts the command again whenever it exits, RestartSec (of
    the project's unit file) later."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path,
                 unit: str) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.restart_s = restart_sec(unit)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.exits: list[int] = []  # each exit status (-9: SIGKILL), in order
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping:
            with self.log.open("a") as out:
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out)
                self.starts += 1
                self.exits.append(self.proc.wait())
            if not self.stopping:
                time.sleep(self.restart_s)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None:
            stop_process(self.proc)
        self.thread.join(10)


def rebase(toml: str, root: Path, port: int, reader_port: int, serial: str) -> str:
    toml = toml.replace("/etc/ccus-touch", str(root / "etc/ccus-touch"))
    toml = toml.replace("/var/lib/ccus-touch", str(root / "var/lib/ccus-touch"))
    toml = toml.replace("port = 8883", f"port = {port}")
    toml = toml.replace('serial = "/dev/ttyACM0"', f'serial = "{serial}"')
    return toml.replace('path = "usb"', f'path = "udp:127.0.0.1:{reader_port}"\ntargets = ["212F"]')


def start_broker(inst: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([find_mosquitto(), "-c", str(inst / "mosquitto.conf")],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_until(lambda: _listening(port), 15, f"mosquitto on :{port}", poll_s=0.1)
    return proc


def host_opts(inst: Path, root: Path, name: str, port: int) -> str:
    """The host options of `broker-config` for a broker living in the temp root."""
    return (f" --install-dir {inst} --user {getpass.getuser()}"
            f" --data-dir {root}/var/lib/mosquitto-{name}"
            f" --log-dest 'file {root}/var/log/mosquitto/{name}.log'"
            f" --listener '{port} 127.0.0.1'")


@pytest.mark.e2e
def test_documented_deployment(tmp_path: Path, pg_url: str) -> None:
    if not Path(find_mosquitto()).exists():
        pytest.skip("no mosquitto")
    steps = doc_steps("deploy-test")
    assert {"pki", "site-add", "site-bundle", "cloud-bundle", "sites-import", "list-publish",
            "config-push", "store-move"} <= set(steps)
    root, op = tmp_path / "root", tmp_path / "operator"
    op.mkdir(parents=True)
    port, site_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    block_env = {**env, "SITE": SITE}  # the operator's shell: $SITE from step 1
    inst = root / "etc/mosquitto/ccus"                # the cloud broker host
    site_inst = root / "site-gw/etc/mosquitto/ccus"   # the site broker (the site's gateway)
    subs = {"broker.example.jp:8883": f"localhost:{port}", "broker.example.jp": "localhost",
            "site-gw.local": "localhost",
            "--place cloud --pki pki --out cloud-bundle":
            "--place cloud --pki pki --out cloud-bundle" + host_opts(inst, root, "cloud", port),
            "--out site-$SITE": "--out site-$SITE" + host_opts(site_inst, root, "site", site_port),
            "/var/lib/ccus-sink": str(root / "var/lib/ccus-sink"),
            "postgresql://ccus@/ccus": pg_url}
    for d in ("var/lib/mosquitto-cloud", "var/lib/mosquitto-site", "var/log/mosquitto",
              "var/lib/ccus-sink"):
        (root / d).mkdir(parents=True)
    store = root / "var/lib/ccus-sink/store.sqlite"

    say("step pki (ca init, server, identities, keygen, cloud bundle)")
    run_block(steps["pki"], op, subs, block_env)
    say("step site-add (2 gates, vending, training)")
    run_block(steps["site-add"], op, subs, block_env)
    say("step site-bundle (the site broker, bridged to the cloud)")
    run_block(steps["site-bundle"], op, subs, block_env)
    say("step cloud-bundle (ACL + dynsec naming the new devices and the bridge)")
    run_block(steps["cloud-bundle"], op, subs, block_env)
    shutil.copytree(op / "cloud-bundle", inst)
    shutil.copytree(op / f"site-{SITE}", site_inst)
    say(f"cloud broker: mosquitto -c {inst}/mosquitto.conf on :{port}")
    brokers = [start_broker(inst, port, tmp_path / "mosquitto-cloud.out")]
    procs: list[Supervisor] = []
    board: subprocess.Popen | None = None
    pki = op / "pki"
    try:
        say(f"site broker: mosquitto -c {site_inst}/mosquitto.conf on :{site_port}")
        brokers.append(start_broker(site_inst, site_port, tmp_path / "mosquitto-site.out"))
        say("step sites-import (the site in the sink's registry)")
        run_block(steps["sites-import"], op, subs, block_env)
        # the sink, with the TLS flags of deploy/etc/ccus-touch/sink.env, on SQLite
        sink_etc = root / "sink/etc/ccus-touch"
        sink_etc.mkdir(parents=True)
        shutil.copy(pki / "ca.crt", sink_etc / "ca.crt")
        for f in ("sink.crt", "sink.key"):
            shutil.copy(pki / "sinks/sink-1" / f, sink_etc / f)
        envfile = (REPO / "deploy/etc/ccus-touch/sink.env").read_text()
        env_args = shlex.split(re.search(r"^CCUS_SINK_ARGS=(.*)$", envfile, re.M).group(1))

        def sink_args(db: str) -> list[str]:
            # the metrics port (default 127.0.0.1:9464) is a free one: others run beside us
            return [db if a.startswith("postgresql://") else
                    a.replace("/etc/ccus-touch", str(sink_etc))
                    .replace("broker.example.jp:8883", f"localhost:{port}")
                    for a in env_args] + ["--metrics", f"127.0.0.1:{free_port()}"]
        args = sink_args(str(store))
        say("sink: ccus sink run " + " ".join(args))
        sink_log = tmp_path / "sink.log"
        sink = Supervisor("sink", [str(BIN / "ccus"), "sink", "run", *args], env, sink_log,
                          "ccus-sink.service")
        procs.append(sink)
        # the list: three technicians, their FeliCa IDm as the card
        techs = {f"1000000000000{i}": f"01020304050607{i:02x}" for i in (1, 2, 3)}
        (op / "techs.csv").write_text("tid,status,level,cards\n" + "".join(
            f"{t},active,1,{c}\n" for t, c in techs.items()))
        say("step list-publish (signed list over TLS)")
        run_block(steps["list-publish"], op, subs, block_env)
        keys = root / "keys"
        keys.mkdir()
        shutil.copy(op / "alice-signing.key.pub", keys / "alice.pub")
        say("vending board: ccus board simulate --kind vending")
        board_log = tmp_path / "board.log"
        board = subprocess.Popen([str(BIN / "ccus"), "board", "simulate", "--kind", "vending"],
                                 env=env, stdin=subprocess.PIPE, stdout=board_log.open("w"),
                                 stderr=subprocess.STDOUT)
        wait_until(lambda: re.search(r" on (/dev/\S+):", board_log.read_text()), 30,
                   "the simulated board's pty", poll_s=0.2)
        pty = re.search(r" on (/dev/\S+):", board_log.read_text()).group(1)
        ports = {}
        agents: dict[str, Supervisor] = {}
        for dev in AGENTS:
            files = pki / "sites" / SITE / "devices" / dev
            droot = root / dev
            etc = droot / "etc/ccus-touch"
            etc.mkdir(parents=True)
            (droot / "var/lib/ccus-touch").mkdir(parents=True)
            for f in ("ca.crt", "device.crt", "device.key"):
                shutil.copy(files / f, etc / f)
            ports[dev] = free_udp_port()
            (etc / "agent.toml").write_text(
                rebase((files / "agent.toml").read_text(), droot, site_port, ports[dev], pty))
            say(f"agent {dev} from its generated agent.toml (site broker :{site_port}, "
                f"reader udp:{ports[dev]})")
            agents[dev] = Supervisor(dev, [str(BIN / "ccus"), "agent", "--config",
                                           str(etc / "agent.toml")],
                                     {**env, "CCUS_KEYS_DIR": str(keys)},
                                     tmp_path / f"{dev}.log", "ccus-agent.service")
            procs.append(agents[dev])

        fleet_cmd = [str(BIN / "ccus"), "ops", "devices", "--site", SITE, "--broker",
                     f"localhost:{port}", "--ca", str(pki / "ca.crt"), "--cert",
                     str(pki / "operators/alice/operator.crt"), "--key",
                     str(pki / "operators/alice/operator.key"), "--json", "--cache",
                     str(tmp_path / "fleet-cache.json")]   # as the operator's own cache

        def fleet() -> dict[str, dict]:
            """`ccus ops devices` at the cloud broker: what the bridge carried up."""
            run = subprocess.run(fleet_cmd, env=env, capture_output=True, text=True, timeout=30)
            return {r["dev"]: r for r in json.loads(run.stdout or "[]") if r["dev"] in AGENTS}

        def fleet_is(cond, what: str) -> bool:
            rows = fleet()
            say(f"fleet ({what}): " + str([(d, r["online"], r["lv"], r["cv"], r["backlog"],
                                           r["problems"]) for d, r in sorted(rows.items())]))
            return len(rows) == len(AGENTS) and all(cond(r) for r in rows.values())

        say("ccus ops devices: every agent online (through the bridge) with list v1")
        wait_until(lambda: fleet_is(lambda r: r["online"] and r["lv"] == 1, "online, list"),
                   90, "every agent online with the list", poll_s=2)

        say("step config-push (a signed site overlay; every device acks, restarts: exit 3)")
        out = json.loads(run_block(steps["config-push"], op, subs, block_env))
        version = out["version"]
        assert out["missing"] == [] and {d: a["result"] for d, a in out["acks"].items()} == \
            dict.fromkeys(AGENTS, "applied"), out
        acks = snapshot(BrokerOpts("localhost", port, str(pki / "ca.crt"),
                                   str(pki / "operators/alice/operator.crt"),
                                   str(pki / "operators/alice/operator.key")),
                        topics.config_ack(SITE, "+"))
        retained = {topics.parse_config_ack(t)[1]: cbor2.loads(b) for t, b in acks.items()}
        say(f"retained config/ack: {[(d, a['version'], a['result']) for d, a in retained.items()]}")
        assert {d: (a["version"], a["result"]) for d, a in retained.items()} == dict.fromkeys(
            AGENTS, (version, "applied"))
        wait_until(lambda: all(3 in a.exits for a in agents.values()), 30,
                   "every agent exited 3 to restart", poll_s=0.5)

        def back(since_ms: int, what: str) -> None:
            """Every agent online again in a state sent after `since_ms`, its reader ok; while
            one is down (its last will retained) the view keeps its versions and last-seen."""
            def up(r: dict) -> bool:
                if not r["online"]:
                    assert r["cv"] == version and r["lv"] == 1 and r["last_seen_ms"], r
                    assert "never seen" not in r["problems"], r
                return r["online"] and r["cv"] == version and (
                    r["last_seen_ms"] or 0) >= since_ms and bool(r["readers"]) and set(
                    r["readers"].values()) == {"ok"}
            wait_until(lambda: fleet_is(up, what), 90, what, poll_s=1)
        back(int(time.time() * 1000), f"back with config v{version}")
        say("exits: " + str({a.name: a.exits for a in agents.values()}))

        missed: list[str] = []

        def taps(dev: str, n: int, idm: str, tid: str) -> None:
            run = subprocess.run([str(BIN / "ccus"), "card", "emulate", "felica", "--port",
                                  str(ports[dev]), "--id", idm, "--tid", tid, "--taps", str(n),
                                  "--interval", "2.5"], env=env, capture_output=True,
                                 text=True, timeout=90)
            assert run.returncode == 0, run.stderr
            if run.stdout.count("read by the reader") != n:  # its reader is up: it must read
                missed.append(f"{dev}: {run.stdout.strip()}")

        expected: dict[str, int] = dict.fromkeys(AGENTS, 0)
        gate_taps: dict[str, int] = dict.fromkeys(techs, 0)

        def tap_round(rnd: int, during=None) -> None:
            say(f"round {rnd}: taps on every reader")
            ths = []
            tid, idm = list(techs.items())[rnd % 3]
            for dev in AGENTS:
                n = 1 if dev == "vend-01" else 2  # one vend a round: limit 1 a day, then denials
                ths.append(threading.Thread(target=taps, args=(dev, n, idm, tid)))
                expected[dev] += n
                gate_taps[tid] += n if dev.startswith("gate-") else 0
            for th in ths:
                th.start()
            if during is not None:
                during()
            for th in ths:
                th.join()
            assert not missed, missed

        def kill_sink() -> None:
            time.sleep(1.5)  # mid-round: the taps go on while it is down
            say("SIGKILL the sink mid-taps (Restart=always brings it back)")
            sink.kill()

        for rnd in range(3):
            tap_round(rnd, kill_sink if rnd == 1 else None)
            if rnd < 2:
                time.sleep(2)  # a vend (pulse, can past the sensor) ends before the power cut
                say(f"reboot {rnd + 1}: SIGKILL every agent")
                cut = int(time.time() * 1000)
                for a in agents.values():
                    a.kill()
                back(cut, f"back after reboot {rnd + 1}")

        def stored(db) -> dict[str, int]:
            return dict(db.execute("SELECT device, count(*) FROM touches GROUP BY device"
                                   ).fetchall())

        def in_sqlite() -> dict[str, int]:
            with sqlite3.connect(store) as db:
                return stored(db)
        say("waiting for every tap in the SQLite store")
        try:
            wait_until(lambda: in_sqlite() == expected, 90, "every tap stored", poll_s=0.5)
        finally:
            say(f"stored {in_sqlite()} expected {expected}")
        assert all(a.exits.count(-signal.SIGKILL) >= 2 for a in agents.values())
        assert -signal.SIGKILL in sink.exits and sink.starts >= 2, sink.exits

        say("stop the sink; step store-move (export SQLite, import into PostgreSQL)")
        sink.stop()
        run_block(steps["store-move"], op, subs, block_env)
        with psycopg.connect(pg_url) as db:
            assert stored(db) == in_sqlite()
        args = sink_args(pg_url)
        say("sink on PostgreSQL: ccus sink run " + " ".join(args))
        pg_log = tmp_path / "sink-pg.log"
        sink = Supervisor("sink-pg", [str(BIN / "ccus"), "sink", "run", *args], env, pg_log,
                          "ccus-sink.service")
        procs.append(sink)
        tap_round(3)

        def in_pg() -> dict[str, int]:
            with psycopg.connect(pg_url) as db:
                return stored(db)
        say("waiting for every tap in PostgreSQL")
        try:
            wait_until(lambda: in_pg() == expected, 90, "every tap in PostgreSQL", poll_s=0.5)
        finally:
            say(f"stored {in_pg()} expected {expected}")
        with psycopg.connect(pg_url) as db:  # exactly once: seqs 1..n, none twice
            seqs = {d: (lo, hi, n, k) for d, lo, hi, n, k in db.execute(
                "SELECT device, min(seq), max(seq), count(*), count(DISTINCT seq) FROM touches"
                " GROUP BY device")}
        assert seqs == {d: (1, n, n, n) for d, n in expected.items()}, seqs

        # this host's own clock: an unsynchronized one (a CI container) is a true finding, and
        # `clock never_synced` is then the one problem allowed; nothing else ever is
        allowed = set() if SystemClock().quality() is TimeQuality.SYNCED else {
            "clock never_synced"}
        say(f"ccus ops devices: online, backlogs at zero, no problems (allowed: {allowed})")
        wait_until(lambda: fleet_is(lambda r: r["online"] and r["backlog"] == 0 and r["cv"] ==
                                    version and not set(r["problems"]) - allowed, "clean"),
                   90, "backlogs at zero, fleet clean", poll_s=2)
        for log in (sink_log, pg_log):  # the site is registered (step sites-import)
            assert "not in the site registry" not in log.read_text(), log
        for log in tmp_path.glob("*.log"):  # every fault on the way was an expected one
            assert "Traceback" not in log.read_text(), log

        month = time.strftime("%Y-%m", time.gmtime(time.time() + 9 * 3600))  # JST

        def report(name: str, *opts: str) -> list[dict[str, str]]:
            say(f"ccus report {name} {' '.join(opts)} (PostgreSQL)")
            rep = subprocess.run([str(BIN / "ccus"), "report", name, "--db", pg_url,
                                  "--month", month, *opts, "--format", "csv"], env=env,
                                 capture_output=True, text=True, timeout=30)
            assert rep.returncode == 0, rep.stderr
            print(rep.stdout, end="")
            return list(csv.DictReader(io.StringIO(rep.stdout)))

        rows = {r["technician"]: r for r in report("work-history", "--site", SITE)}
        assert set(rows) == set(techs)
        for tid in techs:  # every technician entered at gate-01 and left at gate-02
            row = rows[tid]
            say(f"work-history {tid}: entry {row['entry']} exit {row['exit']} taps {row['taps']}")
            assert (row["entry_missing"], row["exit_missing"], row["taps"]) == (
                "false", "false", str(gate_taps[tid]))
        assert {r["technician"]: r["days"] for r in report("days-worked", "--site", SITE)} == \
            dict.fromkeys(techs, "1")
        # one free drink a day each: rounds 0-2 dispensed (techs 1, 2, 3), round 3 denied
        # (tech 1 again); the pushed overlay named the contractor who pays
        assert [(r["contractor"], r["site"], r["machine"], r["dispensed"], r["failed"],
                 r["indeterminate"]) for r in report("vending", "--machines")] == [
            ("20000000000001", SITE, "vend-01", "3", "0", "0")]
        total = [r for r in report("training-monthly", "--site", SITE) if r["month"] == "total"]
        assert [(r["persons"], r["touches"]) for r in total] == [
            ("3", str(expected["train-01"]))]
        say("done")
    finally:
        for p in reversed(procs):
            p.stop()
        if board is not None:
            stop_process(board)
        for b in reversed(brokers):
            stop_process(b)


def _listening(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.e2e
def test_journal_sample() -> None:
    """scripts/journal-sample.py: a real agent under JOURNAL_STREAM, its broker killed and back
    ~5 s later; what `journalctl -u ccus-agent -p warning` would show (docs/operations.md,
    "Troubleshooting"). Every line had a <N> prefix (exit 0), the outage is one warning with
    its cause and next attempt, the recovery another."""
    if not Path(find_mosquitto()).exists():
        pytest.skip("no mosquitto")
    run = subprocess.run([sys.executable, str(REPO / "scripts/journal-sample.py")],
                         capture_output=True, text=True, timeout=180)
    print(run.stdout)
    assert run.returncode == 0, run.stderr
    head, *lines = run.stdout.splitlines()
    assert head == "$ journalctl -u ccus-agent -p warning"
    shape = re.compile(r"^\w{3} \d\d \d\d:\d\d:\d\d \S+ ccus-agent\[\d+\]: [\w.]+: ")
    assert lines and all(shape.match(x) for x in lines), lines
    down = [x for x in lines if re.search(r"mqtt: (connection to \S+ lost|cannot connect to)"
                                          r".*; next attempt in ", x)]
    back = [x for x in lines if re.search(r"mqtt: connected to \S+ again after [\d.]+ s down", x)]
    assert down and back and lines.index(down[0]) < lines.index(back[-1]), lines
    assert "Traceback" not in run.stdout
