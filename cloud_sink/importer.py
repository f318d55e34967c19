"""`ccus sink import`: replay touches from JSON Lines or CBOR through the sink's validation and store.

JSON Lines: one touch per line, the wire map's keys (v, dev, site, role, seq, ts, tq, card,
ct, tid, dec, rsn, lv, cv, x) with `card` as hex. CBOR: a sequence of touch payloads, or one
array of touch maps. Each item is checked by the same decoder the MQTT path uses; a bad item
becomes a dead letter (source 'import:FILE:N') and the good ones behind it still go in.

A file written by `ccus sink export` (cloud_sink.export) also carries ``"_rcv"`` on each touch
(its first receive time: kept, so the flags and derived tables come out the same), dead
letters (``{"_dead": ...}``, kept as they were: a device's refused touch still accounts for its
seq), the device registry and the courses. After the import every imported device's gaps are
derived again from what is now stored, so the new store acknowledges what the old one did.
"""

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import cbor2

from cloud_sink.derive.rows import touch_row
from cloud_sink.model import BATCH_MAX, Course, DeadLetter, Device, IngestResult
from cloud_sink.registry import ChainLink, SiteRule, Technician
from cloud_sink.store import Store
from protocol.touch import Touch, TouchError, decode, to_map

# in the order a batch loads them: the registry before the touches it cuts
EXTRA_KINDS = ("_site", "_chain", "_employer", "_device", "_course", "_dead")


class Received(NamedTuple):
    """An exported touch with the time the first sink received it."""
    touch: Touch
    received_ms: int


class Extra(NamedTuple):
    """An exported dead letter, device or course: (kind, its map)."""
    kind: str
    m: dict[str, Any]


Item = Touch | DeadLetter | Received | Extra


def _extra_or_rcv(m: Any) -> tuple[Extra | None, int | None]:
    """An export's one-key record, or the "_rcv" popped from a touch map (m is changed)."""
    if type(m) is dict and len(m) == 1:
        (k, v), = m.items()
        if k in EXTRA_KINDS and type(v) is dict:
            return Extra(k, v), None
    if type(m) is dict and type(m.get("_rcv")) is int:
        return None, m.pop("_rcv")
    return None, None


def _received(item: Item, rcv: int | None) -> Item:
    return Received(item, rcv) if rcv is not None and isinstance(item, Touch) else item


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
    extra, rcv = _extra_or_rcv(m)
    if extra is not None:
        if extra.kind == "_dead" and isinstance(extra.m.get("payload"), str):
            try:
                extra.m["payload"] = bytes.fromhex(extra.m["payload"])
            except ValueError:
                return DeadLetter(source, line, "bad_field", "payload: not hex")
        return extra
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
    return (DeadLetter(source, line, item.reason, item.detail) if isinstance(item, DeadLetter)
            else _received(item, rcv))


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
        extra, rcv = _extra_or_rcv(obj)
        if extra is not None:
            yield fp.tell(), extra
        elif rcv is not None:
            yield fp.tell(), _received(check(cbor2.dumps(obj), f"import:{name}:{n}"), rcv)
        else:
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
                on_dead: Callable[[DeadLetter], None] | None = None,
                carried: dict[str, int] | None = None) -> IngestResult:
    """Replay a file into the store in batches (each one transaction). Returns the totals;
    `carried` (if given) counts the export's dead letters, devices and courses taken."""
    from tqdm import tqdm

    path = Path(path)
    data = path.read_bytes()
    kind = fmt or sniff(path, data)
    reader = read_jsonl if kind == "jsonl" else read_cbor
    total = IngestResult()
    good: list[Touch] = []
    received: list[Received] = []
    dead: list[DeadLetter] = []
    extras: dict[str, list[dict[str, Any]]] = {k: [] for k in EXTRA_KINDS}
    devices: dict[str, str] = {}
    carried = carried if carried is not None else {}
    done = 0

    def flush() -> None:
        nonlocal good, received, dead
        if extras["_site"]:
            carried["sites"] = carried.get("sites", 0) + store.import_sites(  # type: ignore[attr-defined]
                [SiteRule(**m) for m in extras["_site"]]).imported
        if extras["_chain"]:
            carried["chain"] = carried.get("chain", 0) + store.import_chain(  # type: ignore[attr-defined]
                [ChainLink(**m) for m in extras["_chain"]])
        if extras["_employer"]:
            carried["employers"] = carried.get("employers", 0) + store.import_technicians(  # type: ignore[attr-defined]
                [Technician(**m) for m in extras["_employer"]])
        if received and not store.policy.require_registered:
            now = now_ms if now_ms is not None else received[0].received_ms
            total.add(store.ingest_rows(  # type: ignore[attr-defined]
                [touch_row(r.touch, r.received_ms, store.policy) for r in received], dead, now))
            dead = []
        else:
            good += [r.touch for r in received]
        if good or dead:
            total.add(store.ingest(good, dead, now_ms=now_ms))
        good, received, dead = [], [], []
        if extras["_device"]:
            carried["devices"] = carried.get("devices", 0) + store.register_devices(
                [Device(**m) for m in extras["_device"]])
        if extras["_course"]:
            carried["courses"] = carried.get("courses", 0) + store.import_courses(
                [Course(**m) for m in extras["_course"]])
        if extras["_dead"]:
            carried["dead_letters"] = carried.get("dead_letters", 0) + \
                store.import_dead_letters(extras["_dead"])  # type: ignore[attr-defined]
        for k in EXTRA_KINDS:
            extras[k] = []

    with tqdm(total=len(data), unit="B", unit_scale=True, desc=path.name,
              disable=not progress) as bar:
        for pos, item in reader(data, path.name):
            if isinstance(item, DeadLetter):
                dead.append(item)
                if on_dead:
                    on_dead(item)
            elif isinstance(item, Extra):
                extras[item.kind].append(item.m)
            elif isinstance(item, Received):
                received.append(item)
                devices[item.touch.device] = item.touch.site
            else:
                good.append(item)
                devices[item.device] = item.site
            if len(good) + len(received) + len(dead) + sum(map(len, extras.values())) >= batch:
                flush()
                bar.update(pos - done)
                done = pos
        flush()
        bar.update(len(data) - done)
    # the new store's gaps, from what it now holds (an import may fill or open them)
    for device, site in sorted(devices.items()):
        store.sync_gaps(device, site, store.stored_gaps(device),  # type: ignore[attr-defined]
                        int(time.time() * 1000) if now_ms is None else now_ms)
    return total
