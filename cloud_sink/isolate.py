"""A batch the store refuses for its own data: halve it until the refused touches stand alone.

The writer keeps a batch and retries it while the store is down (connection, lock, full disk).
An error about the data itself (a constraint, a value the column type cannot hold) would come
back on every retry and hold every good touch behind it; those errors are found by halving
the batch, and each touch the store still refuses on its own is kept as a `store_refused` dead
letter with its bytes.
"""

import logging
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from cloud_sink.model import DeadLetter, IngestResult

log = logging.getLogger(__name__)

T = TypeVar("T")


def _refused_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.IntegrityError, sqlite3.DataError]
    try:
        import psycopg
    except ImportError:  # SQLite-only install
        return tuple(errors)
    return (*errors, psycopg.DataError, psycopg.IntegrityError)


# the store refuses the data, not the moment: retrying the same batch cannot help
REFUSED = _refused_errors()


def write_isolating(write: Callable[[list[T], list[DeadLetter]], IngestResult], items: list[T],
                    sources: list[tuple[str, bytes]], dead: list[DeadLetter]
                    ) -> tuple[IngestResult, list[T], list[DeadLetter]]:
    """write(items, dead) in one transaction; if the store refuses the batch's data, store its
    halves apart, down to single touches.
    -> (counts, the items written: stored or repeated, the `store_refused` dead letters).

    `sources[i]` is the (topic, payload) items[i] came from, kept in its dead letter. Any other
    error (the store is down) goes to the caller, which keeps the whole batch for a retry.
    """
    try:
        return write(items, dead), items, []
    except REFUSED as exc:
        if not items:
            raise  # the dead letters alone: nothing of the batch's to set apart
        if len(items) == 1:
            topic, payload = sources[0]
            log.warning("sink: the store refuses a touch on %s; dead-lettered: %s", topic, exc)
            letter = DeadLetter(topic, payload, "store_refused", f"{type(exc).__name__}: {exc}"[:300])
            return write([], [*dead, letter]), [], [letter]
        log.warning("sink: the store refuses a batch of %d (%s); storing its halves apart",
                    len(items), type(exc).__name__)
    mid = len(items) // 2
    res, kept, refused = write_isolating(write, items[:mid], sources[:mid], dead)
    rest, kept_rest, refused_rest = write_isolating(write, items[mid:], sources[mid:], [])
    res.add(rest)
    return res, kept + kept_rest, refused + refused_rest
