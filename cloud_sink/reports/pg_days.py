"""The named 建退共 export (`days-worked --by main|site`, CSV) shaped, sorted and quoted by
PostgreSQL and streamed with COPY into the output: the national month's 460,000 rows without a
Python dict, sort or csv call per row.

Rule: the bytes equal what shape.days_worked_by + output.to_csv write for the same store
(tests/test_report_pg_days.py compares them on awkward names). So the SQL follows the Python:
the registry row in force on the month's last day (rule_on: the last valid_from <= 'YYYY-MM-31',
else the first), the contractor's name the first non-empty one in store.chain() order, ''
where Python has '' or None, the sort in code-point order (COLLATE "C", as Python compares
str), and each field quoted exactly when Python's csv writer quotes it (the characters are
probed from output.to_csv itself, not assumed). The lines are built in SQL and copied out in
COPY's text format (not its CSV format: that quotes '\\r' and empty strings, which Python's
writer does not), so the only decoding left is COPY's backslash escapes.
"""

import re
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from cloud_sink.reports import output, shape
from cloud_sink.stores.base import month_bounds

BY = ("main", "site")   # the ways done here; first-tier and technician stay in Python


class CopySource(Protocol):
    def copy_out(self, sql: str, params: Mapping[str, Any],
                 settings: Mapping[str, str] | None = None) -> Iterator[bytes]: ...


# for the export's transaction only: JIT compiled the line-building CASEs for 4.1 s of an
# 8.5 s national query (EXPLAIN ANALYZE, 2026-12-02); with the default 4 MB the aggregate
# and the sorts (~80 + 120 MB nationally) went to disk
SETTINGS = {"jit": "off", "work_mem": "256MB"}


@cache
def quoted_chars() -> tuple[str, ...]:
    """The ASCII characters for which output.to_csv quotes a field (',', '"', '\\n' on 3.11):
    asked of the writer, so a Python whose csv quotes more ('\\r') is followed, not diverged from."""
    return tuple(c for c in map(chr, range(1, 128))
                 if output.to_csv([{"x": f"a{c}b"}], ["x"])[2:].startswith('"'))


def _q(expr: str) -> str:
    """SQL for the csv field of a non-NULL text expression: quoted (quotes doubled) when it
    holds a character Python's writer quotes for, as is otherwise."""
    hit = " OR ".join(f"strpos({expr}, chr({ord(c)})) > 0" for c in quoted_chars())
    return (f"CASE WHEN {hit} THEN '\"' || replace({expr}, '\"', '\"\"') || '\"'"
            f" ELSE {expr} END")


