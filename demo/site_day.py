"""`ccus demo`: a site day end to end on embedded defaults, with the production code paths.

A private Mosquitto, the sink as its own process writing SQLite, an emulated-card process
speaking nfcpy's udp wire protocol, a gate agent with two nfcpy readers (entry, exit) whose
controller board (relay per direction, door sensor) is the real firmware under the MicroPython
unix port on a pty, a vending machine with a board of its own (vend line + drop sensor), and a
second vending machine of the MDB kind: its board (the real firmware, MDB cashless reader) sits
on the machine's MDB bus, where sim/vmc.py plays the vending machine controller. Only the wall
clock is the
demo's: a ManualClock set to each tap's time, so a day takes seconds. Everything under it
(readers, decision, outbox, board link, MQTT, sink) is production code.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.launcher import PrivateBroker
from broker.procs import stop_process, wait_until
from cloud_sink.store import SqliteStore
from cloud_sink.workday import jst_ms, local_time
from edge.agent import Agent
from edge.clock import ManualClock
from edge.config import AgentConfig, load
from edge.idlist import Entry, Status
from edge.roles.gate import GateRole
from edge.signing import generate_key
from firmware import mdb
from ops.list_publish import publish_list
from protocol.touch import Touch
from sim.agent_config import card_of, tid_of, write_idlist_csv
from sim.board import DOOR, DROP, GATE, GATE_OUT, VEND_PIN, BoardProcess
from sim.cards import EmulatedCard, felica_card
from sim.nfc_card import free_udp_port
from sim.vmc import PtyWire, Vmc
from vending.role import VendingRole

SITE = "13100000000001"   # a 14-digit site ID (現場ID)
DEVICE = "gate-01"
VEND_DEVICE = "vend-01"
MDB_DEVICE = "vend-02"  # the MDB vending machine: the board is its cashless reader
MDB_ITEM, MDB_PRICE = 11, 130  # what every technician picks there (yen; the ceiling is 150)
CONTRACTOR = "20000000000001"  # the main contractor (元請) who pays for the drinks: 事業者ID
DAY = (2026, 11, 26)
LIST_NAME = "ccus-demo"
READERS = {"entry": DEVICE, "exit": DEVICE, "vend": VEND_DEVICE, "mdb": MDB_DEVICE}  # -> device
PASSAGE_TIMEOUT_S = 8
RELAY_PIN = {"entry": GATE, "exit": GATE_OUT}  # the gate board's relay line per reader


@dataclass(frozen=True)
class Tap:
    at_ms: int
    reader: str          # "entry" | "exit" | "vend" | "mdb"
    card: EmulatedCard
    note: str = ""
    passes: bool = True  # at a gate: walks through once it opens


@dataclass
class SiteDay:
    technicians: list[Entry]
    taps: list[Tap]


def site_day(n: int = 12) -> SiteDay:
    """Twelve technicians in and out; one unknown card; one double tap; one forgotten exit;
    one allowed at the gate who turns back and taps again a minute later; five take their free
    drink at lunch, and one comes back for a second; two more pick a drink at the MDB machine,
    and one of them comes back there too."""
    y, m, d = DAY
    techs = [Entry(tid_of(i), Status.ACTIVE, level=1 + i % 4, cards=(card_of(i).ident,))
             for i in range(1, n + 1)]
    taps: list[Tap] = []
    for i in range(1, n + 1):
        at = jst_ms(y, m, d, 7, 30 + 2 * i)
        taps.append(Tap(at, "entry", card_of(i)))
        if i == 3:  # tapped twice within a second: one touch
            taps.append(Tap(at + 600, "entry", card_of(i), "repeat tap within a second"))
        if i == 6:
            stranger = felica_card(bytes.fromhex("0139AB0000C0FFEE"))
            taps.append(Tap(at + 60_000, "entry", stranger, "unknown card"))
        if i == 7:  # the gate opens, they turn back for a helmet: not_passed, no entry
            taps[-1] = Tap(at, "entry", card_of(i), "allowed, does not pass", passes=False)
            taps.append(Tap(at + 60_000, "entry", card_of(i), "taps again and passes"))
    for i in range(1, 6):
        taps.append(Tap(jst_ms(y, m, d, 12, 3 * i), "vend", card_of(i)))
    for i in (6, 7):
        taps.append(Tap(jst_ms(y, m, d, 12, 30 + 3 * (i - 6)), "mdb", card_of(i)))
    taps.append(Tap(jst_ms(y, m, d, 15, 0), "vend", card_of(2), "second drink: limit reached"))
    taps.append(Tap(jst_ms(y, m, d, 15, 5), "mdb", card_of(6), "second drink: limit reached"))
    for i in range(1, n + 1):
        if i == n:
            continue  # forgets to tap out: the work-history row shows the exit as missing
        taps.append(Tap(jst_ms(y, m, d, 17, 5 + 3 * i), "exit", card_of(i)))
    return SiteDay(techs, taps)


def agent_toml(data: Path, broker_port: int, entry_port: int, exit_port: int,
               serial_port: str) -> str:
    return f"""\
