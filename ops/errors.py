"""The error base of ops/: `except OpsError` catches anything an operator's tool raises on purpose.

PkiError (ops/pki.py), MqttError (ops/mqttc.py) and PublishError (ops/mqttc.py) derive
from it and keep their older bases. `one_line()` turns the faults an operator can fix (a file,
a broker, a bad value) into one line on stderr and an exit status, never a traceback.
Imports nothing of ours.
"""

import functools
import sys
from collections.abc import Callable
from typing import Any

EXPECTED = (OSError, ValueError, RuntimeError)  # OpsError subclasses derive from these too


class OpsError(Exception):
    """Anything the operator's tools raise on purpose (PKI, MQTT, list publishing)."""


def one_line(fn: Callable[[Any], int], status: int = 2) -> Callable[[Any], int]:
    """Wrap a command: an expected fault prints `ccus ops: <what>` and returns `status`."""
    @functools.wraps(fn)
    def run(args: Any) -> int:
        try:
            return fn(args)
        except EXPECTED as exc:
            print(f"ccus ops: {exc}", file=sys.stderr)
            return status
    return run
