"""The PostgreSQL backend (psycopg 3): COPY a batch into a temp stage, insert-or-ignore from it.

Several sinks may write one database: touches go in concurrently; the derivation step takes a
transaction-level advisory lock, so each recomputation sees every touch committed before it.
"""

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from cloud_sink.derive.rows import Row
from cloud_sink.derive.sql import INCREMENTAL
from cloud_sink.model import NoStore, Policy, Rederived, StoreError
from cloud_sink.stores import migrations
from cloud_sink.stores.base import STORE_COLUMNS, SqlStore

_MIGRATE_LOCK = 0x63637573_0001   # 'ccus' 1: one process migrates at a time
_DERIVE_LOCK = 0x63637573_0002    # 'ccus' 2: derivations run one at a time
_REGISTRY_LOCK = 0x63637573_0003  # 'ccus' 3: batches hold it shared, a registry change exclusively
# ('ccus' 4 is the partition maker's, in migrations 6)
_COLS = ", ".join(STORE_COLUMNS)


log = logging.getLogger("ccus.sink")


class StoreUnavailable(StoreError):
    pass


class PostgresStore(SqlStore):
    _KEYS = "touch_keys"  # every stored (device, seq), archived months' too (migrations, 7)

    def __init__(self, url: str, *, policy: Policy | None = None, connect_timeout: int = 10,
                 create: bool = True) -> None:
        super().__init__(policy or Policy())
        self.url = url
        self._connect_timeout = connect_timeout
        self._in_tx = False
        self._db = self._connect()
        if not create:
            row = self._db.execute("SELECT to_regclass('schema_migrations')").fetchone()
            if not row or row[0] is None:
                self._db.close()
                raise NoStore(f"no store in {_redact(url)} (no schema_migrations); create it "
                              "with `ccus sink run --store URL` or `ccus sink import`")
        self._migrate()
        self._session()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, autocommit=True,
                                   connect_timeout=self._connect_timeout)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {_redact(self.url)}: "
                                   f"{exc}") from exc

    def _reconnect_if_lost(self) -> None:
        """Outside a transaction: a lost connection (the server went away, or a failover made
        another host the primary) is replaced by a new one to whichever host of the URL
        accepts writes now (target_session_attrs=read-write in a multi-host URL). The
        transaction that was open when it broke was never committed: its caller retries it
        whole, and (device, seq) identity makes a batch that did commit count as repeated."""
        if self._in_tx or not (self._db.closed or self._db.broken):
            return
        log.warning("sink: the PostgreSQL connection was lost; reconnecting to %s",
                    _redact(self.url))
        with contextlib.suppress(Exception):
            self._db.close()
        self._db = self._connect()
        self._session()

    def _session(self) -> None:
        """The connection's temp tables and ingest function (they live as long as it does)."""
        self._db.execute("CREATE TEMP TABLE stage (LIKE touches) ON COMMIT DELETE ROWS")
        self._db.execute("CREATE TEMP TABLE resite (site TEXT PRIMARY KEY) ON COMMIT DELETE ROWS")
        # the whole write after the COPY in one round trip: fewer waits on the network, and
        # fewer GIL hand-offs to the MQTT thread in the sink process
        body = ";\n".join(INCREMENTAL)
        self._db.execute(f"""
            CREATE FUNCTION pg_temp.ccus_ingest_stage() RETURNS bigint LANGUAGE plpgsql AS $fn$
            DECLARE _stored bigint; _m text;
            BEGIN
                -- identity is touch_keys (device, seq), unpartitioned (migrations, 7):
                -- another sink may store the same touch concurrently: the keys this
                -- transaction inserted (RETURNING) are what it stores and folds in, so each
                -- touch counts once; in key order, so two sinks never wait in a cycle
                WITH ins AS (INSERT INTO touch_keys (device, seq) SELECT device, seq FROM stage
                             ORDER BY device, seq ON CONFLICT DO NOTHING RETURNING device, seq)
                DELETE FROM stage s WHERE NOT EXISTS
                    (SELECT 1 FROM ins WHERE ins.device = s.device AND ins.seq = s.seq);
                -- the first touch of a month makes its partition (and the next month's)
                FOR _m IN SELECT DISTINCT month FROM stage LOOP
                    IF to_regclass(ccus_touch_partition_name(_m)) IS NULL THEN
                        PERFORM ccus_touch_partition(_m);
                    END IF;
                END LOOP;
                INSERT INTO touches ({_COLS}) SELECT {_COLS} FROM stage;
                SELECT count(*) INTO _stored FROM stage;
                PERFORM pg_advisory_xact_lock({_DERIVE_LOCK});
                {body};
                RETURN _stored;
            END $fn$""")  # type: ignore[call-overload]

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("SELECT pg_advisory_lock(%s)", (_MIGRATE_LOCK,))
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                                 "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL"
                                 " DEFAULT now())")
                row = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
                                       ).fetchone()
                version = int(row[0]) if row else 0
                for n, script in enumerate(migrations.POSTGRES[version:], start=version + 1):
                    with self._db.transaction():
                        for stmt in migrations.statements(script):
                            self._db.execute(stmt)  # type: ignore[call-overload]
                        self._db.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (n,))
            finally:
                self._db.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK,))

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            return int(row[0]) if row else 0

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._reconnect_if_lost()
        self._in_tx = True
        try:
            with self._db.transaction():
                yield
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from exc
        finally:
            self._in_tx = False

    def _lost(self, exc: psycopg.OperationalError) -> Exception:
        """A connection that broke under a statement: the expected fault of a failover or a
        server restart, as one line (the caller retries; the next use reconnects)."""
        if not (self._db.closed or self._db.broken):
            return exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailable(f"lost the connection to PostgreSQL at {_redact(self.url)} "
                                f"({first}); the transaction is retried whole (a batch whose "
                                "commit got through counts as repeated)")

    def _before_derive(self) -> None:
        # held to commit: a later derivation of the same key sees this batch's touches
        self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_DERIVE_LOCK,))

    def _registry_lock(self, exclusive: bool) -> None:
        # held to commit: a registry change waits for the batches cut with the old rules, and
        # a batch that starts after it reads the new rules
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        self._db.execute(f"SELECT {fn}(%s)", (_REGISTRY_LOCK,))  # type: ignore[call-overload]

    def _before_moving(self, months: set[str]) -> None:
        # a re-cut touch may move to a month nobody has stored yet
        for m in sorted(months):
            self._db.execute("SELECT ccus_touch_partition(%s)", (m,))

    def archive(self, before: str) -> list[str]:
        """Detach every month's partition before `before` (YYYY-MM); -> the archived tables'
        names (archived_touches_YYYY_MM: dump and drop them at will). Their touches' keys stay,
        so a late resend still counts as repeated; the derived rows stay as they are."""
        with self._lock, self._tx():
            return [r[0] for r in self._db.execute("SELECT ccus_archive_touches(%s)",
                                                   (before,)).fetchall()]

    def rederive_all(self) -> Rederived:
        """As SqlStore's, but refused while months are archived: the derived tables are emptied
        first, and detached touches would not come back into them."""
        archived = [r[0] for r in self._rows("SELECT month FROM touch_archive ORDER BY 1")]
        if archived:
            raise StoreError(f"{_redact(self.url)}: months {', '.join(archived)} are archived; a "
                             "full rederive would drop their derived rows: attach them again "
                             "first (docs/sink.md, Partitions)")
        return super().rederive_all()

    def partitions(self) -> list[tuple[str, str, int]]:
        """(table, month, touches) of each attached month, oldest first."""
        return [(t, m, int(n)) for t, m, n in self._rows(
            "SELECT c.relname, substring(pg_get_expr(c.relpartbound, c.oid) from $q$'([^']*)'$q$),"
            " c.reltuples::bigint FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'touches'::regclass ORDER BY 2")]

    def _store_batch(self, rows: list[Row]) -> int:
        self._load_stage(rows)
        row = self._db.execute("SELECT pg_temp.ccus_ingest_stage()").fetchone()
        return int(row[0]) if row else 0

    def _x(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        self._reconnect_if_lost()
        try:
            return self._db.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
        except psycopg.OperationalError as exc:
            if self._in_tx:
                raise  # _tx turns it into one line
            raise self._lost(exc) from exc

    def copy_out(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (),
                 settings: Mapping[str, str] | None = None) -> Iterator[bytes]:
        """The rows of `COPY (sql) TO STDOUT` (text format, psycopg's %s or %(name)s
        parameters), one bytes a row as the server sends it (escaped, ending in a newline): a
        large export streams from the server into its file without a Python object per field.
        `settings`: planner and memory settings for this query only (SET LOCAL)."""
        with self._lock:
            self._reconnect_if_lost()
            try:
                with self._db.transaction(), self._db.cursor() as cur:
                    for name, value in (settings or {}).items():
                        cur.execute("SELECT set_config(%s, %s, true)", (name, value))
                    with cur.copy(f"COPY ({sql}) TO STDOUT", params) as cp:  # type: ignore[arg-type]
                        for row in cp:
                            yield bytes(row)
            except psycopg.OperationalError as exc:
                raise self._lost(exc) from exc

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._db.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), list(rows))  # type: ignore[arg-type]

    def _load_stage(self, rows: list[Row]) -> None:
        with self._db.cursor() as cur, cur.copy(
                f"COPY stage ({', '.join(STORE_COLUMNS)}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db"""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, cred = head.partition("//")
    return f"{scheme}//{cred.split(':', 1)[0]}:***@{tail}"
