"""Course definitions from the operator's CSV (pure): id, name, period, enrolled count, center.

Header: course,name,starts,ends,enrolled[,center]; dates YYYY-MM-DD, ends inclusive.
"""

import csv
import io
from datetime import date

from cloud_sink.errors import SinkError
from cloud_sink.model import Course, Device
from protocol.touch import DEVICE_ID, SITE_ID

REQUIRED = ("course", "name", "starts", "ends", "enrolled")


class CsvError(SinkError, ValueError):
    pass


def parse_courses(text: str) -> list[Course]:
    """All rows, or CsvError naming the first bad line; nothing half-imported."""
    rows = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED if c not in (rows.fieldnames or [])]
    if missing:
        raise CsvError(f"header lacks {', '.join(missing)} (need {','.join(REQUIRED)}[,center])")
    out: list[Course] = []
    seen: set[str] = set()
    for n, r in enumerate(rows, start=2):
        try:
            cid, name = (r["course"] or "").strip(), (r["name"] or "").strip()
            if not cid or len(cid) > 64:
                raise ValueError("course id must be 1..64 characters")
            if cid in seen:
                raise ValueError(f"course {cid} appears twice")
            starts = date.fromisoformat((r["starts"] or "").strip())
            ends = date.fromisoformat((r["ends"] or "").strip())
            if ends < starts:
                raise ValueError("ends before starts")
            enrolled = int((r["enrolled"] or "").strip())
            if enrolled < 0:
                raise ValueError("enrolled must be >= 0")
            center = (r.get("center") or "").strip()
            if center and not SITE_ID.match(center):
                raise ValueError("center must be a 14-digit site ID")
        except (ValueError, TypeError) as exc:
            raise CsvError(f"line {n}: {exc}") from None
        seen.add(cid)
        out.append(Course(cid, name, starts.isoformat(), ends.isoformat(), enrolled, center))
    return out


def parse_devices(text: str) -> list[Device]:
    """Device registry CSV: device,site[,role]."""
    rows = csv.DictReader(io.StringIO(text))
    if not {"device", "site"} <= set(rows.fieldnames or []):
        raise CsvError("header must have device,site[,role]")
    out = []
    for n, r in enumerate(rows, start=2):
        dev, site = (r["device"] or "").strip(), (r["site"] or "").strip()
        if not DEVICE_ID.match(dev) or not SITE_ID.match(site):
            raise CsvError(f"line {n}: bad device id or site id")
        out.append(Device(dev, site, (r.get("role") or "").strip()))
    return out
