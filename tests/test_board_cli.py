"""`ccus board simulate`: the documented way to try a site without a controller board.

The command runs the real firmware under the MicroPython unix port; the test drives it as an
agent would (edge/board.py over the printed pty) and as an integrator would (typed lines).
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.procs import poll_until
from edge.board import BoardLink
from sim.board.cli import describe, parse_command
from sim.board.process import DOOR, EMERGENCY, GATE

CCUS = Path(sys.executable).parent / "ccus"


def test_typed_commands() -> None:
    assert parse_command("door open") == ("set", str(DOOR), "0")
    assert parse_command("  Door  CLOSE ") == ("set", str(DOOR), "1")
    assert parse_command("emergency on") == ("set", str(EMERGENCY), "0")
    assert parse_command("walk off") == ("walk", "off")
    assert parse_command("exit") == ("quit",)
    assert parse_command("open the door") is None
    assert describe(GATE, 1) == "gate relay (entry) on"


@given(st.text(max_size=40))
def test_any_typed_line_is_a_command_or_none(line: str) -> None:
    cmd = parse_command(line)
    assert cmd is None or cmd[0] in ("quit", "kill", "start", "set", "walk")


@pytest.mark.e2e
def test_simulated_gate_board_opens_for_a_pulse_and_obeys_typed_lines(tmp_path: Path) -> None:
    p = subprocess.Popen([str(CCUS), "board", "simulate", "--kind", "gate", "--data",
                          str(tmp_path), "--seconds", "60"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdin and p.stdout
    lines: list[str] = []
    try:
        first = p.stdout.readline()
        assert first.startswith("board (gate) on /dev/"), first + (p.stderr.read() if p.stderr else "")
        port = first.split()[3].rstrip(":")
        link = BoardLink(port)
        try:
            assert link.wait_boot(10) is not None or link.boots, "no BOOT notice from the board"
            link.gate_pulse(200)
            link.status(2.0)  # answered after the pulse request: the pulse is under way
            time.sleep(0.6)
        finally:
            link.close()
        p.stdin.write("quit\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=20)
        lines = [first, *out.splitlines()]
    finally:
        if p.poll() is None:
            p.terminate()  # SIGTERM: the command stops its board before it exits
            p.wait(timeout=20)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "gate relay (entry) on" in lines and "gate relay (entry) off" in lines, lines


@pytest.mark.e2e
def test_board_simulate_stops_by_itself(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = subprocess.run([str(CCUS), "board", "simulate", "--kind", "vending", "--data",
                        str(tmp_path), "--seconds", "2"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("board (vending) on /dev/")
    assert poll_until(lambda: True, 0.1) and time.monotonic() - t0 < 30


@pytest.mark.e2e
def test_sigterm_stops_the_board_too(tmp_path: Path) -> None:
    p = subprocess.Popen([str(CCUS), "board", "simulate", "--data", str(tmp_path)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout
    assert p.stdout.readline().startswith("board (gate) on /dev/")
    boards = _descendants(p.pid)  # this command's board (the micropython process tree)
    assert boards, "no board process"
    p.terminate()
    assert p.wait(timeout=20) == 0
    assert poll_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in boards), 10.0), \
        "the board outlived its command"


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: the parent of each)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out: set[int] = set()
    todo = [pid]
    while todo:
        here = todo.pop()
        kids = [c for c, pp in parent.items() if pp == here and c not in out]
        out.update(kids)
        todo += kids
    return out
