"""mypy checks firmware/ against the MicroPython rp2 and esp32 board stubs, kept out of the main venv.

The stubs are pip-installed into .venv/mpy-stubs/<port> (cached); if they cannot be installed the
test fails with the pip output: no skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / ".venv" / "mpy-stubs"
CONFIG = ROOT / "tests" / "mpy" / "mypy-firmware.ini"
MODULES = ["frame.py", "journal.py", "app.py", "board_config.py", "main.py", "mdb.py", "vend_mdb.py",
           "mdb_bits.py"]
# each 9-bit UART adapter imports its own port's modules (rp2 exists only in the rp2 stubs)
PORT_MODULES = {"rp2": ["mdb_uart_rp2.py"], "esp32": ["mdb_uart_esp32.py"]}


def stubs_for(port: str) -> Path:
    target = STUBS / port
    if (target / "machine.pyi").exists():
        return target
    pkg = f"micropython-{port}-stubs"
    p = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-input", "--target", str(target), pkg],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if p.returncode != 0 or not (target / "machine.pyi").exists():
        pytest.fail(
            f"could not install {pkg} into {target} (needed to type-check the firmware):\n"
            f"{p.stdout}\n{p.stderr}"
        )
    return target


def run_mypy(port: str, src: Path) -> subprocess.CompletedProcess[str]:
    stubs = stubs_for(port)
    env = dict(os.environ, MYPYPATH=str(stubs))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(CONFIG),
            "--custom-typeshed-dir",
            str(stubs),
            "--cache-dir",
            str(STUBS / f".mypy_cache_{port}"),
            *MODULES,
            *PORT_MODULES[port],
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("port", ["rp2", "esp32"])
def test_firmware_type_checks_against_board_stubs(port):
    p = run_mypy(port, ROOT / "firmware")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"no issues found in {len(MODULES) + len(PORT_MODULES[port])} source files" in p.stdout


def test_stubs_stay_out_of_the_main_environment():
    p = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('machine'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.stdout.strip() == "None"


def test_mypy_catches_a_misused_board_api(tmp_path):
    """The check can fail: a call the rp2 machine stubs do not have is reported."""
    src = tmp_path / "fw"
    shutil.copytree(ROOT / "firmware", src)
    app = src / "app.py"
    app.write_text(app.read_text() + "\n\ndef _bad():\n    machine.WDT(timeout=100).kick()\n")
    p = run_mypy("rp2", src)
    assert p.returncode != 0
    assert "kick" in p.stdout and "app.py" in p.stdout
