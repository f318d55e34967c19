"""The gate's board adapter: one thread owns the serial link (edge/board.py) to the controller
board, runs the passage state machine (edge/roles/passage.py) on taps, sensor edges, boots and
time, and turns its actions into relay pulses, follow-up records and alarms.

Rules of this file:
- Only the board thread touches the BoardLink (it is not thread-safe); the agent's thread hands
  it work through a queue and reads `online` / `emergency` / state() (plain attributes).
- Board trouble never raises out of here: a board that does not answer is `offline` (the
  role then records taps as not_actuated), and every pending passage still ends once.
- A pending passage is journaled (data_dir/gate-pending.log, PendingJournal) from just after
  its pulse until its outcome record is durable, so an agent restart ends it (`unconfirmed`)
  instead of losing it; the journal's fsync runs on the board thread after the relay moved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import threading
import time
from collections import deque
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
        # (tap key, perf_counter) when the board acknowledged the pulse, newest last: the board
        # acks a GATE_PULSE in the same loop pass that drives the relay (bench/bench_gate.py)
        self.relay_log: deque[tuple[str, float]] = deque(maxlen=256)
        self._work: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # wakes the board thread out of its select() the moment work is queued (a pulse must
        # not wait for a poll interval)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gate-board", daemon=True)
        self._jlock = threading.Lock()
        self._pending = PendingJournal(journal)
        self._journal: dict[str, dict[str, Any]] = self._pending.load()  # key -> record
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
        if not self._thread.is_alive() and self._stop.is_set():
            return
        self._stop.set()
        self._work.put(("wake",))
        self._wake()
        self._thread.join(5)
        if self.link is not None:
            self.link.close()
        self._pending.close()
        if self._wake_w >= 0:  # stop() may come twice; a closed fd number may be reused
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # full: already woken
                os.write(self._wake_w, b"x")

    def leftovers(self) -> dict[str, dict[str, Any]]:
        """Pending passages a previous run journaled and never ended (ended by the caller)."""
        with self._jlock:
            return dict(self._journal)

    def forget(self, key: str) -> None:
        with self._jlock:
            known = self._journal.pop(key, None) is not None
        if known:  # the file is written by the board thread only (and by start() before it)
            self._pending.remove(key)

    def open(self, key: str, relay: int, record: dict[str, Any], feedback: bool = True) -> None:
        """An allowed, recorded tap: the board thread pulses the relay now, then journals the
        pending passage on disk (in memory already, before that thread can end it)."""
        with self._jlock:
            self._journal[key] = record
        self._work.put(("open", key, relay, feedback))
        self._wake()

    def signal(self, led: int, buzzer: int, duration_ms: int) -> None:
        self._work.put(("feedback", led, buzzer, duration_ms))
        self._wake()

    def state(self) -> dict[str, Any]:
        s = self.machine.state
        return {"board": self.health, "board_detail": self.health_detail, "boots": self.boots,
                "door": s.phase, "door_open": s.door_open, "emergency": self.emergency,
                "alarms": sorted(s.alarms), "pending": len(s.pending)}

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
            self._wait(link)
            self._board_events(link)
            self._tick()
            now = time.monotonic()
            if now - self._last_beat >= HEARTBEAT_S:
                self._last_beat = now
                link.status(0.5)  # raises BoardError when the board stopped answering
                if self.health != "ok":
                    self._set_health("ok", "")

    def _wait(self, link: BoardLink) -> None:
        """Sleep until the board sends something, work is queued, or 20 ms pass (timers)."""
        try:
            fd = link.ser.fileno()
        except (AttributeError, OSError, ValueError):
            link.pump(0.002)  # a port without a file descriptor: poll
            return
        ready = select.select([fd, self._wake_r], [], [], 0.02)[0]
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        link.pump(0)

    def _do(self, link: BoardLink, item: tuple[Any, ...]) -> None:
        if item[0] == "open":
            _, key, relay, feedback = item
            tap_id = self._tap_id(key)
            for a in self.machine.feed(p.Event(p.TAP, self.clock.monotonic(), tap=tap_id,
                                               relay=relay)):
                if a.kind == "pulse":
                    try:
                        link.gate_pulse(a.pulse_ms, a.relay)
                        self.relay_log.append((key, time.perf_counter()))
                    except BoardError:
                        self._pulse_failed.add(key)
                        raise
                else:
                    self._act(a)
            if feedback:
                link.feedback(GREEN, ONE_BEEP, 300)
            with self._jlock:
                record = self._journal.get(key)
            if record is not None:  # after the relay: the journal's fsync never delays a gate
                self._pending.add(key, record)
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
        for code, arg in link.errors:  # e.g. 5: a relay the board does not have (config)
            log.warning("gate board reports error %d (arg %d): docs/serial-protocol.md", code, arg)
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



class PendingJournal:
    """Pending passages on disk, append-only: `+ key record-json` when the gate opened, `- key`
    once the outcome record is durable. One fsync a line; compacted when loaded. A torn last
    line (power cut mid-write) is skipped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None

    def load(self) -> dict[str, dict[str, Any]]:
        pending: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            op, _, rest = line.partition(" ")
            key, _, body = rest.partition(" ")
            if op == "-":
                pending.pop(key, None)
            elif op == "+":
                try:
                    record = json.loads(body)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    pending[key] = record
        write_atomic(self.path, "".join(f"+ {k} {json.dumps(r, sort_keys=True)}\n"
                                        for k, r in pending.items()).encode())
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open while running)
        return pending

    def add(self, key: str, record: dict[str, Any]) -> None:
        self._line(f"+ {key} {json.dumps(record, sort_keys=True)}")

    def remove(self, key: str) -> None:
        self._line(f"- {key}")

    def _line(self, text: str) -> None:
        if self._f is None:
            return
        try:
            self._f.write(text + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:  # disk full: the passage still ends; only a restart forgets it
            log.warning("gate: pending-passage journal %s: %s", self.path, exc)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
