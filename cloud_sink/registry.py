"""The site registry and the rules it gives a touch (pure): CSV parsing, the cut a touch is cut with.

Rules:
- a site has one or more rows, each valid from a date; a touch takes the latest row whose
  `valid_from` is on or before the work day that row's own cut gives the touch (so a new cut
  starts with a whole work day), and a touch before the first row takes the first row;
- a site not in the registry takes the sink's default cut (and is reported as unregistered);
- a training touch, and any touch at a site of kind `training`, is cut at 00:00: a training
  center has no night shift and counts calendar months in Asia/Tokyo.
Every CSV error (courses.CsvError) names its line and column: `line 3, column day_cut_hour: ...`.
"""

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from cloud_sink.courses import CsvError
from cloud_sink.derive.rows import day_of
from protocol.fields import BUSINESS_ID, SITE_ID, TECHNICIAN_ID

SITE_COLUMNS = ("site", "name", "kind", "prefecture", "main_contractor", "day_cut_hour",
                "valid_from")
KINDS = ("site", "training")
TRAINING_CUT = 0


@dataclass(frozen=True)
class SiteRule:
    """One registry row: a site's rules from `valid_from` on."""

    site: str
    name: str
    kind: str               # 'site' | 'training'
    prefecture: str
    main_contractor: str    # 元請 事業者ID (14 digits)
    day_cut_hour: int       # 0..23, Asia/Tokyo
    valid_from: str         # 'YYYY-MM-DD'
    fold_persons: int | None = None   # a center's courses with at most this many persons are
    #                                   folded into "other courses" (None: the report's default)


@dataclass(frozen=True)
class Technician:
    """A technician's employer (所属事業者) and, when known, name (for reports and charts)."""

    tid: str
    employer: str
    name: str = ""


@dataclass(frozen=True)
class ChainLink:
    """On one site, a contractor and the contractor directly above it ('' above the main one)."""

    site: str
    contractor: str
    parent: str
    name: str = ""


Rules = Mapping[str, Sequence[SiteRule]]   # site -> its rows, oldest valid_from first


def cut_for(rules: Sequence[SiteRule] | None, ts_ms: int, role: str, default_cut: int) -> int:
    """The cut hour a touch is cut with (see the module rules)."""
    if role == "training":
        return TRAINING_CUT
    if not rules:
        return default_cut
    for r in reversed(rules):
        cut = TRAINING_CUT if r.kind == "training" else r.day_cut_hour
        if day_of(ts_ms, cut) >= r.valid_from:
            return cut
    first = rules[0]
    return TRAINING_CUT if first.kind == "training" else first.day_cut_hour


def rule_on(rules: Sequence[SiteRule] | None, day: str) -> SiteRule | None:
    """The row in force on a work day (the first row before any is in force)."""
    if not rules:
        return None
    for r in reversed(rules):
        if r.valid_from <= day:
            return r
    return rules[0]


def by_site(rows: Iterable[SiteRule]) -> dict[str, list[SiteRule]]:
    out: dict[str, list[SiteRule]] = {}
    for r in sorted(rows, key=lambda r: (r.site, r.valid_from)):
        out.setdefault(r.site, []).append(r)
    return out


