"""`ccus ops list publish`, the work behind it: CSV -> snapshot (+ delta) -> MQTT messages,
published through ops/mqttc.py, or written to a folder (`--dry-run --out DIR`) as the exact
messages, to publish later with `--from DIR` or a mosquitto_pub loop (docs/idlist.md).

A message folder: `NNNN.bin` (the payload, byte for byte), `messages.tsv` (one line per
message in publishing order: file, retain 1/0, topic; for shell loops) and `manifest.json`
(the same with sizes and SHA-256, checked before anything is published from the folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.atomic import write_atomic
from edge.idlist.base import read_technicians_csv
from edge.idlist.codec import build_list, load_list, open_list
from edge.idlist.delta import Delta, diff
from edge.idlist.dist import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    Message,
    clear_messages,
    delta_messages,
    manifest_for,
    snapshot_messages,
)
from ops.mqttc import BrokerOpts

MANIFEST = "manifest.json"
TSV = "messages.tsv"
FOLDER_FORMAT = 1


@dataclass(frozen=True)
class PublishPlan:
    data: bytes  # the new list file
    manifest: Manifest
    delta: Delta | None
    messages: list[Message]  # in publishing order

    @property
    def payload_bytes(self) -> int:
        return sum(len(m.payload) for m in self.messages)


def plan_publish(data: bytes, key: Ed25519PrivateKey, *, prev: bytes | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, force: bool = False) -> PublishPlan:
    """Chunks of the new snapshot, the delta from `prev` (if given), the manifest last, then
    empty retained payloads clearing the previous snapshot's chunks. `force` (signed): devices
    install it even if it was issued before their freshness window (--force)."""
    new = load_list(data)
    msgs = snapshot_messages(data, key, chunk_size, force=force)
    chunks, manifest_msg = msgs[:-1], msgs[-1]
    delta = None
    clear: list[Message] = []
    if prev is not None:
        old = load_list(prev)
        delta = dataclasses.replace(diff(old, new), force=force)
        clear = clear_messages(old.name, old.version, -(-len(prev) // chunk_size))
    deltas = delta_messages(delta, key, chunk_size) if delta is not None else []
    return PublishPlan(data, manifest_for(data, chunk_size, force=force), delta,
                       chunks + deltas + [manifest_msg] + clear)


def build_from_csv(csv_path: str | os.PathLike[str], *, name: str, version: int,
                   issued_ms: int | None = None) -> bytes:
    return build_list(read_technicians_csv(csv_path), name=name, version=version,
                      issued_ms=int(time.time() * 1000) if issued_ms is None else issued_ms)


def write_messages(folder: str | os.PathLike[str], messages: list[Message]) -> Path:
    """The exact messages into an empty (or new) folder; returns its manifest.json."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.bin")) or (out / MANIFEST).exists():
        raise ValueError(f"{out}: already holds messages; give an empty folder")
    entries, lines = [], []
    for i, m in enumerate(messages, 1):
        name = f"{i:04d}.bin"
        write_atomic(out / name, m.payload)
        entries.append({"file": name, "topic": m.topic, "retain": m.retain,
                        "bytes": len(m.payload), "sha256": hashlib.sha256(m.payload).hexdigest()})
        lines.append(f"{name}\t{int(m.retain)}\t{m.topic}\n")
    write_atomic(out / TSV, "".join(lines).encode())
    doc = {"format": FOLDER_FORMAT, "count": len(entries), "messages": entries}
    write_atomic(out / MANIFEST, (json.dumps(doc, indent=1) + "\n").encode())
    return out / MANIFEST


def read_messages(folder: str | os.PathLike[str]) -> list[Message]:
    """The messages of a folder written by write_messages, each checked against its size and
    SHA-256; ValueError names the file that does not match."""
    src = Path(folder)
    try:
        doc = json.loads((src / MANIFEST).read_text())
        entries = doc["messages"]
        if doc.get("format") != FOLDER_FORMAT or not isinstance(entries, list):
            raise ValueError
    except OSError as exc:
        raise ValueError(f"{src / MANIFEST}: cannot read ({exc.strerror}): "
                         "make it with `ccus ops list publish --dry-run --out DIR`") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{src / MANIFEST}: not a message manifest") from None
    msgs = []
    for e in entries:
        name = str(e.get("file", ""))
        if "/" in name or not name.endswith(".bin"):
            raise ValueError(f"{src / MANIFEST}: bad file name {name!r}")
        data = (src / name).read_bytes()
        if len(data) != e.get("bytes") or hashlib.sha256(data).hexdigest() != e.get("sha256"):
            raise ValueError(f"{src / name}: does not match {MANIFEST} (changed or truncated)")
        msgs.append(Message(str(e["topic"]), data, bool(e.get("retain", True))))
    return msgs


def publish_messages(broker: BrokerOpts | tuple[str, int], messages: list[Message], *,
                     progress: bool = True, timeout: float = 30.0, desc: str = "list") -> int:
    """Connect (TLS when the options say so), publish in order, PUBACKs checked."""
    from tqdm import tqdm

    from ops.mqttc import OPS_CLIENT_PREFIX, publish_all, session

    opts = broker if isinstance(broker, BrokerOpts) else BrokerOpts(*broker)
    with session(opts, client_id=f"{OPS_CLIENT_PREFIX}list-{os.getpid()}") as client, \
            tqdm(total=sum(len(m.payload) for m in messages), unit="B", unit_scale=True,
                 disable=not progress, desc=desc) as bar:
        return publish_all(client, messages, timeout=timeout, progress=bar)


def publish_list(csv_path: str | os.PathLike[str], *, name: str, version: int,
                 key: Ed25519PrivateKey, broker: BrokerOpts | tuple[str, int] | None,
                 prev_path: str | os.PathLike[str] | None = None,
                 out_path: str | os.PathLike[str] | None = None, issued_ms: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True,
                 timeout: float = 30.0, force: bool = False,
                 messages_dir: str | os.PathLike[str] | None = None) -> PublishPlan:
    """Build, keep the snapshot file (the next publish's `prev`), write the messages to
    `messages_dir` when given, and publish unless broker is None (dry run)."""
    prev = None
    if prev_path is not None:
        prev_list = open_list(prev_path)
        if prev_list.name != name or prev_list.version >= version:
            raise ValueError(f"previous list is {prev_list.name!r} v{prev_list.version}: "
                             f"need {name!r} below v{version}")
        prev = Path(prev_path).read_bytes()
    data = build_from_csv(csv_path, name=name, version=version, issued_ms=issued_ms)
    plan = plan_publish(data, key, prev=prev, chunk_size=chunk_size, force=force)
    if messages_dir is not None:
        write_messages(messages_dir, plan.messages)
    write_atomic(out_path or f"{name}.{version}.idl", data)
    if broker is None:
        return plan
    publish_messages(broker, plan.messages, progress=progress, timeout=timeout,
                     desc=f"list {name} v{version}")
    return plan