# Gate agent for the demo: two readers on emulated fields, one board with a relay per
# direction and the door sensor, the dev broker, plain TCP.
version = 1

[device]
id = "{DEVICE}"
site = "{SITE}"
role = "gate"
data_dir = "{data / 'gate'}"

[mqtt]
host = "127.0.0.1"
port = {broker_port}
tls = false                # the local dev broker only; field devices use TLS
state_interval_s = 5

[idlist]
name = "{LIST_NAME}"          # follow the operator's signed list over MQTT

[gate]
serial = "{serial_port}"   # the gate's controller board (the firmware under MicroPython on a pty)
relay_in = 0               # entry taps pulse relay 0, exit taps relay 1
relay_out = 1
pulse_ms = 300
passage_timeout_s = {PASSAGE_TIMEOUT_S}
held_open_s = 30

[[readers]]
name = "entry"
path = "udp:127.0.0.1:{entry_port}"
direction = "in"
targets = ["212F"]         # list only what is emulated: each absent technology costs a 1 s poll

[[readers]]
name = "exit"
path = "udp:127.0.0.1:{exit_port}"
direction = "out"
targets = ["212F"]
"""


def vending_toml(data: Path, broker_port: int, vend_port: int, serial_port: str,
                 device: str = VEND_DEVICE, reader: str = "vend") -> str:
    if device == MDB_DEVICE:
        channel = """channel = "mdb"            # the board is the machine's MDB cashless reader
price_ceiling = 150        # BEGIN SESSION funds (yen): the dearest free drink
session_s = 8.0"""
    else:
        channel = "slot = 1"
    return f"""\
# CCUS support vending machine for the demo: one free drink a day per technician.
version = 1

[device]
id = "{device}"
site = "{SITE}"
role = "vending"
data_dir = "{data / device}"

[mqtt]
host = "127.0.0.1"
port = {broker_port}
tls = false
state_interval_s = 5

[idlist]
name = "{LIST_NAME}"

[vending]
serial = "{serial_port}"   # the controller board (here: the firmware under MicroPython on a pty)
{channel}
limit = 1
period = "day"
contractor = "{CONTRACTOR}"

