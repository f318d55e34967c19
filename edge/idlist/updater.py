"""The device side of list distribution: a state machine fed with manifests, chunks and deltas.

Messages arrive in any order (retained delivery order is the broker's). Rules:
- every manifest and delta is signature-checked before anything else is looked at;
- a chunk is held only for the version a verified manifest names, written straight into the
  snapshot being assembled (whose size, the manifest's, is the whole budget) if its length and
  hash are the manifest's. Any other chunk (before its manifest, for a version nobody signed)
  is dropped and counted; a manifest that starts an assembly after chunks were dropped asks
  for its chunks again (`Outcome.fetch`: a topic filter whose SUBSCRIBE makes the broker send
  its retained chunks once more), so nobody unsigned can put bytes on the device's disk;
- a manifest or delta issued longer ago than `max_issued_age_ms` is refused (too_old) unless
  its signed document says `force` (and it is newer than the applied list, as always);
- a list is installed only complete and verified: assembled/rebuilt in a temp file, fsync'ed,
  checked (whole-file hash, codec, header vs manifest / delta result hash), renamed over
  `{dir}/{name}.idl`, directory fsync'ed; then `current` switches. Until then the previous
  list is served;
- versions only go up; deltas apply only on the exact base (version and body hash) and chain
  from pending ones; a device too far behind waits for the snapshot.
Every message yields Outcomes (applied / pending / ignored / refused + a UpdateReason).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.atomic import fsync_dir
from edge.idlist.codec import ListFormatError, MmapIdList, open_list
from edge.idlist.delta import Delta, DeltaError, apply_delta
from edge.idlist.dist import (
    Manifest,
    ManifestError,
    chunks_filter,
    open_delta,
    open_manifest,
    parse_topic,
)
from edge.signing import SignatureError


class UpdateReason(StrEnum):
    MALFORMED = "malformed"  # not an envelope / not CBOR / fields missing or out of range
    UNKNOWN_KEY = "unknown_key"  # signed by a key the device does not trust
    BAD_SIGNATURE = "bad_signature"
    WRONG_LIST = "wrong_list"  # for another list name
    TOPIC_MISMATCH = "topic_mismatch"  # signed content disagrees with the topic it came on
    STALE_VERSION = "stale_version"  # not newer than the applied list
    ALREADY_APPLIED = "already_applied"  # the applied snapshot's manifest again
    CHUNK_UNKNOWN = "chunk_unknown"  # index outside the manifest
    CHUNK_TRUNCATED = "chunk_truncated"  # shorter than the manifest says
    CHUNK_LENGTH = "chunk_length"  # longer than the manifest says
    CHUNK_HASH = "chunk_hash"
    NO_MANIFEST = "no_manifest"  # chunk for a version no verified manifest names: dropped
    TOO_OLD = "too_old"  # issued longer ago than the window, and not forced
    SNAPSHOT_HASH = "snapshot_hash"  # assembled file's hash differs from the manifest
    LIST_FORMAT = "list_format"  # the codec refused the assembled/rebuilt file
    HEADER_MISMATCH = "header_mismatch"  # file header disagrees with the manifest
    DELTA_GAP = "delta_gap"  # from-version is ahead of the applied one: kept pending
    DELTA_BASE = "delta_base"  # not for the applied list (older base, other hash)
    DELTA_INVALID = "delta_invalid"  # content does not fit (removes unknown IDs, dup cards)
    DELTA_RESULT_HASH = "delta_result_hash"  # rebuilt file is not what the publisher signed
    PENDING_FULL = "pending_full"  # too many deltas waiting for their base
    IO_ERROR = "io_error"  # the disk failed us; nothing was installed
    NO_SPACE = "no_space"  # the list would leave less than min_free_bytes on the disk


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "applied" | "pending" | "ignored" | "refused"
    reason: UpdateReason | None = None
    version: int | None = None  # the version the message was about (applied: the new one)
    detail: str = ""
    fetch: str = ""  # a topic filter to subscribe to now: the broker re-sends its retained chunks


DAY_MS = 86_400_000
DEFAULT_MAX_ISSUED_AGE_MS = 30 * DAY_MS  # [idlist] max_issued_age_days
MIN_FREE_BYTES = 64 << 20  # a list never takes the disk below this (= the outbox's low water)
MAX_DROPPED_VERSIONS = 64  # versions remembered for a re-fetch (noise cannot grow it further)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Assembly:
    """One snapshot being assembled into `{dir}/.{name}.{version}.part`."""

    def __init__(self, manifest: Manifest, path: Path) -> None:
        self.manifest, self.path = manifest, path
        self.have: set[int] = set()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, manifest.size)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class ListUpdater:
    """Keeps `{directory}/{name}.idl` current from list messages; serves `current` meanwhile."""

    def __init__(self, directory: str | os.PathLike[str], name: str,
                 keys: Iterable[Ed25519PublicKey], *, max_pending_deltas: int = 64,
                 max_delta_bytes: int = 64 << 20,
                 max_issued_age_ms: float = DEFAULT_MAX_ISSUED_AGE_MS,
                 now_ms: Callable[[], int] = _wall_ms,
                 min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.directory = Path(directory)
        self.name = name
        self.keys = list(keys)
        self.path = self.directory / f"{name}.idl"
        self.max_pending_deltas = max_pending_deltas
        self.max_delta_bytes = max_delta_bytes
        self.max_issued_age_ms, self._now_ms = max_issued_age_ms, now_ms
        self.min_free_bytes = min_free_bytes
        self._parts: dict[tuple[int, int], tuple[int, dict[int, bytes]]] = {}
        self._parts_bytes = 0  # held in _parts, kept as a running sum
        self._deltas: dict[int, Delta] = {}  # from-version -> delta waiting for its base
        self._assembly: _Assembly | None = None
        self.current: MmapIdList | None = None
        self.load_error: str | None = None
        self.cache_dropped = 0  # cached list files found unreadable and set aside
        self.dropped_chunks = self.dropped_bytes = 0  # chunks no verified manifest named
        # versions whose chunks were dropped (bounded): their manifest asks for them again
        self._dropped_versions: set[int] = set()
        self._dropped_overflow = False  # more versions than that: every new assembly re-fetches
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{name}.*.part"):  # a crash mid-assembly
            stale.unlink(missing_ok=True)
        # the unverified spool of earlier versions: nothing of it is trusted any more
        shutil.rmtree(self.directory / f".{name}.spool", ignore_errors=True)
        if self.path.exists():
            try:
                lst = open_list(self.path)
                if lst.name != name:
                    lst.close()
                    raise ListFormatError(f"file holds list {lst.name!r}")
                self.current = lst
            except (OSError, ListFormatError) as exc:
                self._set_aside(exc)

    @property
    def corrupt_path(self) -> Path:
        """Where an unreadable cached list is moved (the last one only): kept to look at."""
        return self.path.with_name(self.path.name + ".corrupt")

    def _set_aside(self, exc: Exception) -> None:
        """The cached list cannot be served: move it out of the way (a folder in its place is
        left alone) and say so in state(); the next verified snapshot replaces it."""
        self.load_error = f"{self.path}: {exc}"
        self.cache_dropped += 1
        if self.path.is_file():
            try:
                os.replace(self.path, self.corrupt_path)
            except OSError as err:
                self.load_error += f" (cannot move it aside: {err.strerror})"

    @property
    def applied_version(self) -> int:
        """Version being served; 0 when no list is installed yet."""
        return self.current.version if self.current is not None else 0

    def state(self) -> dict[str, object]:
        """What the agent reports in its state message about this list."""
        cur = self.current
        return {"name": self.name, "version": self.applied_version,
                "issued_ms": cur.issued_ms if cur is not None else None,
                "records": len(cur) if cur is not None else 0,
                "body_sha256": cur.body_hash.hex()[:16] if cur is not None else None,
                "assembling": self._assembly.manifest.version if self._assembly else None,
                "pending_deltas": sorted((d.from_version, d.to_version)
                                         for d in self._deltas.values()),
                "load_error": self.load_error, "cache_dropped": self.cache_dropped,
                "dropped_chunks": self.dropped_chunks, "dropped_bytes": self.dropped_bytes}

    def _no_room(self, size: int) -> Outcome | None:
        """Refusal for a list that would leave the disk below min_free_bytes: the outbox (every
        touch) shares it, and a list can wait for the disk to be cleaned up."""
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError as exc:
            return Outcome("refused", UpdateReason.IO_ERROR, None, str(exc))
        if free - size >= self.min_free_bytes:
            return None
        return Outcome("refused", UpdateReason.NO_SPACE, None,
                       f"{size} bytes would leave {max(0, free - size)} free, below "
                       f"{self.min_free_bytes}: free disk space")

    def _too_old(self, issued_ms: int, force: bool) -> Outcome | None:
        """Refusal for a document issued before the window, unless the operator forced it."""
        age = self._now_ms() - issued_ms
        if age <= self.max_issued_age_ms or force:
            return None
        return Outcome("refused", UpdateReason.TOO_OLD, None,
                       f"issued {age // DAY_MS} days ago, beyond idlist.max_issued_age_days "
                       f"({self.max_issued_age_ms / DAY_MS:g}): publish it again, or --force")

    # -- dispatch ------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> list[Outcome]:
        """Feed one MQTT message (any topic under the list's subscription)."""
        t = parse_topic(topic)
        if t is None:
            return [Outcome("refused", UpdateReason.MALFORMED, None, f"not a list topic: {topic}")]
        if t.name != self.name:
            return [Outcome("refused", UpdateReason.WRONG_LIST, None, t.name)]
        if not payload:  # a retained message being cleared
            return [Outcome("ignored", None, t.version, "empty payload")]
        if t.kind == "manifest":
            return self.on_manifest(payload)
        if t.kind == "chunk":
            return self.on_chunk(t.version, t.index, payload)
        return self.on_delta_part(t.from_version, t.version, t.count, t.index, payload)

    # -- manifests -----------------------------------------------------------------------
    def on_manifest(self, payload: bytes) -> list[Outcome]:
        try:
            m = open_manifest(self.keys, payload)
        except SignatureError as exc:
            return [Outcome("refused", UpdateReason(exc.reason), None, str(exc))]
        except ManifestError as exc:
            return [Outcome("refused", UpdateReason.MALFORMED, None, str(exc))]
        if m.name != self.name:
            return [Outcome("refused", UpdateReason.WRONG_LIST, m.version, m.name)]
        cur = self.current
        if cur is not None and m.version == cur.version and m.body_hash == cur.body_hash:
            return [Outcome("ignored", UpdateReason.ALREADY_APPLIED, m.version)]
        if m.version <= self.applied_version:
            return [Outcome("refused", UpdateReason.STALE_VERSION, m.version,
                            f"applied {self.applied_version}")]
        old = self._too_old(m.issued_ms, m.force)
        if old is not None:
            return [dataclasses.replace(old, version=m.version)]
        a = self._assembly
        if a is not None:
            if a.manifest == m:
                return [Outcome("ignored", None, m.version, "manifest already being assembled")]
            if a.manifest.version > m.version:
                return [Outcome("refused", UpdateReason.STALE_VERSION, m.version,
                                f"assembling {a.manifest.version}")]
            a.discard()
            self._assembly = None
        room = self._no_room(m.size)
        if room is not None:
            return [dataclasses.replace(room, version=m.version)]
        try:
            self._assembly = _Assembly(m, self.directory / f".{self.name}.{m.version}.part")
        except OSError as exc:
            self._assembly = None
            return [Outcome("refused", UpdateReason.IO_ERROR, m.version, str(exc))]
        # chunks dropped before this manifest came (a live publish sends them first, retained
        # delivery order is the broker's): ask for them again
        refetch = m.version in self._dropped_versions or self._dropped_overflow
        fetch = chunks_filter(self.name, m.version) if refetch else ""
        self._dropped_versions = {v for v in self._dropped_versions if v > m.version}
        self._dropped_overflow = False
        return [Outcome("pending", None, m.version, f"assembling {len(m.chunks)} chunks",
                        fetch)]

    # -- chunks --------------------------------------------------------------------------
    def on_chunk(self, version: int, index: int, data: bytes) -> list[Outcome]:
        if version <= self.applied_version:
            return [Outcome("ignored", UpdateReason.STALE_VERSION, version)]
        a = self._assembly
        if a is not None and version == a.manifest.version:
            return self._take_chunk(index, data)
        if a is not None and version < a.manifest.version:
            return [Outcome("ignored", UpdateReason.STALE_VERSION, version)]
        # No verified manifest names this version (yet): nothing unsigned is kept. If its
        # manifest comes, the chunks are fetched again (see on_manifest).
        self.dropped_chunks += 1
        self.dropped_bytes += len(data)
        if len(self._dropped_versions) < MAX_DROPPED_VERSIONS:
            self._dropped_versions.add(version)
        elif version not in self._dropped_versions:
            self._dropped_overflow = True
        return [Outcome("ignored", UpdateReason.NO_MANIFEST, version,
                        f"chunk {index}: no verified manifest names version {version}")]

    def _take_chunk(self, index: int, data: bytes) -> list[Outcome]:
        a = self._assembly
        assert a is not None
        m = a.manifest
        if index >= len(m.chunks):
            return [Outcome("refused", UpdateReason.CHUNK_UNKNOWN, m.version, f"chunk {index}")]
        want = m.chunk_length(index)
        if len(data) != want:
            why = UpdateReason.CHUNK_TRUNCATED if len(data) < want else UpdateReason.CHUNK_LENGTH
            return [Outcome("refused", why, m.version, f"chunk {index}: {len(data)} != {want}")]
        if hashlib.sha256(data).digest() != m.chunks[index]:
            return [Outcome("refused", UpdateReason.CHUNK_HASH, m.version, f"chunk {index}")]
        if index in a.have:
            return [Outcome("ignored", None, m.version, f"chunk {index} again")]
        try:
            os.pwrite(a.fd, data, index * m.chunk_size)
        except OSError as exc:
            return [Outcome("refused", UpdateReason.IO_ERROR, m.version, str(exc))]
        a.have.add(index)
        if len(a.have) < len(m.chunks):
            return [Outcome("pending", None, m.version,
                            f"chunk {index} ({len(a.have)}/{len(m.chunks)})")]
        return self._finish_snapshot()

    def _finish_snapshot(self) -> list[Outcome]:
        a = self._assembly
        assert a is not None
        self._assembly = None
        m = a.manifest
        try:
            os.fsync(a.fd)
            with mmap.mmap(a.fd, 0, access=mmap.ACCESS_READ) as mm:
                whole = hashlib.sha256(mm).digest()
            os.close(a.fd)
            a.fd = -1
        except OSError as exc:
            a.discard()
            return [Outcome("refused", UpdateReason.IO_ERROR, m.version, str(exc))]
        if whole != m.sha256:
            a.discard()
            return [Outcome("refused", UpdateReason.SNAPSHOT_HASH, m.version)]
        try:
            lst = open_list(a.path)
        except (OSError, ListFormatError) as exc:
            a.discard()
            return [Outcome("refused", UpdateReason.LIST_FORMAT, m.version, str(exc))]
        if (lst.name, lst.version, lst.issued_ms, lst.body_hash, len(lst)) != \
                (m.name, m.version, m.issued_ms, m.body_hash, m.records):
            lst.close()
            a.discard()
            return [Outcome("refused", UpdateReason.HEADER_MISMATCH, m.version)]
        if m.version <= self.applied_version:  # a delta got there first meanwhile
            lst.close()
            a.discard()
            return [Outcome("ignored", UpdateReason.STALE_VERSION, m.version)]
        return self._install(lst, a.path, "snapshot")

    # -- deltas --------------------------------------------------------------------------
    def on_delta_part(self, from_version: int, to_version: int, count: int, index: int,
                      data: bytes) -> list[Outcome]:
        """One part of a delta envelope; the whole is checked once every part is in."""
        if to_version <= self.applied_version:
            return [Outcome("ignored", UpdateReason.STALE_VERSION, to_version)]
        key = (from_version, to_version)
        if key not in self._parts and len(self._parts) >= self.max_pending_deltas:
            # unsigned until complete: a flood of tiny parts under many topics must not grow
            # the table (the byte budget alone would allow millions of entries)
            return [Outcome("refused", UpdateReason.PENDING_FULL, to_version, "delta parts")]
        n, parts = self._parts.get(key, (count, {}))
        if n != count:  # republished with another split: start over
            self._drop_parts(key)
            n, parts = count, {}
        old = len(parts.get(index, b""))
        if self._parts_bytes - old + len(data) > self.max_delta_bytes:
            return [Outcome("refused", UpdateReason.PENDING_FULL, to_version, "delta parts")]
        parts[index] = data
        self._parts_bytes += len(data) - old
        self._parts[key] = (n, parts)
        if len(parts) < n:
            return [Outcome("pending", None, to_version, f"delta part {index} ({len(parts)}/{n})")]
        self._drop_parts(key)
        return self.on_delta(from_version, to_version, b"".join(parts[i] for i in range(n)))

    def _drop_parts(self, key: tuple[int, int]) -> None:
        _, parts = self._parts.pop(key, (0, {}))
        self._parts_bytes -= sum(len(p) for p in parts.values())

    def on_delta(self, from_version: int, to_version: int, payload: bytes) -> list[Outcome]:
        try:
            d = open_delta(self.keys, payload)
        except SignatureError as exc:
            return [Outcome("refused", UpdateReason(exc.reason), to_version, str(exc))]
        except DeltaError as exc:
            return [Outcome("refused", UpdateReason.MALFORMED, to_version, str(exc))]
        if d.name != self.name:
            return [Outcome("refused", UpdateReason.WRONG_LIST, d.to_version, d.name)]
        if (d.from_version, d.to_version) != (from_version, to_version):
            return [Outcome("refused", UpdateReason.TOPIC_MISMATCH, to_version)]
        applied = self.applied_version
        if d.to_version <= applied:
            return [Outcome("ignored", UpdateReason.STALE_VERSION, d.to_version)]
        old = self._too_old(d.issued_ms, d.force)
        if old is not None:
            return [dataclasses.replace(old, version=d.to_version)]
        if self.current is None or d.from_version > applied:
            if len(self._deltas) >= self.max_pending_deltas and d.from_version not in self._deltas:
                return [Outcome("refused", UpdateReason.PENDING_FULL, d.to_version)]
            held = self._deltas.get(d.from_version)
            if held is None or held.to_version < d.to_version:
                self._deltas[d.from_version] = d
            return [Outcome("pending", UpdateReason.DELTA_GAP, d.to_version,
                            f"waiting for version {d.from_version}, applied {applied}")]
        if d.from_version < applied:
            return [Outcome("refused", UpdateReason.DELTA_BASE, d.to_version,
                            f"delta from {d.from_version}, applied {applied}")]
        return self._apply_delta(d)

    def _apply_delta(self, d: Delta) -> list[Outcome]:
        cur = self.current
        assert cur is not None
        try:
            data = apply_delta(cur, d)
        except DeltaError as exc:
            return [Outcome("refused", UpdateReason(exc.reason), d.to_version, str(exc))]
        room = self._no_room(len(data))
        if room is not None:
            return [dataclasses.replace(room, version=d.to_version)]
        tmp = self.directory / f".{self.name}.{d.to_version}.delta.part"  # never the assembly's
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            lst = open_list(tmp)
        except (OSError, ListFormatError) as exc:
            tmp.unlink(missing_ok=True)
            return [Outcome("refused", UpdateReason.IO_ERROR, d.to_version, str(exc))]
        return self._install(lst, tmp, "delta")

    # -- install -------------------------------------------------------------------------
    def _install(self, lst: MmapIdList, tmp: Path, how: str) -> list[Outcome]:
        try:
            os.replace(tmp, self.path)
            fsync_dir(self.directory)
        except OSError as exc:
            lst.close()
            tmp.unlink(missing_ok=True)
            return [Outcome("refused", UpdateReason.IO_ERROR, lst.version, str(exc))]
        lst.path = str(self.path)
        # The old list object stays valid (its mapping keeps the old inode) for whoever holds it.
        self.current = lst
        self.load_error = None
        out = [Outcome("applied", None, lst.version, how)]
        if self._assembly is not None and self._assembly.manifest.version <= lst.version:
            self._assembly.discard()
            self._assembly = None
        for k in [k for k, d in self._deltas.items() if d.from_version < lst.version]:
            del self._deltas[k]
        for k in [k for k in self._parts if k[1] <= lst.version]:
            self._drop_parts(k)
        nxt = self._deltas.pop(lst.version, None)
        if nxt is not None:
            out += self._apply_delta(nxt)
        return out
