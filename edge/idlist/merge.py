"""Fast delta apply: merge a few thousand changed rows into a mapped list at array level.

Unchanged records and cards are copied as slices (C speed); only the index fields that shift
(card refs, card slots, checkpoints) are remapped, one comprehension each. The output is
byte-identical to `build_rows` over the merged rows; `apply_delta` checks that through the
signed result hash and falls back to the full rebuild if it ever is not.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate

from edge.errors import ListError
from edge.idlist.codec import (
    CARD_LENGTHS,
    MAX_RECORDS,
    ListFormatError,
    MmapIdList,
    Row,
    _pack_u24,
    assemble,
)

_TID_SHIFT, _NC = 17, 0x1FFF


class MergeConflict(ListError, ValueError):
    """The changes do not fit the base (unknown removal, a card mapped twice)."""


def _u24_array(mv: memoryview, n: int) -> array:
    raw = bytearray(4 * n)
    raw[0::4], raw[1::4], raw[2::4] = mv[0::3], mv[1::3], mv[2::3]
    return array("I", bytes(raw))


def _card_slot(lst: MmapIdList, card: bytes) -> tuple[int, int, bool]:
    """(class index, position where `card` is or would go, present?)."""
    cls = lst._classes[len(card) - 4]
    h, tw, tail = int.from_bytes(card[:8], "big"), cls.tail_width, card[8:]
    i = bisect_left(cls.heads, h)
    while i < cls.n and cls.heads[i] == h:
        t = bytes(cls.tails[i * tw:(i + 1) * tw])
        if t == tail:
            return len(card) - 4, i, True
        if t > tail:
            break
        i += 1
    return len(card) - 4, i, False


def _ranges(n: int, cut: list[int], insert_at: list[int]) -> list[tuple[int, int]]:
    """Kept old ranges [a, b) between the sorted positions that are dropped or inserted at."""
    dropped = set(cut)
    out, cursor = [], 0
    for p in sorted(dropped | set(insert_at)):
        out.append((cursor, p))
        cursor = p + 1 if p in dropped else p
    out.append((cursor, n))
    return out


def merge(base: MmapIdList, upsert: Sequence[Row], remove: Sequence[int], *, version: int,
          issued_ms: int) -> bytes:
    n, rec = len(base), base._rec
    rows = sorted(((t, s, lv, tuple(sorted(set(cs)))) for t, s, lv, cs in upsert),
                  key=lambda r: r[0])
    drop: list[int] = []
    for t in remove:
        p = bisect_left(rec, t << _TID_SHIFT)
        if not (p < n and rec[p] >> _TID_SHIFT == t):
            raise MergeConflict("delta removes technicians the base does not hold")
        drop.append(p)
    ins_at: list[int] = []
    for t, *_ in rows:
        p = bisect_left(rec, t << _TID_SHIFT)
        if p < n and rec[p] >> _TID_SHIFT == t:
            drop.append(p)
        ins_at.append(p)
    drop.sort()

    # Records: the plan interleaves kept old ranges and new rows in tid order.
    plan: list[tuple[int, int] | Row] = []
    new_rec: list[bytes] = []
    newidx = array("I", bytes(4 * n))  # old record -> new record (dropped ones: unused)
    new_of: dict[int, int] = {}  # tid of an inserted row -> its new record index
    q, j = 0, 0
    for a, b in _ranges(n, drop, ins_at):
        if b > a:
            plan.append((a, b))
            new_rec.append(rec[a:b].tobytes())
            newidx[a:b] = array("I", range(q, q + b - a))
            q += b - a
        while j < len(rows) and ins_at[j] == b:
            t, st, lv, cs = rows[j]
            plan.append(rows[j])
            new_rec.append(array("Q", [t << _TID_SHIFT | st << 15 | (lv - 1) << 13 | len(cs)])
                           .tobytes())
            new_of[t] = q
            q, j = q + 1, j + 1
    if q > MAX_RECORDS:
        raise ListFormatError(f"at most {MAX_RECORDS} technicians per list")
    rec_bytes = b"".join(new_rec)
    words = array("Q")
    words.frombytes(rec_bytes)
    cum = [0, *accumulate(map(_NC.__and__, words))]
    ckp = array("I", cum[0::16])

    # Cards: per class, drop the cards of dropped records, insert the new rows' cards.
    cut: list[list[int]] = [[] for _ in CARD_LENGTHS]
    for p in drop:
        for c in base._row(p)[3]:
            ci, pos, present = _card_slot(base, c)
            if not present:
                raise ListFormatError("a record's card is missing from its class")
            cut[ci].append(pos)
    adds: list[list[tuple[bytes, int]]] = [[] for _ in CARD_LENGTHS]
    for t, _s, _lv, cs in rows:
        for c in cs:
            adds[len(c) - 4].append((c, new_of[t]))
    sections: list[bytes] = []
    flat = array("I")  # old slot -> new slot (slots of dropped cards: unused)
    slot_of: dict[bytes, int] = {}
    counts: list[int] = []
    for ci, length in enumerate(CARD_LENGTHS):
        cls = base._classes[ci]
        m, tw = cls.n, cls.tail_width
        new_base = sum(counts)
        # arrays, not lists: the lookups jump around, and 4-byte cells miss the cache less
        old_refs = array("I", map(newidx.__getitem__, _u24_array(cls.refs, m)))
        add = sorted(adds[ci])
        if not add and not cut[ci]:
            sections += [cls.heads.tobytes(), cls.tails.tobytes(), _pack_u24(old_refs)]
            flat.extend(range(new_base, new_base + m))
            counts.append(m)
            continue
        dropped = set(cut[ci])
        at: list[int] = []
        for k, (c, _r) in enumerate(add):
            if k and add[k - 1][0] == c:
                raise MergeConflict(f"card {c.hex()} is mapped to two technicians")
            _ci, pos, present = _card_slot(base, c)
            if present and pos not in dropped:
                raise MergeConflict(f"card {c.hex()} is mapped to two technicians")
            at.append(pos)
        heads, tails, refs = [], [], array("I")
        posmap = array("I", bytes(4 * m))
        fmt = "I" if length <= 4 else "Q"
        qq, k = 0, 0
        for a, b in _ranges(m, cut[ci], at):
            if b > a:
                heads.append(cls.heads[a:b].tobytes())
                tails.append(cls.tails[a * tw:b * tw].tobytes())
                refs += old_refs[a:b]
                posmap[a:b] = array("I", range(qq, qq + b - a))
                qq += b - a
            while k < len(add) and at[k] == b:
                c, r = add[k]
                heads.append(array(fmt, [int.from_bytes(c[:8], "big")]).tobytes())
                tails.append(c[8:])
                refs.append(r)
                slot_of[c] = new_base + qq
                qq, k = qq + 1, k + 1
        sections += [b"".join(heads), b"".join(tails), _pack_u24(refs)]
        flat.extend(map(new_base.__add__, posmap))
        counts.append(qq)

    # Slots, in new record order: kept records keep their (remapped) run of old slots.
    old_own = array("I", map(flat.__getitem__, base._own))

    def cards_before(o: int) -> int:
        j0 = o >> 4
        return base._ckp[j0] + sum(w & _NC for w in rec[j0 << 4:o])

    own = array("I")
    for item in plan:
        if len(item) == 2:
            a, b = item  # type: ignore[misc]
            own += old_own[cards_before(a):cards_before(b)]
        else:
            own.extend(slot_of[c] for c in item[3])  # type: ignore[index,misc]
    return assemble([rec_bytes, ckp.tobytes(), own.tobytes(), *sections], q,
                    tuple(counts), name=base.name, version=version, issued_ms=issued_ms)
