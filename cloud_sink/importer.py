"""`ccus sink import`: replay touches from JSON Lines or CBOR through the sink's validation and store.

JSON Lines: one touch per line, the wire map's keys (v, dev, site, role, seq, ts, tq, card,
ct, tid, dec, rsn, lv, cv, x) with `card` as hex. CBOR: a sequence of touch payloads, or one
array of touch maps. Each item is checked by the same decoder the MQTT path uses; a bad item
becomes a dead letter (source 'import:FILE:N') and the good ones behind it still go in.
"""

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2

from cloud_sink.model import BATCH_MAX, DeadLetter, IngestResult
from cloud_sink.store import Store
from protocol.touch import Touch, TouchError, decode, to_map

Item = Touch | DeadLetter


def touch_json(t: Touch) -> str:
    """A touch as one JSON line (the import format)."""
    m = to_map(t)
    m["card"] = t.card.hex()
    return json.dumps(m, sort_keys=True, ensure_ascii=False)


def check(payload: bytes, source: str) -> Item:
    """One CBOR payload -> a valid Touch or a DeadLetter with the decoder's reason."""
    try:
        return decode(payload)
    except TouchError as exc:
        return DeadLetter(source, payload, exc.reason, exc.detail)


def check_json(line: bytes, source: str) -> Item:
    try:
        m: Any = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return DeadLetter(source, line, "malformed_json", str(exc)[:200])
    if isinstance(m, dict) and isinstance(m.get("card"), str):
        try:
            m["card"] = bytes.fromhex(m["card"])
        except ValueError:
            return DeadLetter(source, line, "bad_field", "card: not hex")
    try:
        payload = cbor2.dumps(m)
    except Exception as exc:  # noqa: BLE001 - whatever JSON held that CBOR cannot
        return DeadLetter(source, line, "bad_field", f"{type(exc).__name__}: {exc}"[:200])
    item = check(payload, source)
    return DeadLetter(source, line, item.reason, item.detail) if isinstance(item, DeadLetter) else item


def read_jsonl(data: bytes, name: str) -> Iterator[tuple[int, Item]]:
    """(bytes consumed so far, item) per non-blank line."""
    pos = 0
    for n, line in enumerate(data.splitlines(keepends=True), start=1):
        pos += len(line)
        if line.strip():
            yield pos, check_json(line.strip(), f"import:{name}:{n}")


def read_cbor(data: bytes, name: str) -> Iterator[tuple[int, Item]]:
    fp = io.BytesIO(data)
    n = 0
    while fp.tell() < len(data):
        start = fp.tell()
        n += 1
        try:
            obj = cbor2.CBORDecoder(fp).decode()
        except Exception as exc:  # noqa: BLE001 - garbage: the rest cannot be framed
            yield len(data), DeadLetter(f"import:{name}:{n}", data[start:start + 4096],
                                        "malformed_cbor", f"{type(exc).__name__}: {exc}"[:200])
            return
        if isinstance(obj, list) and start == 0 and fp.tell() == len(data):
            for i, elem in enumerate(obj, start=1):
                try:
                    raw = cbor2.dumps(elem)
                except Exception as exc:  # noqa: BLE001
                    yield len(data), DeadLetter(f"import:{name}:{i}", b"", "malformed_cbor", str(exc))
                    continue
                yield fp.tell() * i // max(1, len(obj)), check(raw, f"import:{name}:{i}")
            return
        yield fp.tell(), check(data[start:fp.tell()], f"import:{name}:{n}")


def sniff(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".cbor":
        return "cbor"
    return "jsonl" if data.lstrip()[:1] == b"{" else "cbor"


def import_file(store: Store, path: str | Path, *, fmt: str | None = None, batch: int = BATCH_MAX,
                progress: bool = True, now_ms: int | None = None,
                on_dead: Callable[[DeadLetter], None] | None = None) -> IngestResult:
    """Replay a file into the store in batches (each one transaction). Returns the totals."""
    from tqdm import tqdm

    path = Path(path)
    data = path.read_bytes()
    kind = fmt or sniff(path, data)
    reader = read_jsonl if kind == "jsonl" else read_cbor
    total = IngestResult()
    good: list[Touch] = []
    dead: list[DeadLetter] = []
    done = 0
    with tqdm(total=len(data), unit="B", unit_scale=True, desc=path.name,
              disable=not progress) as bar:
        for pos, item in reader(data, path.name):
            if isinstance(item, DeadLetter):
                dead.append(item)
                if on_dead:
                    on_dead(item)
            else:
                good.append(item)
            if len(good) + len(dead) >= batch:
                total.add(store.ingest(good, dead, now_ms=now_ms))
                good, dead = [], []
                bar.update(pos - done)
                done = pos
        if good or dead:
            total.add(store.ingest(good, dead, now_ms=now_ms))
        bar.update(len(data) - done)
    return total
