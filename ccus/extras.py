"""Optional dependencies and the install extra that brings each: one clear line, no traceback.

A device installs `ccus-touch` alone (what an agent needs); the sink, the operator's tools,
PC/SC readers and the tests come with extras (pyproject.toml). Code anywhere imports an
optional module where it needs it; `ccus.cli` turns the ModuleNotFoundError into one line.
"""

from __future__ import annotations

# top-level module -> (extra(s) that install it, the package as pip names it)
EXTRA_OF: dict[str, tuple[str, str]] = {
    "psycopg": ("sink", "psycopg"),
    "psycopg_binary": ("sink", "psycopg"),
    "matplotlib": ("sink", "matplotlib"),
    "tqdm": ("sink] or ccus-touch[ops", "tqdm"),
    "smartcard": ("pcsc", "pyscard"),
    "hypothesis": ("test", "hypothesis"),
    "pytest": ("test", "pytest"),
}


class MissingExtra(Exception):
    """An optional dependency is not installed; the message says which extra installs it."""

    @classmethod
    def for_module(cls, exc: ModuleNotFoundError) -> Exception:
        """The one-line error for a missing module, or `exc` itself when it is not optional."""
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            return exc
        extra, dist = EXTRA_OF[top]
        return cls(f"{dist} is not installed; install it with: pip install 'ccus-touch[{extra}]'")