[[readers]]
name = "{reader}"
path = "udp:127.0.0.1:{vend_port}"
targets = ["212F"]
"""


class VmcLoop(threading.Thread):
    """The MDB machine's controller (sim/vmc.py) on its own: polls the reader; when a session
    begins (a technician tapped), picks MDB_ITEM and reports the vend."""

    def __init__(self, vmc: Vmc) -> None:
        super().__init__(name="vmc", daemon=True)
        self.vmc = vmc
        self.vends: list[tuple[int, int, str]] = []  # (item, price, outcome)
        self.error: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                if self.vmc.poll().code == mdb.P_BEGIN_SESSION:
                    self.vends.append((MDB_ITEM, MDB_PRICE, self.vmc.select(MDB_ITEM, MDB_PRICE)))
                else:
                    self.halt.wait(0.02)  # a real VMC polls every 25..200 ms
        except Exception as e:  # shown by stop() and asserted empty by the test
            self.error = repr(e)


@dataclass
class DemoRun:
    """The running pieces of the demo; also what the end-to-end test drives."""

    data: Path
    broker: PrivateBroker | None = None
    sink: subprocess.Popen[bytes] | None = None
    emulator: subprocess.Popen[str] | None = None
    board: BoardProcess | None = None
    gate_board: BoardProcess | None = None
    mdb_board: BoardProcess | None = None
    vmc: VmcLoop | None = None
    _mdb_fds: tuple[int, int] | None = None
    passages: dict[int, Touch] = field(default_factory=dict)   # tap seq -> its outcome record
    agents: dict[str, Agent] = field(default_factory=dict)   # device id -> agent
    clock: ManualClock = field(default_factory=lambda: ManualClock(jst_ms(*DAY, 6)))
    ports: dict[str, int] = field(default_factory=dict)
    touches: list[Touch] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def store_path(self) -> Path:
        return self.data / "store.sqlite"

    @property
    def agent(self) -> Agent | None:
        return self.agents.get(DEVICE)

    def start(self, day: SiteDay) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        self.broker = PrivateBroker(self.data / "broker").start()
        ready = self.data / "sink.ready"
        with open(self.data / "sink.log", "wb") as sink_log:
            self.sink = subprocess.Popen(
                [sys.executable, "-m", "ccus.cli", "sink", "run", "--db", str(self.store_path),
                 "--broker", f"127.0.0.1:{self.broker.port}", "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=sink_log)
        self.ports = {name: free_udp_port() for name in READERS}
        self.emulator = subprocess.Popen(
            [sys.executable, "-m", "sim.nfc_card", *map(str, self.ports.values())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.emulator.stdout is not None
        if "ready" not in json.loads(self.emulator.stdout.readline() or "{}"):
            raise RuntimeError("card emulator did not start")
        # the vending machine's controller board: when the vend line of slot 1 pulses, the
        # drop sensor sees a can 120 ms later
        (self.data / "board").mkdir()
        self.board = BoardProcess(self.data / "board", links=[
            {"out": VEND_PIN[1], "in": DROP, "delay_ms": 120, "hold_ms": 150, "level": 0}])
        self.board.start()
        # the gate's board: a person pushes the door 150 ms after either relay clicks
        (self.data / "gate-board").mkdir()
        self.gate_board = BoardProcess(self.data / "gate-board", links=[
            {"out": pin, "in": DOOR, "delay_ms": 150, "hold_ms": 200, "level": 0}
            for pin in (GATE, GATE_OUT)])
        self.gate_board.start()
        # the MDB machine: its bus is a pty pair, the VMC simulator on one end, the board's MDB
        # UART on the other (the two-byte word encoding); the VMC sets the reader up first
        vm, vs = os.openpty()
        self._mdb_fds = (vm, vs)
        tty.setraw(vm)
        tty.setraw(vs)
        (self.data / "mdb-board").mkdir()
        self.mdb_board = BoardProcess(self.data / "mdb-board", uarts={"1": os.ttyname(vs)},
                                      mdb_uart=1)
        self.mdb_board.start()
        vmc = Vmc(PtyWire(vm), reply_timeout=0.2)  # MDB allows 5 ms; the pty on a loaded PC
        vmc.setup()
        self.vmc = VmcLoop(vmc)
        self.vmc.start()
        # the operator signs the technician list and publishes it, retained; the agents verify
        # it against the operator's public key, apply it atomically and decide with it
        write_idlist_csv(self.data / "technicians.csv", day.technicians)
        operator_key = generate_key()
        publish_list(self.data / "technicians.csv", name=LIST_NAME, version=1, key=operator_key,
                     broker=(self.broker.host, self.broker.port), progress=False,
                     out_path=self.data / f"{LIST_NAME}.idl", issued_ms=self.clock.now_ms())
        confs = {
            DEVICE: agent_toml(self.data, self.broker.port, self.ports["entry"], self.ports["exit"],
                               self.gate_board.port),
            VEND_DEVICE: vending_toml(self.data, self.broker.port, self.ports["vend"],
                                      self.board.port),
            MDB_DEVICE: vending_toml(self.data, self.broker.port, self.ports["mdb"],
                                     self.mdb_board.port, device=MDB_DEVICE, reader="mdb"),
        }
        for device, text in confs.items():
            conf = self.data / f"{device}.toml"
            conf.write_text(text)
            cfg: AgentConfig = load(conf)
            self.agents[device] = Agent(cfg, clock=self.clock, on_touch=self._on_touch,
                                        config_keys=[operator_key.public_key()])
            self.agents[device].start()
        wait_until(lambda: ready.exists() or self.sink.poll() is not None, 15, "sink subscribed")
        if self.sink.poll() is not None:
            raise RuntimeError(f"sink exited: {(self.data / 'sink.log').read_text()[-800:]}")
        wait_until(lambda: all(a.link.connected for a in self.agents.values()), 15, "agents connected")
        wait_until(lambda: all(a.idlist is not None and a.idlist.version == 1
                          for a in self.agents.values()), 15, "the signed ID list applied")

    def _on_touch(self, t: Touch) -> None:
        with self._changed:
            self.touches.append(t)
            if "tap" in t.facts:
                self.passages[int(t.facts["tap"])] = t
            self._changed.notify_all()

    def gate(self) -> GateRole:
        role = self.agents[DEVICE].plugin
        assert isinstance(role, GateRole)
        return role

    def counts(self) -> dict[str, int]:
        """The agents' tap counters, added up."""
        total: dict[str, int] = {}
        for a in self.agents.values():
            for k, v in a.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def tap(self, tap: Tap) -> Touch | None:
        """Set the clock, tap the card on the emulated field, wait until the agent decided (and,
        at the gate, until the passage is recorded and the door is shut again)."""
        assert self.emulator and self.emulator.stdin and self.emulator.stdout
        agent = self.agents[READERS[tap.reader]]
        self.clock.set(tap.at_ms)
        seen_before = agent.counts["taps"] + agent.counts["suppressed"]
        suppressed = agent.counts["suppressed"]
        n_before = len(self.touches)
        if not tap.passes and self.gate_board is not None:
            self.gate_board.skip_links(RELAY_PIN[tap.reader])  # the relay clicks, nobody pushes
        req = {"port": self.ports[tap.reader], "tap": tap.card.to_json(), "hold_ms": 100}
        self.emulator.stdin.write(json.dumps(req) + "\n")
        self.emulator.stdin.flush()
        answer = json.loads(self.emulator.stdout.readline() or "{}")
        if not answer.get("seen"):
            raise RuntimeError(f"the {tap.reader} reader did not read the card: {answer}")

        def tap_touch() -> Touch | None:  # the tap's own touch (not a passage record)
            return next((t for t in self.touches[n_before:] if t.device == agent.cfg.device.id
                         and "tap" not in t.facts), None)

        # counted first, handed to on_touch a moment later (after the gate opened): wait for
        # the touch itself, or for the count of a repeat tap that makes none
        wait_until(lambda: agent.counts["taps"] + agent.counts["suppressed"] > seen_before
                   and (tap_touch() is not None or agent.counts["suppressed"] > suppressed),
                   10, "the agent's decision")
        made = tap_touch()
        if made is not None and made.facts.get("passage") == "pending":
            if not tap.passes:  # nobody went through: the passage timeout runs out
                wait_until(lambda: self.gate().state()["gate"]["pending"] == 1, 5, "the relay")
                self.clock.advance(PASSAGE_TIMEOUT_S * 1000 + 1000)
            wait_until(lambda: made.seq in self.passages, 10, "the passage recorded")
            wait_until(lambda: self.gate().state()["gate"]["door"] == "closed", 5, "the door shut")
            # and the relay released: a tap while it is still energized only extends the pulse
            wait_until(lambda: self._relays_off(), 5, "the relay released")
        return made

    def _relays_off(self) -> bool:
        assert self.gate_board is not None
        last: dict[int, int] = {}
        for pin, level, _ in self.gate_board.pins():
            last[pin] = level
        return last.get(GATE) == 0 and last.get(GATE_OUT) == 0

    def wait_delivered(self, timeout: float = 20.0) -> dict[str, int]:
        """Until every outbox is empty and the sink has stored every touch the agents made."""
        store = SqliteStore(self.store_path)
        try:
            wait_until(lambda: all(a.outbox.depth() == 0 for a in self.agents.values())
                  and store.counts()["touches"] >= len(self.touches), timeout, "delivery")
            return store.counts()
        finally:
            store.close()

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()
        if self.vmc is not None:
            self.vmc.halt.set()
            self.vmc.join(5)
        for board in (self.board, self.gate_board, self.mdb_board):
            if board:
                board.close()
        if self._mdb_fds is not None:
            for fd in self._mdb_fds:
                os.close(fd)
            self._mdb_fds = None
        if self.emulator:
            if self.emulator.stdin:
                self.emulator.stdin.close()
            stop_process(self.emulator, terminate=False)  # stdin closed: it exits by itself
        stop_process(self.sink)
        if self.broker:
            self.broker.close()


