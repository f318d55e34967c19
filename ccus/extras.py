"""Optional dependencies and the install extra that brings each: one clear line, no traceback.

A device installs `ccus-touch` alone (what an agent needs); the sink, the operator's tools,
PC/SC readers and the tests come with extras (pyproject.toml). Code anywhere imports an
optional module where it needs it; `ccus.cli` turns the ModuleNotFoundError into one line.
"""

from __future__ import annotations

# top-level module -> (the package as pip names it, the extras that install it)
EXTRA_OF: dict[str, tuple[str, tuple[str, ...]]] = {
    "psycopg": ("psycopg", ("sink",)),
    "psycopg_binary": ("psycopg", ("sink",)),
    "matplotlib": ("matplotlib", ("sink",)),
    "tqdm": ("tqdm", ("sink", "ops")),
    "prometheus_client": ("prometheus-client", ("metrics", "sink")),
    "smartcard": ("pyscard", ("pcsc",)),
    "hypothesis": ("hypothesis", ("test",)),
    "pytest": ("pytest", ("test",)),
}
# the `ccus` command -> the extra it belongs to, when a module comes with several
EXTRA_OF_COMMAND = {"agent": "metrics", "sink": "sink", "report": "sink", "ops": "ops"}


class MissingExtra(Exception):
    """An optional dependency is not installed; the message says which extra installs it."""

    @classmethod
    def for_module(cls, exc: ModuleNotFoundError, command: str | None = None) -> Exception:
        """The one-line error for a missing module, or `exc` itself when it is not optional."""
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            return exc
        dist, extras = EXTRA_OF[top]
        mine = EXTRA_OF_COMMAND.get(command or "")
        extra = mine if mine in extras else extras[0]
        return cls(f"{dist} is not installed; install it with: pip install 'ccus-touch[{extra}]'")
