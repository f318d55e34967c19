"""The gate's board adapter: one thread owns the serial link (edge/board.py) to the controller
board, runs the passage state machine (edge/roles/passage.py) on taps, sensor edges, boots and
time, and turns its actions into relay pulses, follow-up records and alarms.

Rules of this file:
- Only the board thread touches the BoardLink (it is not thread-safe); the agent's thread hands
  it work through a queue and reads `online` / `emergency` / state() (plain attributes).
- Board trouble never raises out of here: a board that does not answer is `offline` (the
  role then records taps as not_actuated), and every pending passage still ends once.
- A pending passage is journaled (data_dir/gate-pending.json) until its outcome is recorded, so
  an agent restart ends it (`unconfirmed`) instead of losing it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.board import BoardError, BoardLink
from edge.clock import Clock
from edge.config import GateConfig
from edge.config_apply import write_atomic
from edge.roles import passage as p
from firmware import frame

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0     # a STATUS_REQ this often when idle: a dead board is seen within ~2 s
REOPEN_S = 1.0        # a serial port that cannot be opened is tried again this often
GREEN, RED = 1, 2     # FEEDBACK led bits
ONE_BEEP, TWO_BEEPS = 1, 2


@dataclass(frozen=True)
class Outcome:
    """What the adapter reports for a pending passage (the role turns it into a record)."""

    key: str              # the journal key of the tap
    outcome: str          # passage.PASSED / NOT_PASSED / UNCONFIRMED, or "not_actuated"


class GateBoard:
    def __init__(self, cfg: GateConfig, clock: Clock, journal: Path,
                 on_outcome: Callable[[Outcome, dict[str, Any]], None],
                 on_alarm: Callable[[str, bool], None],
                 on_health: Callable[[], None],
                 link_factory: Callable[[], BoardLink] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.machine = p.Passage(p.Timing(cfg.pulse_ms, cfg.passage_timeout_s, cfg.held_open_s))
        self._link_factory = link_factory or (lambda: BoardLink(cfg.serial, baudrate=cfg.baud))
        self._on_outcome, self._on_alarm, self._on_health = on_outcome, on_alarm, on_health
        self.link: BoardLink | None = None
        self.health = "starting"      # starting | ok | offline
        self.health_detail = ""
        self.boots = 0                # BOOT notices seen (board restarts, the first included)
        self.emergency = False
        self.relay_at: dict[str, float] = {}   # tap key -> monotonic time its pulse was acked
        self._work: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gate-board", daemon=True)
        self._journal_path = journal
        self._jlock = threading.Lock()
        self._journal: dict[str, dict[str, Any]] = self._load_journal()
        self._ids: dict[int, str] = {}          # passage tap id -> journal key
        self._next_id = 0
        self._last_beat = 0.0
        self._pulse_failed: set[str] = set()

    @property
    def online(self) -> bool:
        return self.health == "ok"

    # -- the agent's side (any thread) --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.put(("wake",))
        self._thread.join(5)
        if self.link is not None:
            self.link.close()

    def leftovers(self) -> dict[str, dict[str, Any]]:
        """Pending passages a previous run journaled and never ended (ended by the caller)."""
        with self._jlock:
            return dict(self._journal)

    def forget(self, key: str) -> None:
        with self._jlock:
            if self._journal.pop(key, None) is not None:
                self._save_journal()

    def open(self, key: str, relay: int, record: dict[str, Any], feedback: bool = True) -> None:
        """An allowed, recorded tap: pulse the relay now, and journal the pending passage (in
        memory before the board thread can end it, on disk while the relay pulses)."""
        with self._jlock:
            self._journal[key] = record
            self._work.put(("open", key, relay, feedback))
            self._save_journal()

    def signal(self, led: int, buzzer: int, duration_ms: int) -> None:
        self._work.put(("feedback", led, buzzer, duration_ms))

    def state(self) -> dict[str, Any]:
        s = self.machine.state
        return {"board": self.health, "board_detail": self.health_detail, "boots": self.boots,
                "door": s.phase, "door_open": s.door_open, "emergency": self.emergency,
                "alarms": sorted(s.alarms), "pending": len(s.pending)}

    # -- journal ----------------------------------------------------------------------------
    def _load_journal(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._journal_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("gate: pending-passage journal %s unreadable (%s): starting empty",
                        self._journal_path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _save_journal(self) -> None:
        write_atomic(self._journal_path, json.dumps(self._journal, sort_keys=True).encode())

    # -- the board thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.link is None and not self._connect():
                self._idle(REOPEN_S)
                continue
            try:
                self._serve()
            except BoardError as exc:
                self._lost(str(exc))
            except OSError as exc:  # the port went away (USB cable): reopen it
                self._lost(f"serial port: {exc}")
                if self.link is not None:
                    self.link.close()
                self.link = None

    def _idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                item = self._work.get(timeout=0.05)
            except queue.Empty:
                item = None
            if item is not None:
                self._do_offline(item)
            self._tick()

    def _connect(self) -> bool:
        try:
            self.link = self._link_factory()
        except (OSError, ValueError, BoardError) as exc:
            self._set_health("offline", f"cannot open {self.cfg.serial}: {exc}")
            return False
        try:
            self.link.status(0.5)
        except BoardError as exc:
            self._lost(str(exc))
            return True  # the port is open; the heartbeat keeps trying
        self._set_health("ok", "")
        return True

    def _serve(self) -> None:
        assert self.link is not None
        link = self.link
        while not self._stop.is_set():
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                item = None
            if item is not None:
                self._do(link, item)
                continue  # taps first: the relay is the latency that matters
            link.pump(0.002)  # how long a queued pulse may wait for the thread, at most
            self._board_events(link)
            self._tick()
            now = time.monotonic()
            if now - self._last_beat >= HEARTBEAT_S:
                self._last_beat = now
                link.status(0.5)  # raises BoardError when the board stopped answering
                if self.health != "ok":
                    self._set_health("ok", "")

    def _do(self, link: BoardLink, item: tuple[Any, ...]) -> None:
        if item[0] == "open":
            _, key, relay, feedback = item
            tap_id = self._tap_id(key)
            for a in self.machine.feed(p.Event(p.TAP, self.clock.monotonic(), tap=tap_id,
                                               relay=relay)):
                if a.kind == "pulse":
                    try:
                        link.gate_pulse(a.pulse_ms, a.relay)
                        self.relay_at[key] = time.monotonic()
                    except BoardError:
                        self._pulse_failed.add(key)
                        raise
                else:
                    self._act(a)
            if feedback:
                link.feedback(GREEN, ONE_BEEP, 300)
        elif item[0] == "feedback":
            link.feedback(item[1], item[2], item[3])

    def _do_offline(self, item: tuple[Any, ...]) -> None:
        if item[0] == "open":  # went offline between the decision and here: nothing opened
            key = item[1]
            self._report(Outcome(key, "not_actuated"))

    def _tap_id(self, key: str) -> int:
        self._next_id += 1
        self._ids[self._next_id] = key
        return self._next_id

    def _board_events(self, link: BoardLink) -> None:
        mono = self.clock.monotonic()
        while link.boots:
            b = link.boots.pop(0)
            self.boots += 1
            # the first BOOT is the board we connected to starting; a later one is a reset
            log.log(logging.WARNING if self.boots > 1 else logging.INFO,
                    "gate board booted (reset cause %d, boot %d): relays shut",
                    b.reset_cause, b.boot_count)
            self._feed(p.Event(p.RESET, mono))
            self.emergency = False
            self._set_health("ok", f"booted, reset cause {b.reset_cause}", force=True)
        while link.sensor_events:
            sensor, st, _ticks = link.sensor_events.pop(0)
            level, at_boot = bool(st & frame.ST_LEVEL), bool(st & frame.ST_AT_BOOT)
            if sensor == frame.S_DOOR:
                kind = (p.DOOR_LEVEL_OPEN if at_boot else p.DOOR_OPEN) if level else p.DOOR_CLOSE
                self._feed(p.Event(kind, mono))
            elif sensor == frame.S_EMERGENCY:
                self.emergency = level
                self._feed(p.Event(p.EMERGENCY_ON if level else p.EMERGENCY_OFF, mono))
                self._on_health()
        link.errors.clear()

    def _tick(self) -> None:
        self._feed(p.Event(p.TICK, self.clock.monotonic()))

    def _feed(self, e: p.Event) -> None:
        for a in self.machine.feed(e):
            self._act(a)

    def _act(self, a: p.Action) -> None:
        if a.kind == "outcome":
            key = self._ids.pop(a.tap, None)
            if key is not None:
                failed = key in self._pulse_failed
                self._pulse_failed.discard(key)
                self._report(Outcome(key, "not_actuated" if failed else a.outcome))
        elif a.kind in ("alarm", "clear"):
            self._on_alarm(a.alarm, a.kind == "alarm")

    def _report(self, o: Outcome) -> None:
        with self._jlock:
            record = self._journal.get(o.key)
        if record is None:
            return
        self._on_outcome(o, record)  # writes the follow-up touch (durable) ...
        self.forget(o.key)           # ... before the journal lets go of it
        self.relay_at.pop(o.key, None)

    def _lost(self, why: str) -> None:
        was = self.health
        self._feed(p.Event(p.LOST, self.clock.monotonic()))
        self._set_health("offline", why)
        if was != "offline":
            log.warning("gate board offline: %s (taps are recorded as not_actuated)", why)

    def _set_health(self, health: str, detail: str, force: bool = False) -> None:
        changed = health != self.health or force
        self.health, self.health_detail = health, detail
        if changed:
            self._on_health()

