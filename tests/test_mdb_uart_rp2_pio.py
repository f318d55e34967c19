"""The RP2040 MDB PIO programs (firmware/mdb_uart_rp2.py) run cycle by cycle in a small model of a
PIO state machine: the programs' own source is assembled by a stand-in rp2.asm_pio (as MicroPython
does it: the assembler's names are put into the module's globals while the function runs).

What this proves: 9 bits per word, LSB first, the mode bit 9th, RX samples inside each bit, a bad
stop bit drops the word, TX's start/stop bits, all at 8 PIO cycles per bit. What it does not: the
real PIO (instruction encoding, FIFO timing, pins): docs/vending.md."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import mdb_bits

CYCLES_PER_BIT = 8


class Instr:
    def __init__(self, op: str, *args: object) -> None:
        self.op, self.args, self.delay, self.side_value = op, args, 0, None  # type: tuple

    def side(self, v: int) -> Instr:
        self.side_value = v
        return self

    def __getitem__(self, delay: int) -> Instr:
        self.delay = delay
        return self


class Program:
    def __init__(self) -> None:
        self.code: list[Instr] = []
        self.labels: dict[str, int] = {}


def _asm_pio(**_kw: object) -> Callable[[Callable[[], None]], Program]:
    def dec(f: Callable[[], None]) -> Program:
        prog = Program()

        def emit(op: str) -> Callable[..., Instr]:
            def make(*args: object) -> Instr:
                i = Instr(op, *args)
                prog.code.append(i)
                return i
            return make

        names: dict[str, object] = {n: emit(n.rstrip("_")) for n in
                                    ("wait", "set", "in_", "jmp", "push", "pull", "out", "nop")}
        names["label"] = lambda name: prog.labels.__setitem__(name, len(prog.code))
        names.update({n: n for n in ("pin", "pins", "x", "x_dec", "block")})
        g = f.__globals__
        saved = dict(g)
        g.clear()
        g.update(names)
        try:
            f()
        finally:
            g.clear()
            g.update(saved)
        return prog
    return dec


def _load() -> types.ModuleType:
    rp2 = types.ModuleType("rp2")
    rp2.asm_pio = _asm_pio  # type: ignore[attr-defined]
    rp2.PIO = types.SimpleNamespace(SHIFT_RIGHT=1, JOIN_RX=2, JOIN_TX=1, OUT_HIGH=3)  # type: ignore[attr-defined]
    machine = types.ModuleType("machine")
    machine.Pin = object  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("rp2", "machine", "mdb_bits")}
    sys.modules.update({"rp2": rp2, "machine": machine, "mdb_bits": mdb_bits})
    try:
        return importlib.reload(importlib.import_module("firmware.mdb_uart_rp2"))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


RP2 = _load()


def run(prog: Program, cycles: int, line: Callable[[int], int] = lambda t: 1,
        tx_fifo: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Run for `cycles`; returns (RX FIFO pushes, the output pin per cycle)."""
    pc, x, isr, osr, pin = 0, 0, 0, 0, 1
    pushed: list[int] = []
    wave: list[int] = []
    fifo = list(tx_fifo or [])
    t = 0

    def tick(n: int) -> None:
        nonlocal t
        for _ in range(n):
            wave.append(pin)
            t += 1

    while t < cycles:
        i = prog.code[pc]
        nxt = (pc + 1) % len(prog.code)  # wrap: after the last instruction, the first
        if i.side_value is not None:
            pin = i.side_value
        if i.op == "wait":
            if line(t) != i.args[0]:
                tick(1)
                continue  # stalls: no delay while waiting
        elif i.op == "set":
            x = int(i.args[1])  # type: ignore[call-overload]
        elif i.op == "in":
            isr = ((isr >> 1) | (line(t) << 31)) & 0xFFFFFFFF
        elif i.op == "jmp":
            if len(i.args) == 1:
                nxt = prog.labels[str(i.args[0])]
            elif i.args[0] == "x_dec":
                if x != 0:
                    nxt = prog.labels[str(i.args[1])]
                x = (x - 1) & 0xFFFFFFFF
            elif i.args[0] == "pin" and line(t):
                nxt = prog.labels[str(i.args[1])]
        elif i.op == "push":
            pushed.append(isr)
            isr = 0
        elif i.op == "pull":
            if not fifo:
                tick(1)
                continue
            osr = fifo.pop(0)
        elif i.op == "out":
            pin, osr = osr & 1, osr >> 1
        tick(1 + i.delay)
        pc = nxt
    return pushed, wave


def waveform(frames: list[tuple[int, int]], idle: int = 20) -> Callable[[int], int]:
    """(word, stop bit) frames at 8 cycles per bit after `idle` cycles of idle-high line."""
    bits: list[int] = [1] * idle
    for w, stop in frames:
        bits += [0] + [(w >> k) & 1 for k in range(9)] + [stop] + [1] * 3
    levels = [b for b in bits for _ in range(CYCLES_PER_BIT)]
    return lambda t: levels[t] if t < len(levels) else 1


@settings(max_examples=60, deadline=None)
@given(st.lists(words := st.integers(0, 0x1FF), min_size=1, max_size=4))
def test_rx_program_pushes_each_word(ws: list[int]) -> None:
    line = waveform([(w, 1) for w in ws])
    pushed, _ = run(RP2.mdb_rx, (20 + 14 * len(ws)) * CYCLES_PER_BIT + 40, line)
    assert [mdb_bits.pio_rx_word(f) for f in pushed] == ws


@settings(max_examples=30, deadline=None)
@given(words, words)
def test_rx_program_drops_a_word_without_stop_bit(bad: int, good: int) -> None:
    line = waveform([(bad, 0), (good, 1)])
    pushed, _ = run(RP2.mdb_rx, (20 + 28) * CYCLES_PER_BIT + 40, line)
    assert [mdb_bits.pio_rx_word(f) for f in pushed] == [good]


@settings(max_examples=60, deadline=None)
@given(st.lists(words, min_size=1, max_size=4))
def test_tx_program_sends_start_9_bits_stop(ws: list[int]) -> None:
    _, wave = run(RP2.mdb_tx, 8 * CYCLES_PER_BIT + 12 * CYCLES_PER_BIT * len(ws),
                  tx_fifo=[mdb_bits.pio_tx_fifo(w) for w in ws])
    got, t = [], 0
    while len(got) < len(ws):  # a UART receiver: find the start bit, sample mid-bit
        t = wave.index(0, t)
        mid = [t + CYCLES_PER_BIT * k + CYCLES_PER_BIT // 2 for k in range(11)]
        bits = [wave[m] for m in mid]
        assert bits[0] == 0 and bits[10] == 1, bits  # start and stop bit
        got.append(sum(b << k for k, b in enumerate(bits[1:10])))
        t = mid[10]
    assert got == ws
    assert wave[-1] == 1  # idle high once the FIFO is empty
