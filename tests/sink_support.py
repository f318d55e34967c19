"""Helpers for the sink and report tests: touch factories, a per-test store on either backend,
and stores at an old schema version (the migration tests)."""

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from cloud_sink.model import Policy
from cloud_sink.store import Store, open_store
from cloud_sink.stores import migrations
from cloud_sink.workday import jst_ms
from protocol.reasons import Reason
from protocol.timequality import TimeQuality
from protocol.touch import CardTech, Decision, Role, Touch

SITE = "13100000000001"
SITE2 = "13100000000002"
CENTER = "27200000000001"     # a training center's site ID
NOW = jst_ms(2026, 11, 30, 12)  # the receive time the tests ingest at

DATA_TABLES = ("touches", "dead_letters", "work_history", "training_monthly", "training_course",
               "courses", "vending_ledger", "devices", "seq_gaps", "sites", "technicians",
               "site_chain", "sites_unregistered", "touch_keys")


def tid(i: int) -> str:
    return f"{10000000000000 + i:014d}"


def touch(seq: int, *, device: str = "gate-01", site: str = SITE, role: str = "gate",
          ts: int = 0, who: int | None = 1, dir: str = "in", decision: str = "allow",
          facts: dict[str, str | int | bool] | None = None) -> Touch:
    r = Role(role)
    fx: dict[str, str | int | bool] = {"dir": dir} if r is Role.GATE else {}
    fx.update(facts or {})
    ok = decision == "allow"
    reason = {Role.GATE: Reason.OK, Role.VENDING: Reason.OK,
              Role.TRAINING: Reason.REGISTERED}[r] if ok else Reason.UNKNOWN_CARD
    return Touch(device=device, site=site, role=r, seq=seq,
                 ts_ms=ts or jst_ms(2026, 11, 26, 8), tq=TimeQuality.SYNCED,
                 card=bytes.fromhex(f"012E4CD3{(who or 0):08X}"), card_tech=CardTech.FELICA,
                 tid=tid(who) if who is not None else None, decision=Decision(decision),
                 reason=reason, list_version=3, config_version=1, facts=fx)


@contextmanager
def fresh_store(kind: str, tmp: Path, pg_url: str | None, policy: Policy | None = None
                ) -> Iterator[Store]:
    """An empty store: a new SQLite file, or the module's PostgreSQL database emptied."""
    if kind == "sqlite":
        n = len(list(tmp.glob("store-*.sqlite")))
        store = open_store(tmp / f"store-{n}.sqlite", policy)
    else:
        assert pg_url
        store = open_store(pg_url, policy)
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
            db.execute("UPDATE registry_version SET version = version + 1")
    try:
        yield store
    finally:
        store.close()


def derived(store: Store) -> dict[str, list[tuple[object, ...]]]:
    return {name: store.table(name) for name in
            ("work_history", "training_monthly", "training_course", "vending_ledger")}


def sqlite_at(db: sqlite3.Connection, version: int) -> None:
    """Run SQLite migrations 1..version on `db`, as a store of that version left it."""
    for n, script in enumerate(migrations.SQLITE[:version], start=1):
        db.executescript(script + f";PRAGMA user_version={n};")


def postgres_at(db: psycopg.Connection, version: int) -> None:  # type: ignore[type-arg]
    """Run PostgreSQL migrations 1..version on `db` (autocommit), recording each."""
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
               " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
    for n, script in enumerate(migrations.POSTGRES[:version], start=1):
        for stmt in migrations.statements(script):
            db.execute(stmt)  # type: ignore[call-overload]
        db.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (n,))


class CommitSampler:
    """Samples one row of counts (`sql`, e.g. committed touches) every 50 ms through `url` (a
    multi-host URL: it follows a failover), each stamped before its query, whose snapshot is
    taken after that moment: `samples` = [(monotonic time, *counts)]. `stop.set()` ends it."""

    def __init__(self, url: str, sql: str, params: tuple[object, ...] | None = None) -> None:
        self.url, self.sql, self.params = url, sql, params
        self.samples: list[tuple[float, ...]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        db = None
        while not self.stop.is_set():
            try:
                if db is None or db.closed or db.broken:
                    db = psycopg.connect(self.url, autocommit=True, connect_timeout=1,
                                         options="-c statement_timeout=1000")
                t = time.monotonic()
                row = db.execute(self.sql, self.params).fetchone()  # type: ignore[arg-type]
                if row:
                    self.samples.append((t, *(int(n) for n in row)))
            except psycopg.Error:
                db = None   # the primary is down or moving: connect again through the URL
            time.sleep(0.05)
        if db is not None:
            db.close()
