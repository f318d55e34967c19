"""The store tier: a lost PostgreSQL connection, the pg_auto_failover pair (broker/pgha.py,
`ccus cluster up --pg`), and kill -9 of the primary under steady load through the sink."""

from pathlib import Path

import psycopg
from sink_support import NOW, fresh_store, touch

from cloud_sink.store import Store


def _kill_backend(store: Store, url: str) -> None:
    """Terminate the store's server process from another connection (what a failover or a
    restart of the server does to it)."""
    pid = store._db.info.backend_pid  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _retrying(fn, attempts: int = 3):  # type: ignore[no-untyped-def]
    """What the sink's writer does with a store error: the same batch again (no sleep here)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:  # noqa: BLE001
            if i == attempts - 1:
                raise
    raise AssertionError


def test_a_store_whose_connection_was_cut_reconnects_and_the_batch_retried_counts_once(
        tmp_path: Path, pg_url: str) -> None:
    with fresh_store("postgres", tmp_path, pg_url) as s:
        assert s.ingest([touch(1), touch(2, dir="out")], now_ms=NOW).stored == 2
        _kill_backend(s, pg_url)
        res = _retrying(lambda: s.ingest([touch(2, dir="out"), touch(3)], now_ms=NOW))
        assert (res.stored, res.repeated) == (1, 1)
        _kill_backend(s, pg_url)      # reads reconnect too (the ledger reads between batches)
        assert _retrying(lambda: s.counts())["touches"] == 3
        assert sum(r[5] for r in s.table("work_history")) == 3
