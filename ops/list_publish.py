"""`ccus ops list publish`, the work behind it: CSV -> snapshot (+ delta) -> MQTT messages."""

from __future__ import annotations

import dataclasses
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


def publish_list(csv_path: str | os.PathLike[str], *, name: str, version: int,
                 key: Ed25519PrivateKey, broker: tuple[str, int] | None,
                 prev_path: str | os.PathLike[str] | None = None,
                 out_path: str | os.PathLike[str] | None = None, issued_ms: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True,
                 timeout: float = 30.0, force: bool = False) -> PublishPlan:
    """Build, keep the snapshot file (the next publish's `prev`), and publish unless broker
    is None (dry run)."""
    prev = None
    if prev_path is not None:
        prev_list = open_list(prev_path)
        if prev_list.name != name or prev_list.version >= version:
            raise ValueError(f"previous list is {prev_list.name!r} v{prev_list.version}: "
                             f"need {name!r} below v{version}")
        prev = Path(prev_path).read_bytes()
    data = build_from_csv(csv_path, name=name, version=version, issued_ms=issued_ms)
    plan = plan_publish(data, key, prev=prev, chunk_size=chunk_size, force=force)
    write_atomic(out_path or f"{name}.{version}.idl", data)
    if broker is None:
        return plan
    from tqdm import tqdm

    from ops.list_mqtt import connect, publish_all

    client = connect(*broker, client_id=f"ccus-ops-list-{os.getpid()}")
    try:
        with tqdm(total=plan.payload_bytes, unit="B", unit_scale=True, disable=not progress,
                  desc=f"list {name} v{version}") as bar:
            publish_all(client, plan.messages, timeout=timeout, progress=bar)
    finally:
        client.disconnect()
        client.loop_stop()
    return plan
