"""Small process helpers the launcher, the demo and the tests share: stop a child, stop a
process started by an earlier command (by its pid, only while it is still ours), wait for a state."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def stop_process(proc: "subprocess.Popen[bytes] | subprocess.Popen[str] | None", *,
                 terminate: bool = True, timeout: float = 5.0) -> None:
    """SIGTERM (unless the child is already stopping by itself), then SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    if terminate:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def cmdline_has(pid: int, *args: str) -> bool:
    """Is `pid` a live process with each of `args` as a whole argument of its command line?
    (A pid saved by `ccus cluster up` and reused since by another program is not ours.)"""
    if pid <= 0:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return all(a.encode() in cmd for a in args)


def stop_pid(pid: int, still_ours: Callable[[], bool], *, timeout: float = 10.0,
             poll_s: float = 0.05) -> None:
    """SIGTERM a process that is not our child (started detached by an earlier command), then
    SIGKILL if `still_ours()` after `timeout` s; nothing is signalled once it is not ours."""
    if not still_ours():
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while still_ours() and time.monotonic() < deadline:
        time.sleep(poll_s)
    if still_ours():
        os.kill(pid, signal.SIGKILL)


def poll_until(cond: Callable[[], object], timeout: float, poll_s: float = 0.01) -> bool:
    """Poll `cond` until it is true (-> True) or `timeout` seconds pass (-> False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def wait_until(cond: Callable[[], object], timeout: float, what: str, poll_s: float = 0.01) -> None:
    """Poll `cond` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    if not poll_until(cond, timeout, poll_s):
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
