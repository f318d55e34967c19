"""Every firmware file compiles with mpy-cross for the RP2040 (armv6m) and ESP32 (xtensawin)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = sorted((ROOT / "firmware").glob("*.py"))


def test_there_is_firmware():
    names = {p.name for p in FIRMWARE}
    assert {"frame.py", "app.py", "journal.py", "board_config.py", "main.py", "mdb.py",
            "vend_mdb.py", "mdb_bits.py", "mdb_uart_rp2.py", "mdb_uart_esp32.py"} <= names


@pytest.mark.parametrize("march", ["armv6m", "xtensawin"])
@pytest.mark.parametrize("src", FIRMWARE, ids=lambda p: p.name)
def test_mpy_cross_compiles(src, march, tmp_path):
    out = tmp_path / (src.stem + ".mpy")
    p = subprocess.run(
        [sys.executable, "-m", "mpy_cross", f"-march={march}", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    data = out.read_bytes()
    assert data[:1] == b"M" and len(data) > 16


def test_mpy_cross_rejects_cpython_only_syntax(tmp_path):
    """The check can fail: a syntax error is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n    pass\n")
    p = subprocess.run(
        [sys.executable, "-m", "mpy_cross", "-march=armv6m", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