# -- CSV --------------------------------------------------------------------------------------
def _reader(text: str, required: Sequence[str], optional: Sequence[str] = ()
            ) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) with stripped values, or CsvError; a quoted field may hold line
    breaks, so the number is the line the row starts on."""
    rows = csv.DictReader(io.StringIO(text, newline=""))
    try:
        names = [f.strip() for f in rows.fieldnames or []]
    except csv.Error as exc:
        raise CsvError(f"line 1: {exc}") from None
    rows.fieldnames = names
    missing = [c for c in required if c not in names]
    if missing:
        raise CsvError(f"line 1: header lacks {', '.join(missing)} "
                       f"(need {','.join(required)}"
                       + (f"[,{','.join(optional)}]" if optional else "") + ")")
    unknown = [c for c in names if c not in required and c not in optional]
    if unknown:
        raise CsvError(f"line 1, column {unknown[0]}: unknown column")
    while True:
        start = rows.line_num + 1
        try:
            r = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:   # a NUL byte, a stray carriage return in a field
            raise CsvError(f"line {start}: {exc}") from None
        if None in r:
            raise CsvError(f"line {start}: more fields than the header has")
        yield start, {k: (v or "").strip() for k, v in r.items()}


def _need(n: int, col: str, ok: bool, what: str) -> None:
    if not ok:
        raise CsvError(f"line {n}, column {col}: {what}")


def parse_sites(text: str) -> list[SiteRule]:
    """All rows of a site-registry CSV, or CsvError for the first bad one (nothing half-taken)."""
    out: list[SiteRule] = []
    seen: set[tuple[str, str]] = set()
    for n, r in _reader(text, SITE_COLUMNS, ("fold_persons",)):
        _need(n, "site", bool(SITE_ID.match(r["site"])), f"{r['site']!r} is not a 14-digit site ID")
        _need(n, "name", 0 < len(r["name"]) <= 200, "a name of 1..200 characters is needed")
        _need(n, "kind", r["kind"] in KINDS, f"{r['kind']!r}: must be site or training")
        _need(n, "main_contractor", bool(BUSINESS_ID.match(r["main_contractor"])),
              f"{r['main_contractor']!r} is not a 14-digit business ID (事業者ID)")
        cut = r["day_cut_hour"]
        _need(n, "day_cut_hour", cut.isdigit() and 0 <= int(cut) <= 23,
              f"{cut!r}: an hour 0..23 (Asia/Tokyo) is needed")
        try:
            valid = date.fromisoformat(r["valid_from"]).isoformat()
        except ValueError:
            valid = ""
        _need(n, "valid_from", len(r["valid_from"]) == 10 and bool(valid),
              f"{r['valid_from']!r} is not a date YYYY-MM-DD")
        _need(n, "valid_from", (r["site"], valid) not in seen,
              f"site {r['site']} has two rows valid from {valid}")
        seen.add((r["site"], valid))
        fold = r.get("fold_persons", "")
        _need(n, "fold_persons", fold == "" or fold.isdigit(),
              f"{fold!r}: empty or a number of persons (0 or more)")
        out.append(SiteRule(r["site"], r["name"], r["kind"], r["prefecture"],
                            r["main_contractor"], int(cut), valid, int(fold) if fold else None))
    return out


def parse_technicians(text: str) -> list[Technician]:
    """tid,employer[,name]: each technician's 所属事業者 (a later import replaces a row)."""
    out: list[Technician] = []
    for n, r in _reader(text, ("tid", "employer"), ("name",)):
        _need(n, "tid", bool(TECHNICIAN_ID.match(r["tid"])),
              f"{r['tid']!r} is not a 14-digit technician ID")
        _need(n, "employer", bool(BUSINESS_ID.match(r["employer"])),
              f"{r['employer']!r} is not a 14-digit business ID (事業者ID)")
        out.append(Technician(r["tid"], r["employer"], r.get("name", "")))
    return out


def parse_chain(text: str) -> list[ChainLink]:
    """site,contractor,parent[,name]: a site's contractor chain; parent '' for the main one."""
    out: list[ChainLink] = []
    for n, r in _reader(text, ("site", "contractor", "parent"), ("name",)):
        _need(n, "site", bool(SITE_ID.match(r["site"])), f"{r['site']!r} is not a 14-digit site ID")
        _need(n, "contractor", bool(BUSINESS_ID.match(r["contractor"])),
              f"{r['contractor']!r} is not a 14-digit business ID (事業者ID)")
        _need(n, "parent", r["parent"] == "" or bool(BUSINESS_ID.match(r["parent"])),
              f"{r['parent']!r}: empty (the main contractor) or a 14-digit business ID")
        _need(n, "parent", r["parent"] != r["contractor"], "a contractor cannot be its own parent")
        out.append(ChainLink(r["site"], r["contractor"], r["parent"], r.get("name", "")))
    return out


def first_tier_of(links: Iterable[ChainLink], main: str) -> dict[str, str]:
    """For one site: contractor -> the first-tier subcontractor it works under (a first-tier
    one maps to itself); the main contractor and contractors not under it are left out."""
    parent = {link.contractor: link.parent for link in links}
    out: dict[str, str] = {}
    for c in parent:
        seen, cur = set(), c
        while cur in parent and parent[cur] not in ("", main) and cur not in seen:
            seen.add(cur)
            cur = parent[cur]
        if cur != main and parent.get(cur) == main:
            out[c] = cur
    return out
