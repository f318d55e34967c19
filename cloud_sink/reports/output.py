"""Report writers: a table (list of flat dicts) as CSV or JSON, to a file or stdout."""

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

Table = list[dict[str, Any]]


def to_csv(rows: Table, columns: list[str] | None = None,
           header: dict[str, str] | None = None) -> str:
    """CSV of the columns (a row's other keys are left out); `header` renames them."""
    cols = columns or (list(rows[0]) if rows else [])
    buf = io.StringIO()
    # a plain writer over lists: DictWriter's per-row dict checks were half the time of a
    # national export (460,000 rows)
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([(header or {}).get(c, c) for c in cols])
    w.writerows([_cell(r.get(c)) for c in cols] for r in rows)
    return buf.getvalue()


def _cell(v: Any) -> Any:
    return "" if v is None else str(v).lower() if isinstance(v, bool) else v


def to_json(rows: Table, meta: dict[str, Any] | None = None) -> str:
    return json.dumps({**(meta or {}), "rows": rows}, ensure_ascii=False, indent=1) + "\n"


def emit(rows: Table, fmt: str, out: str | None, *, columns: list[str] | None = None,
         meta: dict[str, Any] | None = None, bom: bool = False,
         header: dict[str, str] | None = None) -> None:
    """Write the table; CSV with a BOM (bom=True) opens cleanly in Excel with Japanese text."""
    text = to_csv(rows, columns, header) if fmt == "csv" else to_json(rows, meta)
    text = ("\ufeff" if bom and fmt == "csv" else "") + text
    if out and out != "-":
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
