"""bench/bench_serial.py still runs after the rooms moved (it imported a module that was gone)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_bench_serial_runs_small() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_serial.py"), "--n", "200",
                        "--rounds", "5"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "encode" in p.stdout and "Traceback" not in p.stderr
