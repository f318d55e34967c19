"""What both SQL backends share: the ingest transaction, the derivation calls and the read queries.

A backend supplies a connection, a write transaction, the parameter style and how a batch is
loaded into its `stage` table (executemany on SQLite, COPY on PostgreSQL).

The work day is derived, never an input: in the write transaction each row is cut with its
site's rules from the registry (cloud_sink.registry), the cut goes on the row (`cut_hour`), and
a registry change re-derives exactly the sites it changed from their stored touches. A writer
keeps the rules in memory and reloads them when `registry_version` moved; on PostgreSQL a
batch holds a shared advisory lock that a registry change takes exclusively, so no batch cut
with old rules commits after the change re-derived its site.
"""

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from cloud_sink.deadletters import dead_letter_key
from cloud_sink.derive.rows import COLUMNS, Row, day_of, time_flag, touch_row
from cloud_sink.derive.sql import DERIVED_COLUMNS, DERIVED_TABLES, FULL, INCREMENTAL, SITES
from cloud_sink.model import (
    Course,
    CourseStats,
    DeadLetter,
    Device,
    IngestResult,
    Policy,
    Rederived,
    TrainingMonth,
    VendingRow,
    WorkDay,
)
from cloud_sink.registry import ChainLink, SiteRule, Technician, by_site, cut_for
from protocol import topics
from protocol.touch import Touch, encode

# a store row: the row builder's columns and the cut the store cut it with
STORE_COLUMNS = (*COLUMNS, "cut_hour")
_COLS = ", ".join(STORE_COLUMNS)
_FLAG = COLUMNS.index("flag")
_SITE, _ROLE, _TS = COLUMNS.index("site"), COLUMNS.index("role"), COLUMNS.index("ts_ms")
_DAY, _MONTH = COLUMNS.index("work_day"), COLUMNS.index("month")
_RECEIVED = COLUMNS.index("received_ms")
_SITE_COLS = ("site, name, kind, prefecture, main_contractor, day_cut_hour, valid_from,"
              " fold_persons")
log = logging.getLogger("ccus.sink")
_INSERT = (f"INSERT INTO touches ({_COLS}) SELECT {_COLS} FROM stage WHERE true{{order}}"
           " ON CONFLICT (device, seq) DO NOTHING")
INSERT_FROM_STAGE = _INSERT.format(order="")
# PostgreSQL: in key order, so two writers storing overlapping batches take the key locks in
# one order and neither can wait on the other in a cycle (a deadlock: one batch retried)
INSERT_FROM_STAGE_IN_KEY_ORDER = _INSERT.format(order=" ORDER BY device, seq")
# leaves in `stage` only touches not stored yet (the writer holds the database's write lock)
DROP_STORED_FROM_STAGE = ("DELETE FROM stage WHERE EXISTS (SELECT 1 FROM touches t"
                          " WHERE t.device = stage.device AND t.seq = stage.seq)")


def first_of_each(rows: list[Row]) -> list[Row]:
    """The batch with one row per (device, seq), the first one; a repeat inside a batch must
    not count twice in the folded work history."""
    keys = {(r[0], r[1]) for r in rows}
    if len(keys) == len(rows):
        return rows
    first: dict[tuple[object, object], Row] = {}
    for r in rows:
        first.setdefault((r[0], r[1]), r)
    return list(first.values())


def month_bounds(month: str) -> tuple[str, str]:
    """'YYYY-MM' -> the first and a last possible work day, for a range over ISO dates."""
    if len(month) != 7 or month[4] != "-" or not (month[:4] + month[5:]).isdigit():
        raise ValueError(f"month must be YYYY-MM, not {month!r}")
    return f"{month}-01", f"{month}-31"


