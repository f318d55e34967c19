"""Board application: vend line, drop sensor, gate relays, door sensor, emergency release input,
watchdog, over the serial link.

Gate rules: a relay is energized only for a GATE_PULSE (at most 5 s, then off by the board's
own clock, whatever the host does) or while the emergency input is active; every relay pin is
driven off at boot, so a watchdog or power reset leaves the gate shut.
"""

import os
import time

import frame
import machine
from frame import (
    EV_FAILED,
    EV_MESSAGE,
    J_IN_PROGRESS,
    R_BAD_SLOT,
    R_BUSY,
    R_DISPENSED,
    R_FORGOTTEN,
    R_INTERRUPTED,
    R_NO_DROP,
    R_NOT_STARTED,
    R_SENSOR_FAULT,
    S_DOOR,
    S_EMERGENCY,
    ST_AT_BOOT,
    ST_LEVEL,
)
from journal import Journal, JournalError

FW_VERSION = 1

_IDLE = 0
_CLEARING = 3  # vend requested, drop sensor still active (the last can is falling)
_PULSING = 1
_WAITING = 2

CLEAR_WAIT_MS = 500  # how long the drop sensor may stay active before a vend is refused


class Debounced:
    """A digital input that changes state only after it has been stable for debounce_ms."""

    def __init__(self, pin, active, debounce_ms, now):
        self.pin = pin
        self.active_level = active
        self.debounce_ms = debounce_ms
        self.state = pin.value() == active
        self._raw = self.state
        self._since = now

    def update(self, now):
        """Sample the pin; return True if the debounced state just changed."""
        raw = self.pin.value() == self.active_level
        if raw != self._raw:
            self._raw = raw
            self._since = now
            return False
        if raw != self.state and time.ticks_diff(now, self._since) >= self.debounce_ms:
            self.state = raw
            return True
        return False


