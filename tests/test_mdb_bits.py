"""The board 9-bit MDB adapter helpers (firmware/mdb_bits.py): hypothesis properties on CPython, the
same checks under the MicroPython unix port, and the ESP32 adapter's per-byte parity switching
against a recording stand-in UART (the real one needs hardware: docs/vending.md)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware import mdb_bits

ROOT = Path(__file__).resolve().parent.parent

MICROPYTHON = Path(sys.executable).parent / "micropython"
SCRIPT = ROOT / "tests" / "mpy" / "test_mdb_bits_mpy.py"

words = st.integers(0, 0x1FF)


def _model():
    # the mpy script holds the PIO shift-register model; import it without running its tests
    src = (SCRIPT.read_text().replace("\nrun(TESTS)\n", "\n").replace("\nimport mdb_bits\n", "\n")
           .replace("\nfrom mpy_runner import run\n", "\n"))
    mod = types.ModuleType("mdb_bits_mpy")
    mod.mdb_bits = mdb_bits  # type: ignore[attr-defined]
    exec(compile(src, str(SCRIPT), "exec"), mod.__dict__)
    return mod


MODEL = _model()


@given(words)
def test_pio_rx_packing_matches_the_shift_register(w: int) -> None:
    fifo = MODEL.pio_rx_model(MODEL.wire_bits(w))
    assert fifo == mdb_bits.pio_rx_fifo(w)
    assert mdb_bits.pio_rx_word(fifo) == w


@given(words, st.integers(0, (1 << 23) - 1))
def test_pio_rx_word_ignores_the_low_isr_bits(w: int, junk: int) -> None:
    assert mdb_bits.pio_rx_word(mdb_bits.pio_rx_fifo(w) | junk) == w


@given(words)
def test_pio_tx_sends_data_lsb_first_then_mode(w: int) -> None:
    assert MODEL.pio_tx_model(mdb_bits.pio_tx_fifo(w)) == MODEL.wire_bits(w)


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=0x200)))
def test_out_of_range_words_are_refused(w: int) -> None:
    with pytest.raises(mdb_bits.BitsError):
        mdb_bits.pio_tx_fifo(w)
    with pytest.raises(mdb_bits.BitsError):
        mdb_bits.tx_parity(w)


@given(words, st.sampled_from([0, 1]))
def test_parity_choice_makes_the_parity_bit_the_mode_bit(w: int, rx_parity: int) -> None:
    assert mdb_bits.parity_bit(w & 0xFF, mdb_bits.tx_parity(w)) == w >> 8
    err = mdb_bits.parity_bit(w & 0xFF, rx_parity) != w >> 8
    assert mdb_bits.rx_mode(w & 0xFF, rx_parity, err) == w >> 8


@given(st.lists(st.lists(st.integers(0x01, 0xFE), min_size=1, max_size=36), min_size=1,
                max_size=8))
def test_gap_framer_marks_the_first_byte_of_each_block(blocks: list[list[int]]) -> None:
    f = mdb_bits.GapFramer(2)
    now, got = 0, []
    for b in blocks:
        now += 10  # an idle gap between blocks
        got += f.feed(bytes(b), now)
    assert got == [(0x100 if i == 0 else 0) | x for b in blocks for i, x in enumerate(b)]


def test_helpers_under_micropython_unix_port() -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run ./dev.sh setup"
    env = {"MICROPYPATH": f"{ROOT / 'firmware'}:.frozen", "PATH": os.environ.get("PATH", "")}
    p = subprocess.run([str(MICROPYTHON), "-X", "heapsize=192K", str(SCRIPT)], env=env,
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "FAIL" not in out and out.count("PASS ") == 5 and "ALL OK 5" in out, out


class _Uart:
    """A stand-in machine.UART that records what would go on the wire: (byte, parity bit)."""

    def __init__(self, _id: int, **kw: object) -> None:
        self.parity = kw.get("parity")
        self.wire: list[tuple[int, int]] = []
        self.rx = b""
        self.flushed = 0

    def init(self, **kw: object) -> None:
        assert self.flushed, "parity changed with a byte still in the shift register"
        self.parity = kw["parity"]

    def flush(self) -> None:
        self.flushed += 1

    def write(self, b: bytes) -> None:
        self.flushed = 0
        for x in b:
            self.wire.append((x, mdb_bits.parity_bit(x, int(str(self.parity)))))

    def any(self) -> int:
        return len(self.rx)

    def read(self, n: int) -> bytes:
        out, self.rx = self.rx[:n], self.rx[n:]
        return out


@given(st.lists(words, min_size=1, max_size=40))
def test_esp32_adapter_sends_each_mode_bit_as_the_parity_bit(ws: list[int]) -> None:
    machine = types.ModuleType("machine")
    machine.UART = _Uart  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("machine", "mdb_bits")}
    sys.modules["machine"] = machine  # the firmware imports its siblings flat, as on the board
    sys.modules["mdb_bits"] = mdb_bits
    try:
        esp = importlib.reload(importlib.import_module("firmware.mdb_uart_esp32"))
        port = esp.Esp32Words({"mdb_uart": 1, "mdb_tx": 4, "mdb_rx": 5})
        port.write_words(ws, 0)
        assert port.uart.wire == [(w & 0xFF, w >> 8) for w in ws]
        port.uart.rx = b"\x12\x12"
        assert port.read_words(100) == [0x112, 0x12]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_board_configs_select_their_adapter_and_fit_none() -> None:
    from firmware import board_config

    rp2, esp = board_config.for_platform("rp2"), board_config.for_platform("esp32")
    assert (rp2["mdb_adapter"], rp2["mdb_uart"]) == ("rp2_pio", None)
    assert (esp["mdb_adapter"], esp["mdb_uart"]) == ("esp32_parity", None)


@pytest.mark.parametrize("kind, cls", [("pty", "PtyWords"), ("esp32_parity", "Esp32Words"),
                                       (None, "PtyWords"), ("9bit", None)])
def test_open_words_picks_the_adapter(kind: str | None, cls: str | None) -> None:
    from firmware import frame, mdb

    machine = types.ModuleType("machine")
    machine.UART = _Uart  # type: ignore[attr-defined]
    names = ("machine", "mdb_bits", "mdb", "frame", "mdb_uart_esp32")
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update({"machine": machine, "mdb_bits": mdb_bits, "mdb": mdb, "frame": frame})
    try:  # the board imports its adapter flat, by name
        sys.modules["mdb_uart_esp32"] = importlib.reload(
            importlib.import_module("firmware.mdb_uart_esp32"))
        vend = importlib.reload(importlib.import_module("firmware.vend_mdb"))
        cfg = {"mdb_uart": 1} if kind is None else {"mdb_uart": 1, "mdb_adapter": kind}
        if cls is None:
            with pytest.raises(mdb.MdbError, match="unknown mdb_adapter"):
                vend.open_words(cfg)
        else:
            assert type(vend.open_words(cfg)).__name__ == cls
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