class SqlStore:
    """The Store protocol on a DB-API connection; subclasses fill in the dialect."""

    url: str
    _KEYS = "touches"  # the table of stored (device, seq): PostgreSQL keeps them apart

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._lock = threading.RLock()
        self._rules: dict[str, list[SiteRule]] = {}   # the site registry, by site
        self._rules_version = -1
        self._unregistered: set[str] = set()          # sites already reported as unregistered
        # (site, training?, UTC hour) -> (cut, work day, (cut,)); emptied with a new registry
        self._cut_memo: dict[tuple[object, bool, int], tuple[int, str, tuple[int]]] = {}

    # -- dialect hooks -------------------------------------------------------------------------
    def _tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _x(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def _load_stage(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def _before_derive(self) -> None:
        """Called in the write transaction just before the derivation statements."""

    def _before_moving(self, months: set[str]) -> None:
        """In the write transaction, before re-cut touches move to these months."""

    def _registry_lock(self, exclusive: bool) -> None:
        """In the write transaction: a batch holds the registry shared, a change exclusively
        (SQLite's write lock already makes every write transaction exclusive)."""

    def _store_batch(self, rows: list[Row]) -> int:
        """In the open write transaction: stage the rows (one per key), keep only the ones not
        stored yet, insert them, derive from them. -> stored."""
        self._x("DELETE FROM stage")
        self._load_stage(rows)
        self._x(DROP_STORED_FROM_STAGE)
        stored = int(self._x(INSERT_FROM_STAGE).rowcount)
        self._before_derive()
        for sql in INCREMENTAL:
            self._x(sql)
        return stored

    def close(self) -> None:
        raise NotImplementedError

    # -- writing ------------------------------------------------------------------------------
    @property
    def cut_hour(self) -> int:
        return self.policy.cut_hour

    def ingest(self, touches: Iterable[Touch], dead: Iterable[DeadLetter] = (), *,
               now_ms: int | None = None) -> IngestResult:
        """Store a batch in one transaction: touches, dead letters, derived rows. Then commit.

        Touches already stored are ignored (identity is (device, seq)); a touch whose clock is
        beyond the policy's skew is stored with a flag and kept out of the derived tables.
        """
        now = int(time.time() * 1000) if now_ms is None else now_ms
        batch, letters = list(touches), list(dead)
        with self._lock, self._tx():
            if self.policy.require_registered and batch:
                batch = self._drop_unregistered(batch, letters)
            return self._ingest_rows([touch_row(t, now, self.policy) for t in batch], letters,
                                     now)

    def ingest_rows(self, rows: list[Row], dead: Iterable[DeadLetter], now_ms: int) -> IngestResult:
        """ingest() for touches already mapped to rows (derive.rows.touch_row, or the sink's
        fast path) with received_ms = now_ms. Not for a policy that requires registration."""
        if self.policy.require_registered:
            raise ValueError("ingest_rows: the registered-only policy needs ingest()")
        with self._lock, self._tx():
            return self._ingest_rows(rows, list(dead), now_ms)

    def _ingest_rows(self, rows: list[Row], letters: list[DeadLetter], now: int) -> IngestResult:
        res = IngestResult()
        if rows:
            self._registry_lock(exclusive=False)
            self._load_rules()
            res.stored = self._store_batch(self._cut_rows(first_of_each(rows), now))
            res.repeated = len(rows) - res.stored
            for r in rows:
                if r[_FLAG] is not None:
                    res.flagged += 1
                    off = r[_RECEIVED] - r[_TS]  # type: ignore[operator]
                    if r[_FLAG] == "ts_past":
                        res.past, res.past_ms_max = res.past + 1, max(res.past_ms_max, off)
                    else:
                        res.future, res.future_ms_max = res.future + 1, max(res.future_ms_max, -off)
        if letters:
            keys = [dead_letter_key(d) for d in letters]
            self._many("INSERT INTO dead_letters (received_ms, topic, payload, reason, detail,"
                       " device, seq) VALUES (?,?,?,?,?,?,?)",
                       [(now, d.topic, d.payload, d.reason, d.detail, k and k[1], k and k[2])
                        for d, k in zip(letters, keys, strict=True)])
        res.dead = len(letters)
        return res

    def _drop_unregistered(self, batch: list[Touch], letters: list[DeadLetter]) -> list[Touch]:
        devices = sorted({t.device for t in batch})
        marks = ",".join("?" * len(devices))
        known = {r[0] for r in self._x(f"SELECT device FROM devices WHERE device IN ({marks})",
                                       devices).fetchall()}
        keep = []
        for t in batch:
            if t.device in known:
                keep.append(t)
            else:
                letters.append(DeadLetter(topics.touch(t.site, t.device), encode(t),
                                          "unregistered_device",
                                          f"device {t.device} is not in the device registry"))
        return keep

    # -- the site registry: rules, cutting, re-deriving --------------------------------------
    def _load_rules(self) -> None:
        """In the transaction: reload the registry when its version moved."""
        version = int(self._x("SELECT version FROM registry_version").fetchone()[0])
        if version != self._rules_version:
            self._rules = by_site(SiteRule(*r) for r in self._x(
                f"SELECT {_SITE_COLS} FROM sites").fetchall())
            self._unregistered = {r[0] for r in self._x(
                "SELECT site FROM sites_unregistered").fetchall()}
            self._cut_memo.clear()
            self._rules_version = version

    def _cut_rows(self, rows: list[Row], now: int) -> list[Row]:
        """Each row cut with its site's rules, the cut appended; a site seen for the first time
        outside the registry is reported once. The row builders (derive.rows, the sink's fast
        path) cut at the store's policy cut, so a row of an unregistered site only gains it."""
        default, rules, memo = self.policy.cut_hour, self._rules, self._cut_memo
        if len(memo) > 200_000:
            memo.clear()
        tail = (default,)
        out = []
        for r in rows:
            site, role, ts = r[_SITE], r[_ROLE], r[_TS]
            site_rules = rules.get(site)  # type: ignore[call-overload]
            if site_rules is None and role != "training":
                out.append(r + tail)
                continue
            # the cut and day depend on the site, the role's kind and the UTC hour only (the
            # zone is a whole-hour offset, cuts are on the hour): one rule walk per hour
            key = (site, role == "training", ts // 3600_000)  # type: ignore[operator]
            got = memo.get(key)
            if got is None:
                cut = cut_for(site_rules, ts, role, default)  # type: ignore[arg-type]
                got = memo[key] = (cut, day_of(ts, cut), (cut,))  # type: ignore[arg-type]
            day = got[1]
            if day == r[_DAY]:
                out.append(r + got[2])
            else:
                cells = [*r, got[0]]
                cells[_DAY], cells[_MONTH] = day, day[:7]
                out.append(tuple(cells))
        fresh = {r[_SITE] for r in rows} - rules.keys() - self._unregistered
        for site in sorted(fresh):  # type: ignore[type-var]
            if self._x("INSERT INTO sites_unregistered VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (site, now)).rowcount:
                log.warning("site %s is not in the site registry: its touches are cut at the"
                            " default %02d:00 (ccus sink sites import adds it)", site, default)
        self._unregistered |= fresh  # type: ignore[arg-type]
        return out

    def _recut(self, scoped: bool, reflag: bool) -> Rederived:
        """In the write transaction: the stored touches (of the sites in `resite` when scoped)
        cut again with the registry; time flags evaluated again with the policy when reflag."""
        res = Rederived()
        where = " WHERE site IN (SELECT site FROM resite)" if scoped else ""
        changes = []
        default = self.policy.cut_hour
        cur = self._x("SELECT device, seq, site, role, ts_ms, received_ms, work_day, cut_hour,"
                      f" flag FROM touches{where}")
        # only the changes are kept: SQLite streams the rows (psycopg's client-side cursor
        # holds the result in memory)
        rows = itertools.chain.from_iterable(iter(lambda: cur.fetchmany(20_000), []))
        for dev, seq, site, role, ts, rec, day, cut, flag in rows:
            res.touches += 1
            c = cut_for(self._rules.get(site), ts, role, default)
            d = day_of(ts, c)
            f = time_flag(ts, rec, self.policy) if reflag else flag
            if (d, c, f) != (day, cut, flag):
                changes.append((d, d[:7], c, f, dev, seq))
                res.recut += (d, c) != (day, cut)
                res.moved += d != day
                res.admitted += bool(flag and not f)
                res.newly_flagged += bool(f and not flag)
            res.still_flagged += bool(f and flag)
        self._before_moving({c[1] for c in changes if c[1]})
        self._many("UPDATE touches SET work_day=?, month=?, cut_hour=?, flag=?"
                   " WHERE device=? AND seq=?", changes)
        return res

    def rederive(self) -> int:
        """Recompute every derived table from the stored touches (idempotent). Work-history rows."""
        return self.rederive_all().work_history_rows

    def rederive_all(self) -> Rederived:
        """Every stored touch cut again with the registry (unregistered sites: the policy's
        cut) and its time flag evaluated again with the policy's window; then every derived
        table recomputed."""
        with self._lock, self._tx():
            self._registry_lock(exclusive=True)
            self._load_rules()
            res = self._recut(scoped=False, reflag=True)
            for table in DERIVED_TABLES:
                self._x(f"DELETE FROM {table}")
            self._before_derive()
            for sql in FULL:
                self._x(sql)
            res.work_history_rows = int(self._x("SELECT COUNT(*) FROM work_history").fetchone()[0])
            return res

    def _rederive_sites(self, sites: Sequence[str]) -> Rederived:
        """In the write transaction: exactly these sites' rows, from their stored touches."""
        self._x("DELETE FROM resite")
        self._many("INSERT INTO resite (site) VALUES (?)", [(s,) for s in sites])
        res = self._recut(scoped=True, reflag=False)
        self._before_derive()
        for sql in SITES:
            self._x(sql)
        res.sites = tuple(sites)
        return res

    def import_sites(self, rules: Iterable[SiteRule]) -> Rederived:
        """Add or correct registry rows (key: site, valid_from); the sites whose cut rules or
        main contractor (who pays for its drinks) changed are re-derived from their stored
        touches in the same transaction."""
        rows = list(rules)
        with self._lock, self._tx():
            self._registry_lock(exclusive=True)
            self._load_rules()
            before = {s: [(r.valid_from, r.kind, r.day_cut_hour, r.main_contractor) for r in v]
                      for s, v in self._rules.items()}
            self._many(f"INSERT INTO sites ({_SITE_COLS}) VALUES (?,?,?,?,?,?,?,?)"
                       " ON CONFLICT (site, valid_from) DO UPDATE SET name=excluded.name,"
                       " kind=excluded.kind, prefecture=excluded.prefecture,"
                       " main_contractor=excluded.main_contractor,"
                       " day_cut_hour=excluded.day_cut_hour, fold_persons=excluded.fold_persons",
                       [(r.site, r.name, r.kind, r.prefecture, r.main_contractor, r.day_cut_hour,
                         r.valid_from, r.fold_persons) for r in rows])
            self._x("UPDATE registry_version SET version = version + 1")
            self._x("DELETE FROM sites_unregistered WHERE site IN (SELECT site FROM sites)")
            self._load_rules()
            changed = sorted(s for s in {r.site for r in rows}
                             if before.get(s) != [(r.valid_from, r.kind, r.day_cut_hour,
                                                   r.main_contractor)
                                                  for r in self._rules.get(s, [])])
            res = self._rederive_sites(changed) if changed else Rederived()
            res.imported = len(rows)
            return res

    def import_technicians(self, techs: Iterable[Technician]) -> int:
        """Add or replace technicians' employers (所属事業者) and names."""
        rows = [(t.tid, t.employer, t.name) for t in techs]
        with self._lock, self._tx():
            self._many("INSERT INTO technicians (tid, employer, name) VALUES (?,?,?)"
                       " ON CONFLICT (tid) DO UPDATE SET employer=excluded.employer,"
                       " name=excluded.name", rows)
        return len(rows)

    def import_chain(self, links: Iterable[ChainLink]) -> int:
        """A site's contractor chain: the file's rows for a site replace that site's chain."""
        rows = list(links)
        with self._lock, self._tx():
            for site in sorted({link.site for link in rows}):
                self._x("DELETE FROM site_chain WHERE site=?", (site,))
            self._many("INSERT INTO site_chain (site, contractor, parent, name) VALUES (?,?,?,?)"
                       " ON CONFLICT (site, contractor) DO UPDATE SET parent=excluded.parent,"
                       " name=excluded.name",
                       [(x.site, x.contractor, x.parent, x.name) for x in rows])
        return len(rows)

    def sites(self, site: str | None = None) -> list[SiteRule]:
        where, args = (" WHERE site=?", [site]) if site else ("", [])
        return [SiteRule(s, n, k, p, m, int(c), v, None if f is None else int(f))
                for s, n, k, p, m, c, v, f in self._rows(
            f"SELECT {_SITE_COLS} FROM sites{where} ORDER BY site, valid_from", args)]

    def unregistered_sites(self) -> list[tuple[str, int]]:
        """(site, first seen ms): sites whose touches came in before they were registered."""
        return [(s, int(t)) for s, t in self._rows(
            "SELECT site, first_seen_ms FROM sites_unregistered ORDER BY site")]

    def technicians(self) -> list[Technician]:
        return [Technician(*r) for r in self._rows(
            "SELECT tid, employer, name FROM technicians ORDER BY tid")]

    def chain(self, site: str | None = None) -> list[ChainLink]:
        where, args = (" WHERE site=?", [site]) if site else ("", [])
        return [ChainLink(*r) for r in self._rows(
            f"SELECT site, contractor, parent, name FROM site_chain{where}"
            " ORDER BY site, parent, contractor", args)]

    def site_touch_counts(self, site: str) -> tuple[int, int]:
        """(touches, flagged) stored for a site."""
        n, f = self._rows("SELECT COUNT(*), COUNT(flag) FROM touches WHERE site=?", (site,))[0]
        return int(n), int(f)

    def import_courses(self, courses: Iterable[Course]) -> int:
        """Add or replace course definitions (the operator's CSV). Returns how many."""
        rows = [(c.course, c.name, c.starts, c.ends, c.enrolled, c.center) for c in courses]
        with self._lock, self._tx():
            self._many("INSERT INTO courses (course, name, starts, ends, enrolled, center)"
                       " VALUES (?,?,?,?,?,?) ON CONFLICT (center, course) DO UPDATE SET"
                       " name=excluded.name, starts=excluded.starts, ends=excluded.ends,"
                       " enrolled=excluded.enrolled", rows)
        return len(rows)

    def register_devices(self, devices: Iterable[Device]) -> int:
        rows = [(d.device, d.site, d.role) for d in devices]
        with self._lock, self._tx():
            self._many("INSERT INTO devices (device, site, role) VALUES (?,?,?)"
                       " ON CONFLICT (device) DO UPDATE SET site=excluded.site, role=excluded.role",
                       rows)
        return len(rows)

    # -- the end-to-end acknowledgement ledger (cloud_sink.acks) -------------------------------
    def device_prefix(self, device: str) -> tuple[int, list[int]]:
        """(upto, seqs above it): every seq 1..upto of the device is stored, or kept as a dead
        letter that accounts for it; the seqs above may repeat and fill gaps between them."""
        keys = self._KEYS
        with self._lock:
            upto = 0
            if self._x(f"SELECT 1 FROM {keys} WHERE device=? AND seq=1", (device,)).fetchone():
                row = self._x(
                    f"SELECT t.seq FROM {keys} t WHERE t.device=? AND NOT EXISTS (SELECT 1 FROM"
                    f" {keys} u WHERE u.device=t.device AND u.seq=t.seq+1) ORDER BY t.seq LIMIT 1",
                    (device,)).fetchone()
                upto = int(row[0])
            above = [int(r[0]) for r in self._x(
                f"SELECT seq FROM {keys} WHERE device=? AND seq>?", (device, upto)).fetchall()]
            # the device's touches kept as dead letters count too (cloud_sink.acks)
            above += [int(r[0]) for r in self._x(
                "SELECT seq FROM dead_letters WHERE device=? AND seq>?", (device, upto)).fetchall()]
        return upto, above

    def sync_gaps(self, device: str, site: str, gaps: Sequence[tuple[int, int]], now_ms: int
                  ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Make the device's open rows in seq_gaps exactly `gaps` (first, last missing), in one
        transaction: open rows not in it are closed, the rest inserted; a gap that shrank (it
        overlaps an open row) keeps that row's first-seen time. -> (new gaps that overlap no
        open row, closed rows' ranges)."""
        with self._lock, self._tx():
            rows = [(int(a), int(b), int(t)) for a, b, t in self._x(
                "SELECT first_missing, last_missing, seen_ms FROM seq_gaps WHERE device=? AND"
                " closed_ms IS NULL", (device,)).fetchall()]
            want = set(gaps)
            closed = [(a, b) for a, b, _ in rows if (a, b) not in want]
            for a, b in closed:
                self._x("UPDATE seq_gaps SET closed_ms=? WHERE device=? AND first_missing=? AND"
                        " last_missing=? AND closed_ms IS NULL", (now_ms, device, a, b))
            have = {(a, b) for a, b, _ in rows}
            fresh = []
            for a, b in sorted(want - have):
                seen = min([t for x, y, t in rows if x <= b and a <= y], default=None)
                if seen is None:
                    fresh.append((a, b))
                self._x("INSERT INTO seq_gaps VALUES (?,?,?,?,?,NULL) ON CONFLICT DO NOTHING",
                        (device, site, a, b, now_ms if seen is None else seen))
        return fresh, closed

    def stored_gaps(self, device: str) -> list[tuple[int, int]]:
        """The device's missing seq ranges (first, last) below its highest stored seq, from the
        stored touches and the dead letters that account for a seq."""
        return [(int(a), int(b)) for a, b in self._rows(
            f"WITH s AS (SELECT seq FROM {self._KEYS} WHERE device=? UNION SELECT seq FROM dead_letters"
            " WHERE device=? AND seq IS NOT NULL), o AS (SELECT seq, LAG(seq, 1, 0) OVER"
            " (ORDER BY seq) AS prev FROM s) SELECT prev + 1, seq - 1 FROM o WHERE seq > prev + 1"
            " ORDER BY 1", (device, device))]

    def refresh_gaps(self, now_ms: int | None = None) -> None:
        """Re-derive the open gaps of every device that has one from what is stored (another
        sink, an import or a crash between commit and bookkeeping may have filled them)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        for device, site in self._rows("SELECT DISTINCT device, site FROM seq_gaps"
                                       " WHERE closed_ms IS NULL"):
            self.sync_gaps(device, site, self.stored_gaps(device), now)

    def known_devices(self) -> list[tuple[str, str]]:
        """(device, site) of every device with a stored touch, a dead letter naming its seq, or
        a registry entry: the devices whose acknowledgement a sink announces."""
        # one probe of the (device, seq) key per device, not a scan of every touch
        found: dict[str, str] = {}
        for device, site in self._rows(
                "WITH RECURSIVE d(device) AS (SELECT MIN(device) FROM touches UNION ALL"
                " SELECT (SELECT MIN(device) FROM touches WHERE device > d.device) FROM d"
                " WHERE d.device IS NOT NULL) SELECT d.device, (SELECT site FROM touches t"
                " WHERE t.device = d.device ORDER BY seq DESC LIMIT 1) FROM d"
                " WHERE d.device IS NOT NULL"):
            found[device] = site
        for device, topic in self._rows("SELECT device, MAX(topic) FROM dead_letters"
                                        " WHERE device IS NOT NULL GROUP BY device"):
            where = topics.parse_device_topic(topic)
            if where is not None:
                found.setdefault(device, where[0])
        for device, site in self._rows("SELECT device, site FROM devices"):
            found.setdefault(device, site)
        return sorted(found.items())

    def gaps(self, include_closed: bool = False) -> list[tuple[Any, ...]]:
        """(device, site, first_missing, last_missing, seen_ms, closed_ms) from seq_gaps."""
        sql = "SELECT device, site, first_missing, last_missing, seen_ms, closed_ms FROM seq_gaps"
        if not include_closed:
            sql += " WHERE closed_ms IS NULL"
        return self._rows(sql + " ORDER BY device, first_missing")

    # -- reading ------------------------------------------------------------------------------
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self._x(sql, params).fetchall()]

    def work_history(self, site: str | None = None, month: str | None = None) -> list[WorkDay]:
        where, args = _where(site=site, month=month)
        return [WorkDay(*r) for r in self._rows(
            "SELECT tid, site, work_day, first_in_ms, last_out_ms, taps, cut_hour FROM work_history"
            f"{where} ORDER BY site, work_day, tid", args)]

    def on_site(self, site: str, day: str) -> list[tuple[str, int]]:
        """(technician, entry ms) of who entered on the work day `day` at `site` and whose last
        passage that day is an entry, earliest entry first. The entry is the last one (an entry
        after an entry means the exit between was not recorded: the stay began at the later
        one); an entry and an exit in the same millisecond count as on site, the side to err
        on in a roll call. One primary-key range of work_history (site, work_day)."""
        return [(r[0], int(r[1])) for r in self._rows(
            "SELECT tid, last_in_ms FROM work_history WHERE site = ? AND work_day = ?"
            " AND last_in_ms IS NOT NULL AND (last_out_ms IS NULL OR last_in_ms >= last_out_ms)"
            " ORDER BY last_in_ms, tid", (site, day))]

    def days_worked(self, site: str | None = None,
                    month: str | None = None) -> list[tuple[str, str, str, int]]:
        """(site, month, technician, days) from the work history: the 建退共 figure."""
        where, args = _where(site=site, month=month)
        return [(s, m, t, int(n)) for s, m, t, n in self._rows(
            "SELECT site, substr(work_day, 1, 7) AS m, tid, COUNT(*) FROM work_history"
            f"{where} GROUP BY site, substr(work_day, 1, 7), tid ORDER BY site, m, tid", args)]

    def days_worked_named(self, site: str | None = None, month: str | None = None
                          ) -> list[tuple[str, str, str, int, str, str]]:
        """days_worked() with each technician's employer and name ('' when not registered),
        joined here: a national export touches ~460,000 of 1.6 million technicians, and
        loading them all into Python took longer than the join."""
        where, args = _where(site=site, month=month)
        return [(s, m, t, int(n), e or "", nm or "") for s, m, t, n, e, nm in self._rows(
            "SELECT d.site, d.m, d.tid, d.n, t.employer, t.name FROM (SELECT site,"
            " substr(work_day, 1, 7) AS m, tid, COUNT(*) AS n FROM work_history"
            f"{where} GROUP BY site, substr(work_day, 1, 7), tid) d"
            " LEFT JOIN technicians t ON t.tid = d.tid ORDER BY d.site, d.m, d.tid", args)]

    def training_monthly(self, site: str | None = None,
                         month: str | None = None) -> list[TrainingMonth]:
        cond, args = [], []
        if site:
            cond.append("site=?")
            args.append(site)
        if month:
            month_bounds(month)
            cond.append("month=?")
            args.append(month)
        where = " WHERE " + " AND ".join(cond) if cond else ""
        return [TrainingMonth(s, m, int(p), int(n)) for s, m, p, n in self._rows(
            f"SELECT site, month, persons, touches FROM training_monthly{where}"
            " ORDER BY site, month", args)]

    def training_courses(self, center: str | None = None) -> list[CourseStats]:
        """Every defined course (with zero touches if none) and every touched course; the key
        is center + course id (a course defined without a center matches any center's)."""
        rows = self._rows(
            "SELECT c.course, c.name, c.starts, c.ends, c.enrolled,"
            " CASE WHEN t.site IS NULL THEN c.center ELSE t.site END,"
            " COALESCE(t.persons, 0), COALESCE(t.touches, 0)"
            " FROM courses c LEFT JOIN training_course t ON t.course = c.course"
            " AND (c.center = t.site OR c.center = '')"
            " UNION ALL SELECT t.course, NULL, NULL, NULL, NULL, t.site, t.persons, t.touches"
            " FROM training_course t WHERE NOT EXISTS (SELECT 1 FROM courses c"
            " WHERE c.course = t.course AND (c.center = t.site OR c.center = ''))"
            " ORDER BY 6, 1")
        return [CourseStats(c, n, s, e, None if en is None else int(en), ce, int(p), int(t))
                for c, n, s, e, en, ce, p, t in rows if center is None or ce == center]

    def training_persons(self, center: str, first: str | None = None, last: str | None = None,
                         *, with_course: bool = False) -> int:
        """Unique persons at a center over months first..last (all when None): the period's
        figure, which the monthly rows cannot give (a person counts in each month)."""
        cond, args = ["site=?", "role='training'", "decision='allow'", "flag IS NULL"], [center]
        if first:
            cond.append("month >= ?")
            args.append(first)
        if last:
            cond.append("month <= ?")
            args.append(last)
        if with_course:
            cond.append("course IS NOT NULL")
        return int(self._rows(f"SELECT COUNT(DISTINCT person) FROM touches WHERE"
                              f" {' AND '.join(cond)}", args)[0][0])

    def courses(self) -> list[Course]:
        return [Course(c, n, s, e, int(en), ce) for c, n, s, e, en, ce in self._rows(
            "SELECT course, name, starts, ends, enrolled, center FROM courses"
            " ORDER BY center, course")]

    def vending_ledger(self, month: str | None = None,
                       contractor: str | None = None) -> list[VendingRow]:
        cond, args = [], []
        if month:
            month_bounds(month)
            cond.append("month=?")
            args.append(month)
        if contractor is not None:
            cond.append("contractor=?")
            args.append(contractor)
        where = " WHERE " + " AND ".join(cond) if cond else ""
        return [VendingRow(d, s, c, m, int(a), int(b), int(x)) for d, s, c, m, a, b, x in self._rows(
            "SELECT device, site, contractor, month, dispensed, failed, indeterminate"
            f" FROM vending_ledger{where} ORDER BY contractor, month, site, device", args)]

    def devices(self) -> list[Device]:
        return [Device(*r) for r in self._rows("SELECT device, site, role FROM devices ORDER BY device")]

    def flagged(self, limit: int = 100) -> list[tuple[str, int, str, str, int, int, str]]:
        """Stored touches kept out of the derived tables: (device, seq, site, role, ts, received, flag)."""
        return self._rows("SELECT device, seq, site, role, ts_ms, received_ms, flag FROM touches"
                          " WHERE flag IS NOT NULL ORDER BY received_ms DESC, device, seq LIMIT ?",
                          (limit,))

    def import_dead_letters(self, letters: Sequence[dict[str, Any]]) -> int:
        """Dead letters from an export (received_ms, topic, payload, reason, detail), each kept
        once: one already here with the same time, topic, reason and bytes is skipped, so an
        import run twice does not double them. -> how many were added."""
        added = 0
        with self._lock, self._tx():
            for m in letters:
                d = DeadLetter(str(m["topic"]), bytes(m["payload"]), str(m["reason"]),
                               str(m.get("detail") or ""))
                rcv = int(m["received_ms"])
                if self._x("SELECT 1 FROM dead_letters WHERE received_ms=? AND topic=? AND"
                           " reason=? AND payload=?", (rcv, d.topic, d.reason, d.payload)
                           ).fetchone():
                    continue
                k = dead_letter_key(d)
                self._x("INSERT INTO dead_letters (received_ms, topic, payload, reason, detail,"
                        " device, seq) VALUES (?,?,?,?,?,?,?)",
                        (rcv, d.topic, d.payload, d.reason, d.detail, k and k[1], k and k[2]))
                added += 1
        return added

    def dead_letters(self, limit: int = 100) -> list[tuple[int, int, str, str, str, bytes]]:
        return [(i, r, t, re, d, bytes(p)) for i, r, t, re, d, p in self._rows(
            "SELECT id, received_ms, topic, reason, detail, payload FROM dead_letters"
            " ORDER BY id DESC LIMIT ?", (limit,))]

    def counts(self) -> dict[str, int]:
        """touches, allowed, denied, dead_letters (flagged touches: see flagged())."""
        total, allowed = self._rows(
            "SELECT COUNT(*), COUNT(CASE WHEN decision='allow' THEN 1 END) FROM touches")[0]
        dead = self._rows("SELECT COUNT(*) FROM dead_letters")[0][0]
        return {"touches": int(total), "allowed": int(allowed), "denied": int(total - allowed),
                "dead_letters": int(dead)}

    def table(self, name: str) -> list[tuple[Any, ...]]:
        """Every row of a derived table in key order (for tests and checks)."""
        if name not in DERIVED_TABLES:
            raise ValueError(f"not a derived table: {name}")
        return self._rows(f"SELECT {DERIVED_COLUMNS[name]} FROM {name} ORDER BY 1, 2, 3, 4")

    def __enter__(self) -> "SqlStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _where(*, site: str | None, month: str | None) -> tuple[str, list[str]]:
    cond, args = [], []
    if site:
        cond.append("site=?")
        args.append(site)
    if month:
        lo, hi = month_bounds(month)
        cond.append("work_day BETWEEN ? AND ?")
        args += [lo, hi]
    return (" WHERE " + " AND ".join(cond) if cond else ""), args