def run_demo(data_dir: str | Path, keep: Callable[[DemoRun], None] | None = None) -> int:
    """keep: called with the running demo after the last tap (`--console` serves on it)."""
    from cloud_sink.cli import format_work_history

    started = time.monotonic()
    day = site_day()
    run = DemoRun(Path(data_dir).resolve())
    date = f"{DAY[0]}-{DAY[1]:02d}-{DAY[2]:02d}"
    print(f"ccus-touch demo: site {SITE}, {date}: gate {DEVICE} (entry and exit readers), "
          f"vending machines {VEND_DEVICE} (vend line) and {MDB_DEVICE} (MDB), "
          f"{len(day.technicians)} technicians")
    try:
        run.start(day)
        print(f"broker 127.0.0.1:{run.broker.port if run.broker else '?'}; readers "
              + ", ".join(f"{r} udp:{p}" for r, p in run.ports.items())
              + f"; boards: vending {run.board.port if run.board else '?'}, gate "
              + f"{run.gate_board.port if run.gate_board else '?'}, MDB "
              + f"{run.mdb_board.port if run.mdb_board else '?'}")
        print(f"signed ID list {LIST_NAME} v1 ({len(day.technicians)} technicians) applied by "
              + " and ".join(run.agents) + "\n")
        for tap in day.taps:
            t = run.tap(tap)
            when = local_time(tap.at_ms)
            if t is None:
                print(f"  {when}  {tap.reader:<5}  {tap.card.ident.hex()}  (same tap: not counted)")
                continue
            who = t.tid or "-" * 14
            extra = f"  {t.facts['result']}" if "result" in t.facts else ""
            if "item" in t.facts:  # the MDB machine says what was chosen and its price
                extra += f" item {t.facts['item']} ({t.facts['price']} yen)"
            passage = run.passages.get(t.seq) if t.device == DEVICE else None
            if passage is not None:
                extra = f"  gate opened: {passage.facts['passage']} (seq {passage.seq})"
            print(f"  {when}  {tap.reader:<5}  {tap.card.ident.hex()}  {who}  "
                  f"{t.decision.value:<5} {t.reason.value}{extra}  seq {t.seq}")
        counts = run.wait_delivered()
        totals = run.counts()
        if run.vmc is not None:
            print(f"\nthe MDB machine's controller (sim/vmc.py): {len(run.vmc.vends)} vends "
                  + ", ".join(f"item {i} {p} yen {o}" for i, p, o in run.vmc.vends)
                  + (f"; it stopped: {run.vmc.error}" if run.vmc.error else ""))
        drinks = []
        for device in (VEND_DEVICE, MDB_DEVICE):
            vend = run.agents[device].plugin
            drinks += vend.billable() if isinstance(vend, VendingRole) else []
        if keep is not None:
            keep(run)
    finally:
        run.stop()
    store = SqliteStore(run.store_path)
    print("\nwork history (就業履歴), Asia/Tokyo:\n")
    print(format_work_history(store))
    ledger = store.vending_ledger()
    store.close()
    print(f"\nbillable drinks on {date}, paid by main contractor {CONTRACTOR}: {len(drinks)} "
          f"({', '.join(d.technician for d in drinks)})")
    for r in ledger:
        print(f"  the sink's vending ledger, {r.month}: {r.device} at site {r.site}, contractor "
              f"{r.contractor}: {r.dispensed} dispensed, {r.failed} failed, "
              f"{r.indeterminate} indeterminate")
    print(f"\nsummary: {len(day.taps)} taps, {totals['taps']} tap touches "
          f"({totals['suppressed']} repeat within the re-tap window), "
          f"{totals['allowed']} allowed, {totals['denied']} denied, "
          f"{totals.get('followups', 0)} passage records; "
          f"sink stored {counts['touches']}, dead letters {counts['dead_letters']}; "
          f"{time.monotonic() - started:.1f} s")
    return 0
