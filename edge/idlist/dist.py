"""ID-list distribution over MQTT, pure: topics, the signed manifest, chunking and messages.

    ccus/v1/list/{name}/snapshot/manifest           signed manifest of the latest snapshot
    ccus/v1/list/{name}/snapshot/{version}/{index}  raw chunk bytes (hash in the manifest)
    ccus/v1/list/{name}/delta/{from}-{to}/{count}/{index}
                                                    part `index` (0-based) of `count` of one
                                                    signed delta envelope

All retained, QoS 1. A publisher sends chunks first, then deltas, then the manifest, so a
manifest never points at chunks that are not there yet. Everything fits under a broker's
message_size_limit of 64 KiB (chunk and part size 60 KiB); the delta's signature covers the
reassembled envelope, so parts need no hash of their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import ListError
from edge.idlist.codec import HEADER_SIZE, MAX_RECORDS, NAME, MmapIdList, load_list
from edge.idlist.delta import Delta, DeltaError
from edge.signing import SignatureError, open_sealed, seal
from protocol import topics
from protocol.touch import MAX_TS_MS

ROOT = topics.LIST_ROOT
MANIFEST_PURPOSE = "idlist-manifest"
DELTA_PURPOSE = "idlist-delta"
DEFAULT_CHUNK_SIZE = 60 * 1024  # under Mosquitto message_size_limit 65536 with room to spare
MAX_CHUNK_SIZE = 8 * 1024 * 1024
MAX_CHUNKS = 65536
MAX_DELTA_PARTS = 4096
MAX_LIST_BYTES = 4 << 30  # a list file at most: ~16.7 million IDs with several cards each
MAX_ISSUED_MS = MAX_TS_MS  # issue times are UTC ms, year 1970..9999 (like a touch's ts)


# the topic builders live with the rest of the tree in protocol/topics.py
subscription = topics.list_subscription
manifest_topic = topics.list_manifest
chunk_topic = topics.list_chunk
delta_topic = topics.list_delta


def chunks_filter(name: str, version: int) -> str:
    """Every chunk of one snapshot: subscribing to it makes the broker send them (retained)."""
    return f"{ROOT}/{name}/snapshot/{version}/+"


@dataclass(frozen=True, slots=True)
class ListTopic:
    kind: str  # "manifest" | "chunk" | "delta"
    name: str
    version: int = 0  # chunk: snapshot version; delta: to-version
    index: int = 0  # chunk index / delta part index
    from_version: int = 0  # delta only
    count: int = 0  # delta only: number of parts


def _uint(s: str) -> int | None:
    """A version, index or count in a topic: decimal, below 2**63 (what the header holds)."""
    v = int(s) if s.isascii() and s.isdigit() and len(s) <= 19 else None
    return v if v is not None and v < 1 << 63 else None


def parse_topic(topic: str) -> ListTopic | None:
    """A list topic -> what it carries; None for anything else (including malformed numbers)."""
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:3]) != ROOT or not NAME.match(parts[3]):
        return None
    name, rest = parts[3], parts[4:]
    if rest == ["snapshot", "manifest"]:
        return ListTopic("manifest", name)
    if len(rest) == 3 and rest[0] == "snapshot":
        v, i = _uint(rest[1]), _uint(rest[2])
        return None if v is None or i is None else ListTopic("chunk", name, v, i)
    if len(rest) == 4 and rest[0] == "delta" and rest[1].count("-") == 1:
        a, b = (_uint(x) for x in rest[1].split("-"))
        n, i = _uint(rest[2]), _uint(rest[3])
        if a is None or b is None or n is None or i is None or not i < n <= MAX_DELTA_PARTS:
            return None
        return ListTopic("delta", name, b, i, a, n)
    return None


class ManifestError(ListError, ValueError):
    """A manifest document is malformed."""


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: int
    issued_ms: int
    size: int  # bytes of the whole list file
    sha256: bytes  # of the whole file
    body_hash: bytes  # as in the file header
    chunk_size: int
    chunks: tuple[bytes, ...]  # SHA-256 of each chunk
    records: int
    cards: int
    force: bool = False  # `ccus ops list publish --force`: install even if issued long ago

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def to_doc(self) -> dict[str, Any]:
        return {"kind": "snapshot", "name": self.name, "version": self.version,
                "issued_ms": self.issued_ms, "size": self.size, "sha256": self.sha256,
                "body_hash": self.body_hash, "chunk_size": self.chunk_size,
                "chunks": list(self.chunks), "records": self.records, "cards": self.cards,
                **({"force": True} if self.force else {})}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Manifest:
        def need(key: str, typ: type) -> Any:
            v = doc.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ManifestError(f"manifest field {key!r} missing or not {typ.__name__}")
            return v

        if doc.get("kind") != "snapshot":
            raise ManifestError("not a snapshot manifest")
        force = doc.get("force", False)
        if type(force) is not bool:
            raise ManifestError("manifest field 'force' not a bool")
        m = cls(need("name", str), need("version", int), need("issued_ms", int),
                need("size", int), need("sha256", bytes), need("body_hash", bytes),
                need("chunk_size", int), tuple(need("chunks", list)), need("records", int),
                need("cards", int), force)
        if not NAME.match(m.name) or not 0 <= m.version < 1 << 63:
            raise ManifestError("bad name or version")
        if not 0 <= m.issued_ms <= MAX_ISSUED_MS:
            raise ManifestError("issued_ms out of range")
        if not 1 <= m.chunk_size <= MAX_CHUNK_SIZE or not HEADER_SIZE <= m.size <= MAX_LIST_BYTES:
            raise ManifestError("bad chunk size or file size")
        if not 0 <= m.records <= MAX_RECORDS or not 0 <= m.cards < 1 << 32:
            raise ManifestError("records or cards out of range")
        n = -(-m.size // m.chunk_size)
        if n != len(m.chunks) or n > MAX_CHUNKS:
            raise ManifestError("chunk count does not match size / chunk_size")
        if not all(isinstance(h, bytes) and len(h) == 32 for h in m.chunks) \
                or len(m.sha256) != 32 or len(m.body_hash) != 32:
            raise ManifestError("hashes are 32 bytes")
        return m


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = True


def manifest_for(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                 force: bool = False) -> Manifest:
    lst = load_list(data)
    mv = memoryview(data)
    chunks = tuple(hashlib.sha256(mv[i:i + chunk_size]).digest()
                   for i in range(0, len(data), chunk_size))
    return Manifest(lst.name, lst.version, lst.issued_ms, len(data),
                    hashlib.sha256(data).digest(), lst.body_hash, chunk_size, chunks, len(lst),
                    lst.n_cards, force)


def snapshot_messages(data: bytes, key: Ed25519PrivateKey,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, *, force: bool = False) -> list[Message]:
    """Chunks, then the signed manifest (publish in this order)."""
    m = manifest_for(data, chunk_size, force=force)
    out = [Message(chunk_topic(m.name, m.version, i), data[i * chunk_size:(i + 1) * chunk_size])
           for i in range(len(m.chunks))]
    out.append(Message(manifest_topic(m.name), seal(key, MANIFEST_PURPOSE, m.to_doc())))
    return out


def delta_messages(delta: Delta, key: Ed25519PrivateKey,
                   part_size: int = DEFAULT_CHUNK_SIZE) -> list[Message]:
    """The signed delta envelope, split into parts that each fit a broker message."""
    env = seal(key, DELTA_PURPOSE, delta.to_doc())
    n = max(1, -(-len(env) // part_size))
    if n > MAX_DELTA_PARTS:
        raise DeltaError(f"delta too large ({len(env)} bytes): publish a snapshot instead")
    return [Message(delta_topic(delta.name, delta.from_version, delta.to_version, n, i),
                    env[i * part_size:(i + 1) * part_size]) for i in range(n)]


def clear_messages(name: str, version: int, n_chunks: int) -> list[Message]:
    """Empty retained payloads that delete an old snapshot's chunks from the broker."""
    return [Message(chunk_topic(name, version, i), b"") for i in range(n_chunks)]


def open_manifest(keys: Iterable[Ed25519PublicKey], payload: bytes) -> Manifest:
    """Verify + decode; raises SignatureError (reason) or ManifestError."""
    return Manifest.from_doc(open_sealed(keys, MANIFEST_PURPOSE, payload))


def open_delta(keys: Iterable[Ed25519PublicKey], payload: bytes) -> Delta:
    """Verify + decode; raises SignatureError (reason) or DeltaError."""
    return Delta.from_doc(open_sealed(keys, DELTA_PURPOSE, payload))


__all__ = ["DEFAULT_CHUNK_SIZE", "ListTopic", "Manifest", "ManifestError", "Message",
           "MmapIdList", "SignatureError", "DeltaError", "chunk_topic", "clear_messages",
           "delta_messages", "delta_topic", "manifest_for", "manifest_topic", "open_delta",
           "open_manifest", "parse_topic", "snapshot_messages", "subscription"]
