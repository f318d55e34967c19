"""The firmware's own tests under the real MicroPython unix port (tight heap), and under CPython."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MICROPYTHON = Path(sys.executable).parent / "micropython"
SCRIPT = ROOT / "tests" / "mpy" / "test_frame_mpy.py"
N_TESTS = 9


def _micropython(args: list[str], env: dict[str, str], timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
    """The unix port with the tight heap a small board has."""
    return subprocess.run([str(MICROPYTHON), "-X", "heapsize=192K", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check(out: str, rc: int) -> None:
    assert rc == 0, out
    assert "Traceback" not in out, out
    assert "FAIL" not in out, out
    assert out.count("PASS ") == N_TESTS, out
    assert f"ALL OK {N_TESTS}" in out, out


def test_codec_under_micropython_unix_port(tmp_path):
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run ./dev.sh setup"
    env = {
        "MICROPYPATH": ":".join(map(str, (ROOT / "firmware", ROOT / "tests" / "mpy",
                                          ROOT / "sim" / "board", ".frozen"))),
        "CCUS_TMP": str(tmp_path),
        "PATH": os.environ.get("PATH", ""),
    }
    p = _micropython([str(SCRIPT)], env)
    out = p.stdout + p.stderr
    ver = subprocess.run(
        [str(MICROPYTHON), "-c", "import sys; print(sys.implementation.name)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ver.stdout.strip() == "micropython"
    _check(out, p.returncode)


def test_codec_tests_also_pass_on_cpython(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "firmware"), CCUS_TMP=str(tmp_path))
    p = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    _check(p.stdout + p.stderr, p.returncode)


def test_a_failing_check_is_seen(tmp_path):
    """The harness notices a failure: a broken frame module makes the run fail."""
    bad = tmp_path / "fw"
    bad.mkdir()
    src = (ROOT / "firmware" / "frame.py").read_text()
    (bad / "frame.py").write_text(
        src.replace("crc = 0xFFFF", "crc = 0xFFFE", 1).replace(
            "def crc16(data, crc=0xFFFF", "def crc16(data, crc=0xFFFE"
        )
    )
    (bad / "journal.py").write_text((ROOT / "firmware" / "journal.py").read_text())
    p = _micropython([str(SCRIPT)], {"MICROPYPATH": f"{bad}:.frozen", "CCUS_TMP": str(tmp_path)})
    assert p.returncode == 1
    assert "FAIL test_crc" in p.stdout


def test_stand_in_watchdog_resets_a_starved_board(tmp_path):
    """The stand-in WDT that the e2e tests rely on really fires when not fed in time."""
    code = (
        "import machine, time\n"
        "w = machine.WDT(timeout=50)\n"
        "w.feed()\n"
        "time.sleep_ms(120)\n"
        "w.feed()\n"
        "print('survived')\n"
    )
    p = _micropython(["-c", code], {"MICROPYPATH": f"{ROOT / 'sim' / 'board'}:.frozen"},
                     timeout=60)
    assert p.returncode == 3, p.stdout
    assert "WDT RESET" in p.stdout and "survived" not in p.stdout
