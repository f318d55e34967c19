"""Small process helpers the launcher, the demo and the tests share: stop a child, wait for a state."""

import subprocess
import time
from collections.abc import Callable


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
