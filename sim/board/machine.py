"""Stand-in `machine` module for running the firmware under the MicroPython unix port in tests.

Scripted by a JSON file named in env CCUS_SIM:
  uart_fd      file descriptor of the "UART" (a pty end the test passes down), or
  uart_path    a path to open instead (e.g. /dev/pts/N)
  uarts        {"<uart id>": fd}: other UARTs (the MDB bus of firmware/vend_mdb.py)
  reset_cause  value machine.reset_cause() returns (default PWRON_RESET)
  inputs       {"pin": level} initial input levels (default 1: pulled up)
  links        [{"out": p, "in": q, "delay_ms": d, "hold_ms": h, "level": 0, "times": n}]
               when output p goes to 1, input q goes to `level` after d ms for h ms
               (at most n times; omit for always)
  control_fd   file descriptor of a pipe the test writes lines to, read as the inputs are:
               "SET <pin> <level>" sets an input now; "SKIP <out> <n>" makes the next n
               activations of output <out> trigger none of its links (a person who does
               not walk through an opened gate)
Every output change is printed as "PIN <id> <level> <ticks_ms>" so the test can assert it.
"""

import json
import os
import select
import sys
import time

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_path = os.getenv("CCUS_SIM")
if _path:
    with open(_path) as _f:
        SIM = json.load(_f)
else:
    SIM = {}

_inputs = {}  # pin id -> level
_events = []  # [pin, level, at_ticks]
_links = SIM.get("links", [])
_skip = {}  # output pin -> activations whose links are skipped
_ctl = None
_ctl_buf = bytearray()
if SIM.get("control_fd") is not None:
    _ctl = open(SIM["control_fd"], "rb")  # noqa: SIM115 (lives as long as the board)
    _ctl_poll = select.poll()
    _ctl_poll.register(_ctl, select.POLLIN)
for _k, _v in SIM.get("inputs", {}).items():
    _inputs[int(_k)] = _v


def _log(*a):
    print(*a)


def reset_cause():
    return SIM.get("reset_cause", PWRON_RESET)


def unique_id():
    return b"\x00\x01\x02\x03\x04\x05\x06\x07"


def freq():
    return 125000000


def reset():
    _log("RESET")
    sys.exit(4)


def _control():
    """Lines from the test's control pipe (see the module docstring)."""
    global _ctl
    if _ctl is None:
        return
    while True:
        r = _ctl_poll.poll(0)
        if not r:
            return
        b = _ctl.read(1)
        if not b:
            _ctl = None  # the test closed its end
            return
        if b != b"\n":
            _ctl_buf.extend(b)
            continue
        words = bytes(_ctl_buf).decode().split()
        _ctl_buf[:] = b""
        if len(words) == 3 and words[0] == "SET":
            _inputs[int(words[1])] = int(words[2])
        elif len(words) == 3 and words[0] == "SKIP":
            _skip[int(words[1])] = int(words[2])
        _log("CTL", " ".join(words))


def _apply_events(now):
    _control()
    keep = []
    for e in _events:
        if time.ticks_diff(now, e[2]) >= 0:
            _inputs[e[0]] = e[1]
        else:
            keep.append(e)
    _events[:] = keep


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 4
    IRQ_RISING = 8

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self.mode = mode
        if mode == Pin.OUT:
            self._v = 0 if value is None else value
            _log("PIN", id, self._v, time.ticks_ms())
        elif id not in _inputs:
            _inputs[id] = 1

    def value(self, v=None):
        if v is None:
            if self.mode == Pin.OUT:
                return self._v
            _apply_events(time.ticks_ms())
            return _inputs.get(self.id, 1)
        v = 1 if v else 0
        if self.mode == Pin.OUT and v != self._v:
            self._v = v
            now = time.ticks_ms()
            _log("PIN", self.id, v, now)
            if v == 1 and _skip.get(self.id, 0) > 0:
                _skip[self.id] -= 1
            elif v == 1:
                for lk in _links:
                    if lk["out"] == self.id and lk.get("times", 1) > 0:
                        if "times" in lk:
                            lk["times"] -= 1
                        at = time.ticks_add(now, lk.get("delay_ms", 0))
                        idle = _inputs.get(lk["in"], 1)
                        _events.append([lk["in"], lk.get("level", 0), at])
                        _events.append([lk["in"], idle, time.ticks_add(at, lk.get("hold_ms", 30))])
        return None

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def __call__(self, v=None):
        return self.value(v)


class UART:
    def __init__(self, id, baudrate=115200, tx=None, rx=None, **kw):
        fd = SIM.get("uarts", {}).get(str(id))  # a second UART (the MDB bus): its own pty
        if fd is None:
            fd = SIM.get("uart_fd", SIM.get("uart_path"))
        if fd is None:
            raise OSError("CCUS_SIM has neither uart_fd nor uart_path")
        self._f = open(fd, "r+b")  # noqa: SIM115 (lives as long as the board)
        self._poll = select.poll()
        self._poll.register(self._f, select.POLLIN)
        self._buf = bytearray()
        self._one = bytearray(1)

    def any(self):
        n = 0
        while n < 256:
            r = self._poll.poll(0)
            if not r or not (r[0][1] & select.POLLIN):
                break
            if self._f.readinto(self._one) != 1:
                break
            self._buf.append(self._one[0])
            n += 1
        return len(self._buf)

    def read(self, n=-1):
        self.any()
        if not self._buf:
            return None
        if n < 0 or n > len(self._buf):
            n = len(self._buf)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def write(self, b):
        n = self._f.write(b)
        return n


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self._last = time.ticks_ms()
        _log("WDT", timeout)

    def feed(self):
        now = time.ticks_ms()
        if time.ticks_diff(now, self._last) > self.timeout:
            _log("WDT RESET (starved", time.ticks_diff(now, self._last), "ms)")
            sys.exit(3)
        self._last = now
