"""`ccus sink export`: every stored touch (with its device, seq and receive time), every dead
letter, the device registry and the courses, as JSON Lines or CBOR that `ccus sink import` reads.

Rules of this file:

- The format is the import format (docs/sink.md, "Export and moving a store"): a touch is its
  wire map (protocol.touch.to_map; in JSON Lines `card` as hex) plus ``"_rcv"``, the time the
  first sink received it, so the skew flag and the derived tables come out the same in the new
  store. Other records are one-key maps: ``{"_dead": {...}}`` (received_ms, topic, payload,
  reason, detail; payload hex in JSON Lines), ``{"_device": {...}}``, ``{"_course": {...}}``,
  and the site registry: ``{"_site": {...}}`` (a SiteRule), ``{"_chain": {...}}`` (a
  ChainLink), ``{"_employer": {...}}`` (a Technician). The registry comes first in the file, so
  the import cuts each touch with its site's rules as it goes.
  The dead letters travel because a device's own refused touch accounts for its seq in the
  end-to-end acknowledgement: without it the new store would hold that device's ack back.
- Touches are read in (device, seq) order in chunks (keyset pagination), so a store of
  millions never sits in memory; a tqdm bar counts rows.
- A stored row that no longer makes a valid touch (it cannot happen through the sink, but a
  hand-edited store might) is refused with its key: an export that silently drops a touch
  would break the acknowledgement it exists to keep.
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cbor2

from cloud_sink.model import StoreError
from protocol.reasons import Reason
from protocol.timequality import TimeQuality
from protocol.touch import CardTech, Decision, Role, Touch, TouchError, encode, to_map

CHUNK = 5000
_TOUCH_COLS = ("device, seq, site, role, ts_ms, tq, card, card_tech, tid, decision, reason, lv,"
               " cv, facts, received_ms")


def touch_of_row(r: tuple[Any, ...]) -> tuple[Touch, int]:
    """A stored touch row (_TOUCH_COLS) -> (Touch, received_ms). Raises StoreError if invalid."""
    (device, seq, site, role, ts, tq, card, ct, tid, dec, rsn, lv, cv, facts, rcv) = r
    try:
        t = Touch(device=device, site=site, role=Role(role), seq=int(seq), ts_ms=int(ts),
                  tq=TimeQuality(tq), card=bytes(card), card_tech=CardTech(ct), tid=tid,
                  decision=Decision(dec), reason=Reason(rsn), list_version=int(lv),
                  config_version=int(cv), facts=json.loads(facts) if facts else {})
        encode(t)  # validates
    except (ValueError, TouchError) as exc:
        raise StoreError(f"stored touch {device} #{seq} is not a valid touch ({exc}); fix or "
                         "remove that row and export again") from exc
    return t, int(rcv)


def records(store: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, map) for everything the export carries: the registry first, then the touches
    (kind 'touch') and the dead letters."""
    for rule in store.sites():
        yield "_site", dataclasses.asdict(rule)
    for link in store.chain():
        yield "_chain", dataclasses.asdict(link)
    for tech in store.technicians():
        yield "_employer", dataclasses.asdict(tech)
    for d in store.devices():
        yield "_device", {"device": d.device, "site": d.site, "role": d.role}
    for c in store.courses():
        yield "_course", {"course": c.course, "name": c.name, "starts": c.starts, "ends": c.ends,
                          "enrolled": c.enrolled, "center": c.center}
    last: tuple[str, int] = ("", 0)
    while True:
        rows = store._rows(f"SELECT {_TOUCH_COLS} FROM touches WHERE device > ? OR"
                           " (device = ? AND seq > ?) ORDER BY device, seq LIMIT ?",
                           (last[0], last[0], last[1], CHUNK))
        for r in rows:
            t, rcv = touch_of_row(r)
            yield "touch", dict(to_map(t), _rcv=rcv)
        if len(rows) < CHUNK:
            break
        last = (rows[-1][0], int(rows[-1][1]))
    after = 0
    while True:
        rows = store._rows("SELECT id, received_ms, topic, payload, reason, detail FROM"
                           " dead_letters WHERE id > ? ORDER BY id LIMIT ?", (after, CHUNK))
        for _id, rcv, topic, payload, reason, detail in rows:
            yield "_dead", {"received_ms": int(rcv), "topic": topic, "payload": bytes(payload),
                            "reason": reason, "detail": detail}
        if len(rows) < CHUNK:
            break
        after = int(rows[-1][0])


def total_rows(store: Any) -> int:
    return sum(int(store._rows(f"SELECT COUNT(*) FROM {t}")[0][0])
               for t in ("touches", "dead_letters", "devices", "courses", "sites", "site_chain",
                         "technicians"))


def _json_line(kind: str, m: dict[str, Any]) -> bytes:
    m = dict(m)
    if kind == "touch":
        m["card"] = m["card"].hex()
        out: dict[str, Any] = m
    else:
        if kind == "_dead":
            m["payload"] = m["payload"].hex()
        out = {kind: m}
    return json.dumps(out, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def _cbor_item(kind: str, m: dict[str, Any]) -> bytes:
    return cbor2.dumps(m if kind == "touch" else {kind: m})


def fmt_of(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path.suffix.lower() == ".cbor":
        return "cbor"
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise StoreError(f"{path}: say .jsonl or .cbor (or --format)")


def export_store(store: Any, out: str | Path, *, fmt: str | None = None,
                 progress: bool = True) -> dict[str, int]:
    """Write everything the export carries to `out` (written to OUT.part, then renamed, so a
    half-written export never looks complete). -> counts per kind."""
    from tqdm import tqdm

    path = Path(out)
    kind = fmt_of(path, fmt)
    write = _json_line if kind == "jsonl" else _cbor_item
    part = path.with_name(path.name + ".part")
    counts = {"touch": 0, "_dead": 0, "_device": 0, "_course": 0, "_site": 0, "_chain": 0,
              "_employer": 0}
    try:
        fp: BinaryIO
        with open(part, "wb") as fp, tqdm(total=total_rows(store), unit="rows",
                                           desc=path.name, disable=not progress) as bar:
            for k, m in records(store):
                fp.write(write(k, m))
                counts[k] += 1
                bar.update(1)
        part.replace(path)
    except OSError as exc:
        raise StoreError(f"cannot write the export {path}: {exc}") from exc
    return counts
