"""The on-disk ID-list format v1: build it, map it, look technicians up by ID or by card.

Layout (little-endian; every section starts on an 8-byte boundary; see docs/idlist.md):

    header   256 bytes: magic, format, list name/version/issued_ms, counts, body SHA-256,
             header SHA-256
    REC      u64 per technician, sorted: tid << 17 | status << 15 | (level-1) << 13 | ncards
    CKP      u32 every 16 records: cards held by records before it (finds a record's cards)
    OWN      u32 per card in record order: its position in the classes laid end to end
    class L  for each card length L in 4..10: heads (u32 for L=4, else u64: the first
             min(L,8) bytes big-endian), tails (L-8 bytes for L>8), refs (u24 record index);
             sorted by card bytes
    TOP      every 512th key of REC, then of each class's heads: a two-step bisect

Lookups are `bisect` over memoryviews cast to u64/u32 (C speed, no parsing at load).
Everything wrong with a file raises `ListFormatError`, and nothing else.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from itertools import accumulate

from edge.errors import ListError
from edge.idlist.base import Entry, ListIdentity, Status

MAGIC = b"CCUSIDL\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 256
CARD_LENGTHS = tuple(range(4, 11))
MAX_RECORDS = (1 << 24) - 1  # refs are 24-bit
MAX_CARDS_PER_ID = (1 << 13) - 1
STRIDE = 512  # TOP sections sample every 512th key: one 4 KiB page of u64 per sample
TID_LIMIT = 10**14  # 14 decimal digits fit in 47 bits
NAME = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")  # one MQTT topic level, no wildcards
STATUSES = (Status.ACTIVE, Status.SUSPENDED, Status.REVOKED)
STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}

_TID_SHIFT, _ST_SHIFT, _LV_SHIFT, _NC_MASK = 17, 15, 13, 0x1FFF
# magic, format, header size, flags, version, issued_ms, n_records, n_cards, 7 class counts,
# body size, body sha256, name length, name; then zeros up to the header hash at 224.
_HDR = struct.Struct("<8sHHIQqII7IQ32sB63s")
_HDR_HASH_AT = HEADER_SIZE - 32

Row = tuple[int, int, int, tuple[bytes, ...]]  # (tid, status code, level, sorted cards)


_new_entry = object.__new__
_set = object.__setattr__


class ListFormatError(ListError, ValueError):
    """The bytes are not a valid v1 ID list (or a list could not be built from the rows)."""


if sys.byteorder != "little":  # pragma: no cover - every Pi and PC we target is little-endian
    raise ImportError("edge.idlist.codec maps little-endian arrays; big-endian hosts unsupported")


def _align(n: int) -> int:
    return (n + 7) & ~7


def _head_width(length: int) -> int:
    return 4 if length <= 4 else 8


def _layout(n_records: int, class_counts: tuple[int, ...]) -> tuple[list[tuple[int, int]], int]:
    """Section (offset, size) list in file order, and the total file size."""
    n_cards = sum(class_counts)
    sizes = [n_records * 8, (n_records // 16 + 1) * 4, n_cards * 4]
    for length, count in zip(CARD_LENGTHS, class_counts, strict=True):
        sizes += [count * _head_width(length), count * max(0, length - 8), count * 3]
    sizes.append(-(-n_records // STRIDE) * 8)  # TOP of REC
    for length, count in zip(CARD_LENGTHS, class_counts, strict=True):
        sizes.append(-(-count // STRIDE) * _head_width(length))  # TOP of each class's heads
    out, off = [], HEADER_SIZE
    for size in sizes:
        out.append((off, size))
        off = _align(off + size)
    return out, off


def row_of(entry: Entry) -> Row:
    cards = tuple(sorted({bytes(c) for c in entry.cards}))
    return (int(entry.tid), STATUS_CODE[Status(entry.status)], entry.level, cards)


def entry_of(row: Row) -> Entry:
    return Entry(f"{row[0]:014d}", STATUSES[row[1]], row[2], row[3])


def _pack_u24(values: list[int] | array) -> bytes:
    raw = array("I", values).tobytes()
    out = bytearray(len(values) * 3)
    out[0::3], out[1::3], out[2::3] = raw[0::4], raw[1::4], raw[2::4]
    return bytes(out)


def build_list(entries: Iterable[Entry], *, name: str, version: int, issued_ms: int) -> bytes:
    """Encode entries as a v1 list file. Cards of a technician are stored sorted, deduplicated."""
    return build_rows([row_of(e) for e in entries], name=name, version=version,
                      issued_ms=issued_ms)


def build_rows(rows: list[Row], *, name: str, version: int, issued_ms: int) -> bytes:
    """Encode raw rows (sorted in place by tid); deterministic: the same set of rows gives the
    same bytes (cards of a technician are stored sorted, deduplicated)."""
    if not NAME.match(name):
        raise ListFormatError(f"list name must match {NAME.pattern}, got {name!r}")
    if not 0 <= version < 1 << 63 or not -(1 << 63) <= issued_ms < 1 << 63:
        raise ListFormatError("version / issued_ms out of range")
    if len(rows) > MAX_RECORDS:
        raise ListFormatError(f"at most {MAX_RECORDS} technicians per list")
    rows.sort(key=lambda r: r[0])
    words = array("Q")
    ckp = array("I")
    classes: dict[int, list[tuple[bytes, int, int]]] = {n: [] for n in CARD_LENGTHS}
    k, prev = 0, -1
    for r, (tid, st, lvl, cards) in enumerate(rows):
        if not prev < tid < TID_LIMIT or not 0 <= st <= 2 or not 1 <= lvl <= 4:
            raise ListFormatError(f"bad or duplicate row for technician {tid!r}")
        if len(cards) > MAX_CARDS_PER_ID:
            raise ListFormatError(f"technician {tid:014d}: more than {MAX_CARDS_PER_ID} cards")
        prev = tid
        if len(cards) > 1:  # canonical order, so equal rows always give equal bytes
            cards = tuple(sorted(set(cards)))
        if r & 15 == 0:
            ckp.append(k)
        words.append(tid << _TID_SHIFT | st << _ST_SHIFT | (lvl - 1) << _LV_SHIFT | len(cards))
        for c in cards:
            if len(c) not in classes:
                raise ListFormatError(f"card identifiers are 4..10 bytes, got {c.hex()}")
            classes[len(c)].append((c, r, k))
            k += 1
    while len(ckp) < len(rows) // 16 + 1:
        ckp.append(k)
    own = array("I", bytes(4 * k))
    sections = [words.tobytes(), ckp.tobytes(), b""]  # OWN filled below
    counts = []
    for length in CARD_LENGTHS:
        cls = classes[length]
        cls.sort()
        for i in range(1, len(cls)):
            if cls[i][0] == cls[i - 1][0]:
                raise ListFormatError(f"card {cls[i][0].hex()} is mapped to two technicians")
        base = sum(counts)  # slots count through the classes laid end to end
        for pos, (_c, _r, kk) in enumerate(cls):
            own[kk] = base + pos
        hw = _head_width(length)
        heads = array("I" if hw == 4 else "Q", [int.from_bytes(c[:8], "big") for c, _, _ in cls])
        sections += [heads.tobytes(), b"".join(c[8:] for c, _, _ in cls),
                     _pack_u24([r for _, r, _ in cls])]
        counts.append(len(cls))
    sections[2] = own.tobytes()
    return assemble(sections, len(rows), tuple(counts), name=name, version=version,
                    issued_ms=issued_ms)


def assemble(sections: list[bytes], n_records: int, class_counts: tuple[int, ...], *,
             name: str, version: int, issued_ms: int) -> bytes:
    """Lay out ready sections (REC, CKP, OWN, then heads/tails/refs per class) with a header;
    the TOP sections are derived here."""
    rec = array("Q")
    rec.frombytes(sections[0])
    tops = [rec[::STRIDE].tobytes()]
    for i, length in enumerate(CARD_LENGTHS):
        heads = array("I" if _head_width(length) == 4 else "Q")
        heads.frombytes(sections[3 + 3 * i])
        tops.append(heads[::STRIDE].tobytes())
    sections = [*sections, *tops]
    layout, total = _layout(n_records, class_counts)
    buf = bytearray(total)
    for (off, size), data in zip(layout, sections, strict=True):
        if len(data) != size:
            raise ListFormatError(f"section of {len(data)} bytes where {size} belong")
        buf[off:off + size] = data
    body_hash = hashlib.sha256(memoryview(buf)[HEADER_SIZE:]).digest()
    raw_name = name.encode("ascii")
    _HDR.pack_into(buf, 0, MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, version, issued_ms, n_records,
                   sum(class_counts), *class_counts, total - HEADER_SIZE, body_hash,
                   len(raw_name), raw_name)
    buf[_HDR_HASH_AT:HEADER_SIZE] = hashlib.sha256(buf[:_HDR_HASH_AT]).digest()
    return bytes(buf)


class _CardClass:
    __slots__ = ("length", "heads", "tails", "refs", "tail_width", "n", "top")

    def __init__(self, length: int, heads: memoryview, tails: memoryview, refs: memoryview,
                 n: int) -> None:
        self.length, self.heads, self.tails, self.refs, self.n = length, heads, tails, refs, n
        self.tail_width = max(0, length - 8)
        self.top: list[int] = []


class MmapIdList(ListIdentity):
    """A v1 list served straight from a buffer (an mmap of the file, or bytes in tests).

    Loading parses the 256-byte header only (plus, with verify=True, one SHA-256 over the
    body); lookups touch a few pages. Implements the IdList protocol.
    """

    def __init__(self, buffer: bytes | bytearray | memoryview | mmap.mmap, *,
                 verify: bool = True, path: str | None = None) -> None:
        self.path = path
        self._buffer = buffer
        self._views: list[memoryview] = []
        mv = memoryview(buffer)
        self._views.append(mv)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
            self._views.append(mv)
        try:
            self._parse(mv, verify)
        except ListFormatError:
            self.close()
            raise
        except (struct.error, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
            self.close()
            raise ListFormatError(f"unreadable list: {exc}") from None

    def _parse(self, mv: memoryview, verify: bool) -> None:
        if len(mv) < HEADER_SIZE or bytes(mv[:8]) != MAGIC:
            raise ListFormatError("not an ID list (bad magic or shorter than a header)")
        header = bytes(mv[:HEADER_SIZE])
        if hashlib.sha256(header[:_HDR_HASH_AT]).digest() != header[_HDR_HASH_AT:]:
            raise ListFormatError("header checksum mismatch")
        (_magic, fmt, hsize, _flags, version, issued_ms, n_rec, n_cards, *rest) = \
            _HDR.unpack_from(header)
        counts, (body_size, body_hash, name_len, raw_name) = tuple(rest[:7]), rest[7:]
        if fmt != FORMAT_VERSION or hsize != HEADER_SIZE:
            raise ListFormatError(f"unsupported list format {fmt} (header {hsize})")
        name = raw_name[:name_len].decode("ascii")
        if not NAME.match(name):
            raise ListFormatError("bad list name in header")
        if n_rec > MAX_RECORDS or sum(counts) != n_cards:
            raise ListFormatError("inconsistent counts in header")
        layout, total = _layout(n_rec, counts)
        if total != len(mv) or body_size != total - HEADER_SIZE:
            raise ListFormatError(f"size mismatch: header says {body_size + HEADER_SIZE}, "
                                  f"layout needs {total}, have {len(mv)}")
        if verify and hashlib.sha256(mv[HEADER_SIZE:]).digest() != body_hash:
            raise ListFormatError("body hash mismatch (corrupt or truncated list)")
        self._name, self._version, self._issued_ms = name, version, issued_ms
        self.body_hash: bytes = body_hash
        self.n_cards = n_cards

        def view(i: int, fmt: str = "B") -> memoryview:
            off, size = layout[i]
            v = mv[off:off + size]
            self._views.append(v)
            if fmt != "B":
                v = v.cast(fmt)
                self._views.append(v)
            return v

        self._rec = view(0, "Q")
        self._ckp = view(1, "I")
        self._own = view(2, "I")
        self._classes: list[_CardClass] = []
        for i, (length, count) in enumerate(zip(CARD_LENGTHS, counts, strict=True)):
            base = 3 + 3 * i
            self._classes.append(_CardClass(
                length, view(base, "I" if _head_width(length) == 4 else "Q"), view(base + 1),
                view(base + 2), count))
        self._class_base = [0, *accumulate(counts)]  # first slot of each class
        # TOP samples as small Python lists: the first bisect step runs in memory and the
        # second touches one page, instead of ~12 scattered pages per lookup.
        self._rec_top = view(24, "Q").tolist()
        for i, cls in enumerate(self._classes):
            cls.top = view(25 + i, "I" if _head_width(cls.length) == 4 else "Q").tolist()
        self._n = n_rec

    # -- IdList protocol (name, version, issued_ms: ListIdentity) ------------------------
    def __len__(self) -> int:
        return self._n

    def by_tid(self, tid: str) -> Entry | None:
        if len(tid) != 14 or not tid.isascii() or not tid.isdigit():
            return None
        t = int(tid)
        rec = self._rec
        k = t << _TID_SHIFT
        lo = max(bisect_left(self._rec_top, k) - 1, 0) * STRIDE
        i = bisect_left(rec, k, lo, min(lo + STRIDE, self._n))
        if i < self._n and rec[i] >> _TID_SHIFT == t:
            return self._entry(i, tid)
        return None

    def by_card(self, card: bytes) -> Entry | None:
        r = self.record_of_card(card)
        return None if r is None else self._entry(r)

    # -- the rest ------------------------------------------------------------------------
    def record_of_card(self, card: bytes) -> int | None:
        n = len(card)
        if not 4 <= n <= 10:
            return None
        cls = self._classes[n - 4]
        heads = cls.heads
        h = int.from_bytes(card[:8], "big")
        lo = max(bisect_left(cls.top, h) - 1, 0) * STRIDE
        i = bisect_left(heads, h, lo, min(lo + STRIDE, cls.n))
        tw, tail = cls.tail_width, bytes(card[8:])
        while i < cls.n and heads[i] == h:
            if not tw or cls.tails[i * tw:(i + 1) * tw] == tail:
                r = int.from_bytes(cls.refs[i * 3:i * 3 + 3], "little")
                if r >= self._n:
                    raise ListFormatError("card reference out of range")
                return r
            i += 1
        return None

    def _cards_from(self, start: int, count: int) -> tuple[bytes, ...]:
        out = []
        for slot in self._own[start:start + count]:
            ci = bisect_right(self._class_base, slot) - 1
            if ci >= len(CARD_LENGTHS):
                raise ListFormatError("card slot out of range")
            cls, pos, length = self._classes[ci], slot - self._class_base[ci], ci + 4
            head = cls.heads[pos].to_bytes(min(length, 8), "big")
            tw = cls.tail_width
            out.append(head + bytes(cls.tails[pos * tw:(pos + 1) * tw]) if tw else head)
        if len(out) != count:
            raise ListFormatError("card slots out of range")
        return tuple(out)

    def _row(self, r: int) -> Row:
        w = self._rec[r]
        st, nc = (w >> _ST_SHIFT) & 3, w & _NC_MASK
        if st > 2 or w >> _TID_SHIFT >= TID_LIMIT:
            raise ListFormatError(f"bad status or technician id in record {r}")
        cards: tuple[bytes, ...] = ()
        if nc:
            j = r >> 4
            start = self._ckp[j]
            if r & 15:
                start += sum(map(_NC_MASK.__and__, self._rec[j << 4:r]))
            cards = self._cards_from(start, nc)
        return (w >> _TID_SHIFT, st, ((w >> _LV_SHIFT) & 3) + 1, cards)

    def _entry(self, r: int, tid: str | None = None) -> Entry:
        t, st, lvl, cards = self._row(r)
        # Fields come from a checked file (tid < 10**14, level from 2 bits, status checked):
        # skip Entry's validation, which costs as much as the lookup itself.
        e = _new_entry(Entry)
        _set(e, "tid", tid or f"{t:014d}")
        _set(e, "status", STATUSES[st])
        _set(e, "level", lvl)
        _set(e, "cards", cards)
        return e

    def rows(self) -> list[Row]:
        """Every row in tid order (for deltas and rebuilds); one pass, no per-row bisect."""
        slots = self._own.tolist()
        heads = [c.heads.tolist() for c in self._classes]
        bases = self._class_base
        out: list[Row] = []
        k = 0
        for w in self._rec.tolist():
            st, nc = (w >> _ST_SHIFT) & 3, w & _NC_MASK
            if st > 2 or w >> _TID_SHIFT >= TID_LIMIT:
                raise ListFormatError("bad status or technician id")
            cards: tuple[bytes, ...] = ()
            if nc:
                cs = []
                for slot in slots[k:k + nc]:
                    ci = bisect_right(bases, slot) - 1
                    if ci >= len(CARD_LENGTHS):
                        raise ListFormatError("card slot out of range")
                    length, pos = ci + 4, slot - bases[ci]
                    b = heads[length - 4][pos].to_bytes(min(length, 8), "big")
                    if length > 8:
                        tw = length - 8
                        b += bytes(self._classes[length - 4].tails[pos * tw:(pos + 1) * tw])
                    cs.append(b)
                if len(cs) != nc:
                    raise ListFormatError("card slots out of range")
                cards = tuple(cs)
                k += nc
            out.append((w >> _TID_SHIFT, st, ((w >> _LV_SHIFT) & 3) + 1, cards))
        return out

    def __iter__(self) -> Iterator[Entry]:
        return (entry_of(r) for r in self.rows())

    def close(self) -> None:
        """Release the mapping now (otherwise it goes when the object does)."""
        for v in reversed(self._views):
            v.release()
        self._views.clear()
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()

    def __repr__(self) -> str:
        return f"<MmapIdList {self._name!r} v{self._version} {self._n} ids {self.path or ''}>"


def load_list(data: bytes | bytearray | memoryview, *, verify: bool = True) -> MmapIdList:
    """A list over bytes already in memory (received, or built)."""
    return MmapIdList(data, verify=verify)


def open_list(path: str | os.PathLike[str], *, verify: bool = True) -> MmapIdList:
    """Map a list file read-only. verify=True checks the body SHA-256 in one pass of read()s,
    not through the mapping, so verifying does not make the whole file resident."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE:
            raise ListFormatError(f"{path}: too short for an ID list ({size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):  # bisects jump around: no readahead, map only the
            mm.madvise(mmap.MADV_RANDOM)  # pages a lookup touches
        lst = MmapIdList(mm, verify=False, path=path)
        if verify:
            h = hashlib.sha256()
            f.seek(HEADER_SIZE)
            buf = bytearray(1 << 20)
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
            if h.digest() != lst.body_hash:
                lst.close()
                raise ListFormatError(f"{path}: body hash mismatch (corrupt or truncated list)")
    return lst