def sql(by: str, site: str | None, month: str, contractor: str | None
        ) -> tuple[str, dict[str, str]]:
    """(SELECT of one text column, the CSV line without its newline, in the export's order;
    its named parameters).

    One month: so the month is a constant, the contractor a function of the site (its rule on
    the month's last day), and Python's sort keys (site, contractor, month, technician) and
    (contractor, site, month, technician) come down to (site, technician) and (the site's
    place among (contractor, site), site, technician). The line's first five fields and the
    place belong to the site: made once a site (230,000 nationally), not once a row
    (460,000)."""
    if by not in BY:
        raise ValueError(f"the PostgreSQL export does --by {' or '.join(BY)}, not {by}")
    lo, hi = month_bounds(month)   # month is YYYY-MM from here on: never quoted
    args = {"lo": lo, "hi": hi, "month": month, "last": f"{month}-31"}  # rule_on's day
    cond = ["work_day BETWEEN %(lo)s AND %(hi)s"]
    only = keep = ""
    if site:
        cond.insert(0, "site = %(site)s")
        only, args["site"] = " WHERE s.site = %(site)s", site
    if contractor:
        keep = " WHERE COALESCE(rs.contractor, '') = %(contractor)s"
        args["contractor"] = contractor
    # a registered site's first five fields; an unregistered one's contractor is '' (named
    # as the chain names '', if it does)
    head = " || ',' || ".join([_q("r.main_contractor"), _q("COALESCE(c.name, '')"),
                               _q("r.site"), _q("r.name"), "%(month)s"])
    named_blank = _q("COALESCE(max(z.name), '')")
    bare = " || ',' || ".join(["''", "c0.q", _q("d.site"), "''", "%(month)s"])
    tail = " || ',' || ".join([_q("d.tid"), _q("COALESCE(t.name, '')"),
                               _q("COALESCE(t.employer, '')"), "d.n::text"])
    query = (
        # the month's work days per site and technician (the month is one: no key for it)
        "WITH d AS (SELECT site, tid, COUNT(*) AS n FROM work_history"
        f" WHERE {' AND '.join(cond)} GROUP BY site, tid),"
        # the rule in force: among the site's rows, those from on or before `last` (latest
        # first), then the others (earliest first), as rule_on walks them
        " r AS (SELECT DISTINCT ON (s.site) s.site, s.name, s.main_contractor FROM sites s"
        f"{only} ORDER BY s.site,"
        ' (s.valid_from COLLATE "C" <= %(last)s) DESC,'
        ' CASE WHEN s.valid_from COLLATE "C" <= %(last)s THEN s.valid_from END COLLATE "C"'
        ' DESC NULLS LAST, s.valid_from COLLATE "C"),'
        # store.chain() order is (site, parent, contractor) in the database's collation: the
        # same ORDER BY here, so the same link's name comes first (of main contractors only:
        # half the chain's rows nationally, the other half is first tiers)
        " c AS (SELECT DISTINCT ON (contractor) contractor, name FROM site_chain"
        " WHERE name <> '' AND contractor IN (SELECT main_contractor FROM sites)"
        " ORDER BY contractor, site, parent),"
        # by main, a site's place among (contractor, site), 0 for contractor '' (first, by
        # site, with the unregistered sites): the big sort compares an integer first
        f" rs AS (SELECT r.site, r.main_contractor AS contractor, {head} || ',' AS head,"
        " CASE WHEN r.main_contractor = '' THEN 0 ELSE row_number() OVER (ORDER BY"
        ' r.main_contractor COLLATE "C", r.site COLLATE "C") END AS place'
        " FROM r LEFT JOIN c ON c.contractor = r.main_contractor),"
        # (not from c: a CTE named twice is materialized, and the planner, blind to its
        # columns, took rs for 67 M rows and hashed it to disk, 1.9 s of a 6.3 s export)
        f" c0 AS (SELECT {named_blank} AS q FROM (SELECT name FROM site_chain"
        " WHERE contractor = '' AND name <> '' ORDER BY site, parent LIMIT 1) z)"
        f" SELECT COALESCE(rs.head, {bare} || ',') || {tail}"
        " FROM d CROSS JOIN c0 LEFT JOIN rs ON rs.site = d.site"
        f" LEFT JOIN technicians t ON t.tid = d.tid{keep}")
    order = ("COALESCE(rs.place, 0), " if by == "main" else "") + 'd.site COLLATE "C", d.tid COLLATE "C"'
    return f"{query} ORDER BY {order}", args


_ESCAPE = re.compile(rb"\\(.)", re.S)
_UNESCAPE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v",
             b"\\": b"\\"}


def _unescape(row: bytes) -> bytes:
    """A COPY text-format row back to its bytes (COPY TO writes only these escapes)."""
    return _ESCAPE.sub(lambda m: _UNESCAPE[m.group(1)], row) if b"\\" in row else row


def lines(store: CopySource, by: str, site: str | None, month: str,
          contractor: str | None) -> Iterator[bytes]:
    """The export's CSV lines (UTF-8, each ending in '\\n'), header not included."""
    query, args = sql(by, site, month, contractor)
    for row in store.copy_out(query, args, SETTINGS):
        yield _unescape(row)


def write(store: CopySource, by: str, site: str | None, month: str, contractor: str | None,
          out: str | None, *, bom: bool = False, header: dict[str, str] | None = None) -> None:
    """Write the export as output.emit writes the Python path's table: to `out`, or stdout."""
    head = ("\ufeff" if bom else "") + output.to_csv([], shape.DAYS_COLUMNS, header)
    rows = lines(store, by, site, month, contractor)
    first = next(rows, None)   # the query's errors come here, before the file is touched
    if not out or out == "-":
        sys.stdout.write(head)
        if first is not None:
            sys.stdout.write(first.decode("utf-8"))
            for row in rows:
                sys.stdout.write(row.decode("utf-8"))
        return
    path = Path(out)
    try:
        with path.open("wb", buffering=1 << 20) as f:
            f.write(head.encode("utf-8"))
            if first is not None:
                f.write(first)
                f.writelines(rows)
    except BaseException:
        path.unlink(missing_ok=True)   # no half export left to be mistaken for a whole one
        raise
