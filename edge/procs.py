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


def wait_until(cond: Callable[[], object], timeout: float, what: str, poll_s: float = 0.01) -> None:
    """Poll `cond` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll_s)