class Board:
    def __init__(self, cfg):
        self.cfg = cfg
        now = time.ticks_ms()
        self.started = now
        self.wdt = machine.WDT(timeout=cfg["wdt_ms"])
        self.uart = machine.UART(cfg["uart"], baudrate=cfg["baud"], tx=cfg["tx"], rx=cfg["rx"])
        va = cfg["vend_active"]
        self.vend_pins = [machine.Pin(p, machine.Pin.OUT, value=1 - va) for p in cfg["vend"]]
        off = 1 - cfg["gate_active"]
        self.gates = [machine.Pin(cfg["gate"], machine.Pin.OUT, value=off)]
        if cfg.get("gate_out") is not None:
            self.gates.append(machine.Pin(cfg["gate_out"], machine.Pin.OUT, value=off))
        self.gate = self.gates[0]
        self.led_green = machine.Pin(cfg["led_green"], machine.Pin.OUT, value=0)
        self.led_red = machine.Pin(cfg["led_red"], machine.Pin.OUT, value=0)
        self.buzzer = machine.Pin(cfg["buzzer"], machine.Pin.OUT, value=0)
        db = cfg["debounce_ms"]
        pin_in = machine.Pin.IN
        if cfg.get("pull_up", True):
            drop_pin = machine.Pin(cfg["drop"], pin_in, machine.Pin.PULL_UP)
            door_pin = machine.Pin(cfg["door"], pin_in, machine.Pin.PULL_UP)
        else:
            drop_pin = machine.Pin(cfg["drop"], pin_in)
            door_pin = machine.Pin(cfg["door"], pin_in)
        self.drop = Debounced(drop_pin, cfg["drop_active"], db, now)
        self.door = Debounced(door_pin, cfg["door_active"], db, now)
        self.emergency = None
        if cfg.get("emergency") is not None:
            if cfg.get("pull_up", True):
                em_pin = machine.Pin(cfg["emergency"], pin_in, machine.Pin.PULL_UP)
            else:
                em_pin = machine.Pin(cfg["emergency"], pin_in)
            self.emergency = Debounced(em_pin, cfg["emergency_active"], db, now)

        self.journal = Journal(cfg["journal"])
        self.journal.load()
        self.journal_ok = True
        try:
            self.journal.booted()
        except JournalError:
            self.journal_ok = False
        self.dropped = 0
        self.errors = 0
        try:
            first = os.urandom(1)[0] or 1
        except (AttributeError, OSError):
            first = 1
        self.link = frame.Link(
            (self.journal.boot_count % 255) + 1,
            accept=frame.BOARD_ACCEPTS,
            ack_timeout_ms=200,
            first_seq=first,
        )
        self.decoder = frame.Decoder()
        self.mdb = None  # the MDB vend channel (firmware/vend_mdb.py), when the board has one
        if cfg.get("mdb_uart") is not None:
            import vend_mdb

            self.mdb = vend_mdb.MdbPort(cfg, self.send, self.journal)

        self.vstate = _IDLE
        self.v_id = 0
        self.v_slot = 0
        self.v_pin = self.vend_pins[0]
        self.v_t0 = 0
        self.v_pulse = 0
        self.v_timeout = 0
        self.gate_until = [None] * len(self.gates)
        self.feedback_until = None
        self.buzz = 0  # buzzer pattern in progress: 1 one beep, 2 a double beep
        self.buzz_t0 = 0
        self.buzz_ms = 0
        self._announce(machine.reset_cause())
        if self.emergency is not None and self.emergency.state:
            self._hold_gates(True)  # the alarm was on before the reset: open again at once

    # ------------------------------------------------------------ boot

    def _announce(self, cause):
        j = self.journal
        self.send(
            frame.BOOT,
            frame.boot(cause, FW_VERSION, j.boot_count, j.vend_id, j.slot, j.state, j.result),
        )
        if j.corrupt or not self.journal_ok:
            self.send(frame.ERROR, frame.error(frame.E_JOURNAL, 0))
        if cause == getattr(machine, "WDT_RESET", -1):
            self.send(frame.ERROR, frame.error(frame.E_WATCHDOG_RESET, j.vend_id))
        # levels that are not the resting state, so the host starts from what is true now
        now = time.ticks_ms()
        if self.door.state:
            self.send(frame.SENSOR, frame.sensor(S_DOOR, ST_LEVEL | ST_AT_BOOT, now))
        if self.emergency is not None and self.emergency.state:
            self.send(frame.SENSOR, frame.sensor(S_EMERGENCY, ST_LEVEL | ST_AT_BOOT, now))
        if j.state == J_IN_PROGRESS:
            # Reported in BOOT as "in progress at reset"; from now on its outcome is
            # R_INTERRUPTED: the board cannot know whether a can fell.
            try:
                j.finish(R_INTERRUPTED)
            except JournalError:
                self.send(frame.ERROR, frame.error(frame.E_JOURNAL, j.vend_id))

    # ------------------------------------------------------------ io

    def send(self, mtype, payload):
        try:
            self.link.send(mtype, payload, time.ticks_ms())
        except frame.LinkError:
            self.dropped += 1  # queue full: the host will ask again (status / vend query)
        self.flush()

    def flush(self):
        for b in self.link.take_output():
            self.uart.write(b)

    def step(self):
        """One pass of the main loop. Returns True if it did something."""
        now = time.ticks_ms()
        self.wdt.feed()
        busy = self.mdb is not None and self.mdb.step(now)  # first: the VMC waits 5 ms at most
        n = self.uart.any()
        if n:
            busy = True
            for f in self.decoder.feed(self.uart.read(n)):
                for ev in self.link.receive(f, now):
                    if ev[0] == EV_MESSAGE:
                        try:
                            self.handle(ev[1], now)
                        except Exception:  # report and keep serving; the WDT covers hangs
                            self.errors += 1
                            self.send(frame.ERROR, frame.error(frame.E_UNEXPECTED, ev[1].type))
        for ev in self.link.poll(now):
            if ev[0] == EV_FAILED:
                pass  # host did not ack; results stay in the journal for a query
        self._vend_step(now)
        if self.mdb is not None and self.mdb.step(now):
            busy = True
        if self.door.update(now):
            self.send(frame.SENSOR, frame.sensor(S_DOOR, 1 if self.door.state else 0, now))
        em = self.emergency
        if em is not None and em.update(now):
            self._hold_gates(em.state)
            self.send(frame.SENSOR, frame.sensor(S_EMERGENCY, 1 if em.state else 0, now))
        for i in range(len(self.gates)):
            until = self.gate_until[i]
            if until is not None and time.ticks_diff(now, until) >= 0:
                self.gate_until[i] = None
                if not self._emergency_on():
                    self.gates[i].value(1 - self.cfg["gate_active"])
        if self.buzz == 2:  # double beep: on, off, on in thirds of the duration
            third = time.ticks_diff(now, self.buzz_t0) * 3 // max(self.buzz_ms, 1)
            self.buzzer.value(0 if third == 1 else 1)
        if self.feedback_until is not None and time.ticks_diff(now, self.feedback_until) >= 0:
            self.led_green.value(0)
            self.led_red.value(0)
            self.buzzer.value(0)
            self.buzz = 0
            self.feedback_until = None
        self.flush()
        return busy or self.vstate != _IDLE

    # ------------------------------------------------------------ messages

    def handle(self, f, now):
        t = f.type
        if t == frame.VEND_REQ:
            self._vend_req(f.payload, now)
        elif t == frame.STATUS_REQ:
            d = self.decoder
            up = time.ticks_diff(now, self.started) // 1000
            busy = 1 if self.vstate != _IDLE else 0
            door = 1 if self.door.state else 0
            p = frame.status(busy, door, up, d.crc_errors, d.skipped, self.journal.vend_id)
            self.send(frame.STATUS, p)
        elif t == frame.GATE_PULSE:
            relay, ms = frame.parse_gate_pulse(f.payload)
            if relay >= len(self.gates):
                self.send(frame.ERROR, frame.error(frame.E_RELAY, relay))
            elif ms > 0 and not self._emergency_on():  # held open already in an emergency
                self.gates[relay].value(self.cfg["gate_active"])
                self.gate_until[relay] = time.ticks_add(now, min(ms, 5000))
        elif t == frame.FEEDBACK:
            led, buzz, ms = frame.parse_feedback(f.payload)
            self.led_green.value(1 if led & 1 else 0)
            self.led_red.value(1 if led & 2 else 0)
            self.buzzer.value(1 if buzz else 0)
            ms = min(ms, 5000)
            self.buzz = buzz
            self.buzz_t0 = now
            self.buzz_ms = ms
            self.feedback_until = time.ticks_add(now, ms)
        elif t == frame.MDB_HOST and self.mdb is not None:
            self.mdb.host(f.payload, now)
        elif t == frame.ERROR:
            pass  # the host's errors are informational for the board

    def _emergency_on(self):
        return self.emergency is not None and self.emergency.state

    def _hold_gates(self, on):
        """Emergency release: every gate relay on while the input is active, all off after."""
        level = self.cfg["gate_active"] if on else 1 - self.cfg["gate_active"]
        for i in range(len(self.gates)):
            self.gates[i].value(level)
            self.gate_until[i] = None

    def _result(self, vend_id, slot, result, elapsed):
        self.send(frame.VEND_RESULT, frame.vend_result(vend_id, slot, result, elapsed))

    def _vend_req(self, p, now):
        vend_id, slot, pulse_ms, timeout_ms = frame.parse_vend_req(p)
        j = self.journal
        if self.vstate != _IDLE and vend_id == self.v_id:
            return  # a repeat of the vend in progress: its result will come
        if vend_id == j.vend_id and j.vend_id != 0:
            # A repeat (or a query) of the last vend: report, never vend twice.
            if self.vstate != _IDLE:
                return  # still running: its result will come
            self._result(vend_id, j.slot, j.result, 0)
            return
        if pulse_ms == 0:  # query only
            self._result(vend_id, slot, R_NOT_STARTED if vend_id > j.vend_id else R_FORGOTTEN, 0)
            return
        if self.vstate != _IDLE:
            self._result(vend_id, slot, R_BUSY, 0)
            return
        if not 1 <= slot <= len(self.vend_pins):
            self._result(vend_id, slot, R_BAD_SLOT, 0)
            return
        self.v_id = vend_id
        self.v_slot = slot
        self.v_pin = self.vend_pins[slot - 1]
        self.v_t0 = now
        self.v_pulse = pulse_ms
        self.v_timeout = min(max(timeout_ms, pulse_ms), self.cfg["max_timeout_ms"])
        self.vstate = _CLEARING  # wait (briefly) for the drop sensor to be clear
        self._vend_step(now)

    def _begin_pulse(self, now):
        try:
            self.journal.start(self.v_id, self.v_slot)  # journaled before the line is driven
        except JournalError:
            self.vstate = _IDLE
            self.send(frame.ERROR, frame.error(frame.E_JOURNAL, self.v_id))
            self._result(self.v_id, self.v_slot, R_SENSOR_FAULT, 0)
            return
        self.v_t0 = now
        self.v_pin.value(self.cfg["vend_active"])
        self.vstate = _PULSING

    def _vend_step(self, now):
        if self.vstate == _IDLE:
            self.drop.update(now)
            return
        if self.vstate == _CLEARING:
            self.drop.update(now)
            if not self.drop.state:
                self._begin_pulse(now)
            elif time.ticks_diff(now, self.v_t0) >= CLEAR_WAIT_MS:
                self.vstate = _IDLE
                self._result(self.v_id, self.v_slot, R_SENSOR_FAULT, 0)
                self.send(frame.ERROR, frame.error(frame.E_SENSOR, frame.S_DROP))
            return
        el = time.ticks_diff(now, self.v_t0)
        if self.vstate == _PULSING and el >= self.v_pulse:
            self.v_pin.value(1 - self.cfg["vend_active"])
            self.vstate = _WAITING
        dropped = self.drop.update(now) and self.drop.state
        if dropped:
            self._vend_done(R_DISPENSED, el)
        elif el >= self.v_timeout:
            self._vend_done(R_NO_DROP, el)

    def _vend_done(self, result, elapsed):
        self.v_pin.value(1 - self.cfg["vend_active"])
        self.vstate = _IDLE
        try:
            self.journal.finish(result)
        except JournalError:
            self.send(frame.ERROR, frame.error(frame.E_JOURNAL, self.v_id))
        self._result(self.v_id, self.v_slot, result, elapsed)


def run(cfg=None):
    if cfg is None:
        import board_config

        cfg = board_config.for_platform()
    b = Board(cfg)
    while True:
        if not b.step():
            time.sleep_ms(1)
