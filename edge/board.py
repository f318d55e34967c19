"""Host-side adapter to the controller board: pyserial + firmware/frame.py's codec and link."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial

from edge.errors import EdgeError
from firmware import frame

RESULT_NAMES = {
    frame.R_DISPENSED: "dispensed",
    frame.R_NO_DROP: "no_drop",
    frame.R_BUSY: "busy",
    frame.R_BAD_SLOT: "bad_slot",
    frame.R_SENSOR_FAULT: "sensor_fault",
    frame.R_INTERRUPTED: "interrupted",
    frame.R_NOT_STARTED: "not_started",
    frame.R_FORGOTTEN: "forgotten",
    frame.R_NONE: "none",
}


class BoardError(EdgeError):
    """Something went wrong talking to the board."""


class BoardSilent(BoardError):
    """The board never acknowledged a message (retries exhausted)."""


class BoardRefused(BoardError):
    """The board NAKed a message (version or type it does not take)."""


class BoardTimeout(BoardError):
    """The board acknowledged a request but the answer did not come in time."""


@dataclass(frozen=True)
class BootNotice:
    reset_cause: int
    fw_version: int
    boot_count: int
    last_vend_id: int
    last_slot: int
    last_state: int  # frame.J_NONE / J_IN_PROGRESS / J_DONE
    last_result: int
    at: float

    @property
    def interrupted_vend(self) -> int | None:
        """The vend id that was in progress when the board reset, if any."""
        return self.last_vend_id if self.last_state == frame.J_IN_PROGRESS else None


@dataclass(frozen=True)
class BoardStatus:
    busy: bool
    door_open: bool
    uptime_s: int
    crc_errors: int
    skipped: int
    last_vend_id: int


@dataclass(frozen=True)
class VendReply:
    vend_id: int
    slot: int
    result: int
    elapsed_ms: int

    @property
    def name(self) -> str:
        return RESULT_NAMES.get(self.result, f"result_{self.result}")


class BoardLink:
    """Talks to one board over a serial port. Not thread-safe: one caller drives it.

    Every public call pumps the port itself; incoming BOOT notices, sensor events and
    errors are kept (boots, sensor_events, errors) and passed to on_boot if set.
    """

    def __init__(
        self,
        port: str | serial.Serial,
        baudrate: int = 115200,
        retries: int = 3,
        ack_timeout: float = 0.25,
        on_boot: Callable[[BootNotice], None] | None = None,
    ) -> None:
        if isinstance(port, str):
            self.ser = serial.Serial(port, baudrate=baudrate, timeout=0.02)
        else:
            self.ser = port
        rnd = os.urandom(2)
        self.link = frame.Link(
            rnd[0] % 255 + 1,
            first_seq=rnd[1] % 255 + 1,
            retries=retries,
            ack_timeout_ms=int(ack_timeout * 1000),
            accept=frame.HOST_ACCEPTS,
        )
        self.decoder = frame.Decoder()
        self.on_boot = on_boot
        self.boots: list[BootNotice] = []
        self.sensor_events: list[tuple[int, int, int]] = []
        self.errors: list[tuple[int, int]] = []
        self.mdb_events: list[tuple[int, int, int, int, int]] = []  # MDB_EVENT (vending/mdb.py)
        self._inbox: deque[frame.Frame] = deque(maxlen=64)
        self._done: dict[int, Any] = {}  # seq -> True (acked) or failure reason

    def close(self) -> None:
        self.ser.close()

    def __enter__(self) -> BoardLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- pump

    @staticmethod
    def _now() -> int:
        return int(time.monotonic() * 1000)

    def pump(self, wait: float = 0.02) -> None:
        """Read what the port has (waiting at most `wait` s), run the link, write its output."""
        self.ser.timeout = max(wait, 0.0)
        data = self.ser.read(max(1, self.ser.in_waiting))
        now = self._now()
        if data:
            for f in self.decoder.feed(data):
                for ev in self.link.receive(f, now):
                    self._event(ev)
        for ev in self.link.poll(now):
            self._event(ev)
        out = self.link.take_output()
        if out:
            self.ser.write(b"".join(out))
            self.ser.flush()

    def _event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == frame.EV_ACKED:
            self._done[ev[2]] = True
        elif kind == frame.EV_FAILED:
            self._done[ev[2]] = ev[4]
        elif kind == frame.EV_MESSAGE:
            f = ev[1]
            if f.type == frame.BOOT:
                cause, fw, count, last, slot, state, result = frame.parse_boot(f.payload)
                b = BootNotice(cause, fw, count, last, slot, state, result, time.monotonic())
                self.boots.append(b)
                if self.on_boot:
                    self.on_boot(b)
            elif f.type == frame.SENSOR:
                self.sensor_events.append(frame.parse_sensor(f.payload))
            elif f.type == frame.ERROR:
                self.errors.append(frame.parse_error(f.payload))
            elif f.type == frame.MDB_EVENT:
                self.mdb_events.append(frame.parse_mdb_event(f.payload))
            else:
                self._inbox.append(f)

    def _flush_out(self) -> None:
        out = self.link.take_output()
        if out:
            self.ser.write(b"".join(out))
            self.ser.flush()

    # ---------------------------------------------------------------- primitives

    def request(self, mtype: int, payload: bytes) -> int:
        """Send one reliable message and wait for its ACK. Raises BoardSilent / BoardRefused."""
        seq = self.link.send(mtype, payload, self._now())
        self._flush_out()
        name = frame.TYPE_NAMES[mtype]
        # (retries + 1) ack timeouts, plus slack for scheduling.
        deadline = time.monotonic() + (self.link.retries + 2) * self.link.ack_timeout_ms / 1000
        while seq not in self._done:
            if time.monotonic() > deadline:  # cannot happen unless poll stops: belt and braces
                raise BoardSilent(f"{name}: no acknowledgement and no link verdict")
            self.pump(0.01)
        verdict = self._done.pop(seq)
        if verdict is True:
            return seq
        if verdict == frame.FAIL_NO_ACK:
            raise BoardSilent(
                f"board silent: {name} not acknowledged after {self.link.retries + 1} tries"
                f" ({self.link.ack_timeout_ms} ms apart)"
            )
        raise BoardRefused(f"board refused {name}: NAK reason {verdict}")

    def wait_for(self, match: Callable[[frame.Frame], bool], timeout: float) -> frame.Frame | None:
        """The first received message (kept or new) that matches, or None after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for f in list(self._inbox):
                if match(f):
                    self._inbox.remove(f)
                    return f
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.pump(min(0.02, left))

    # ---------------------------------------------------------------- commands

    def vend(
        self,
        vend_id: int,
        slot: int,
        pulse_ms: int = 200,
        timeout_ms: int = 5000,
        wait: float | None = None,
    ) -> VendReply:
        """Ask the board to vend and wait for its result. A BOOT notice naming this vend as
        in progress at reset ends the wait with result R_INTERRUPTED.
        Raises BoardSilent (never acked) or BoardTimeout (acked, no result)."""
        if pulse_ms <= 0:
            raise ValueError("pulse_ms must be > 0 (0 is a query)")
        boots_before = len(self.boots)
        self.request(frame.VEND_REQ, frame.vend_req(vend_id, slot, pulse_ms, timeout_ms))
        return self._await_result(
            vend_id, wait if wait is not None else timeout_ms / 1000 + 2.0, boots_before
        )

    def query_vend(self, vend_id: int, wait: float = 2.0) -> VendReply:
        """Ask what the board knows about a vend, without vending (VEND_REQ with pulse 0)."""
        self.request(frame.VEND_REQ, frame.vend_req(vend_id, 0, 0, 0))
        return self._await_result(vend_id, wait, len(self.boots))

    def _await_result(self, vend_id: int, wait: float, boots_before: int) -> VendReply:
        deadline = time.monotonic() + wait
        while True:
            f = self.wait_for(
                lambda f: f.type == frame.VEND_RESULT and frame.parse_vend_result(f.payload)[0] == vend_id,
                0.02,
            )
            if f is not None:
                return VendReply(*frame.parse_vend_result(f.payload))
            for b in self.boots[boots_before:]:
                if b.last_vend_id == vend_id and b.last_state == frame.J_IN_PROGRESS:
                    return VendReply(vend_id, b.last_slot, frame.R_INTERRUPTED, 0)
            if time.monotonic() > deadline:
                raise BoardTimeout(f"vend {vend_id}: acknowledged but no result within {wait:.1f} s")

    def status(self, wait: float = 1.0) -> BoardStatus:
        self.request(frame.STATUS_REQ, b"")
        f = self.wait_for(lambda f: f.type == frame.STATUS, wait)
        if f is None:
            raise BoardTimeout(f"no status report within {wait:.1f} s")
        busy, door, up, crc, skipped, last = frame.parse_status(f.payload)
        return BoardStatus(bool(busy), bool(door), up, crc, skipped, last)

    def gate_pulse(self, pulse_ms: int = 500, relay: int = 0) -> None:
        self.request(frame.GATE_PULSE, frame.gate_pulse(relay, pulse_ms))

    def feedback(self, led: int, buzzer: int = 0, duration_ms: int = 500) -> None:
        """led: bit 0 green, bit 1 red; buzzer: pattern number (0 = silent)."""
        self.request(frame.FEEDBACK, frame.feedback(led, buzzer, duration_ms))

    def take_mdb_events(self) -> list[tuple[int, int, int, int, int]]:
        """MDB_EVENTs in arrival order: (kind, session, item, price, reader state)."""
        out, self.mdb_events = self.mdb_events, []
        return out

    def take_results(self) -> list[VendReply]:
        """VEND_RESULTs that arrived and nobody waited for (late answers), oldest first."""
        late = [f for f in self._inbox if f.type == frame.VEND_RESULT]
        for f in late:
            self._inbox.remove(f)
        return [VendReply(*frame.parse_vend_result(f.payload)) for f in late]

    def wait_boot(self, timeout: float) -> BootNotice | None:
        n = len(self.boots)
        deadline = time.monotonic() + timeout
        while len(self.boots) == n and time.monotonic() < deadline:
            self.pump(0.02)
        return self.boots[n] if len(self.boots) > n else None
