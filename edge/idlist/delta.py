"""ID-list deltas: the changes between two versions, and applying them to rebuild a list file.

A delta names its list, its base (version + body hash) and its result (version, issued_ms,
body hash). The builder is deterministic, so the device rebuilds the file and checks it is
byte-for-byte the publisher's: a delta can never produce a list nobody signed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge.errors import ListError
from edge.idlist.codec import (
    CARD_LENGTHS,
    MAX_CARDS_PER_ID,
    NAME,
    TID_LIMIT,
    ListFormatError,
    MmapIdList,
    Row,
    build_rows,
    load_list,
)
from edge.idlist.merge import MergeConflict, merge
from protocol.touch import MAX_TS_MS as MAX_ISSUED_MS  # issue times: UTC ms up to year 9999


class DeltaError(ListError, ValueError):
    """A delta document is malformed or does not fit the list it is applied to.

    `reason`: delta_invalid (bad content), delta_base (not for the applied list),
    delta_result_hash (the rebuilt file is not the one the publisher signed).
    """

    def __init__(self, message: str, reason: str = "delta_invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Delta:
    name: str
    from_version: int
    to_version: int
    issued_ms: int
    base_hash: bytes  # body SHA-256 of the from-version file
    result_hash: bytes  # body SHA-256 of the to-version file
    upsert: tuple[Row, ...] = field(default=())  # added or changed technicians, whole rows
    remove: tuple[int, ...] = field(default=())  # technician IDs (as ints) that leave the list
    force: bool = False  # `ccus ops list publish --force`: apply even if issued long ago

    def __len__(self) -> int:
        return len(self.upsert) + len(self.remove)

    def to_doc(self) -> dict[str, Any]:
        return {
            "kind": "delta", "name": self.name, "from": self.from_version, "to": self.to_version,
            "issued_ms": self.issued_ms, "base_hash": self.base_hash,
            "result_hash": self.result_hash,
            "upsert": [[t, s, lv, list(cs)] for t, s, lv, cs in self.upsert],
            "remove": list(self.remove),
            **({"force": True} if self.force else {}),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Delta:
        """Validate a (signature-checked) document; raises DeltaError on any bad field."""
        def need(key: str, typ: type) -> Any:
            v = doc.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise DeltaError(f"delta field {key!r} missing or not {typ.__name__}")
            return v

        if doc.get("kind") != "delta":
            raise DeltaError("not a delta document")
        upsert: list[Row] = []
        for item in need("upsert", list):
            if (not isinstance(item, list) or len(item) != 4
                    or not all(type(x) is int for x in item[:3])
                    or not isinstance(item[3], list)
                    or not all(isinstance(c, bytes) and len(c) in CARD_LENGTHS for c in item[3])
                    or len(item[3]) > MAX_CARDS_PER_ID):
                raise DeltaError("bad upsert row")
            t, s, lv, cs = item
            if not 0 <= t < TID_LIMIT or not 0 <= s <= 2 or not 1 <= lv <= 4:
                raise DeltaError("upsert row out of range")
            upsert.append((t, s, lv, tuple(sorted(set(cs)))))
        remove = need("remove", list)
        if not all(type(t) is int and 0 <= t < TID_LIMIT for t in remove):
            raise DeltaError("bad remove entry")
        touched = [r[0] for r in upsert] + remove
        if len(set(touched)) != len(touched):
            raise DeltaError("a technician appears twice in one delta")
        base_hash, result_hash = need("base_hash", bytes), need("result_hash", bytes)
        if len(base_hash) != 32 or len(result_hash) != 32:
            raise DeltaError("hashes are 32 bytes")
        frm, to = need("from", int), need("to", int)
        if not 0 <= frm < to < 1 << 63:
            raise DeltaError("a delta goes from a lower to a higher version")
        name, issued = need("name", str), need("issued_ms", int)
        if not NAME.match(name):
            raise DeltaError("bad list name")
        if not 0 <= issued <= MAX_ISSUED_MS:  # the header's i64, bounded like a touch's ts
            raise DeltaError("issued_ms out of range")
        force = doc.get("force", False)
        if type(force) is not bool:
            raise DeltaError("delta field 'force' not a bool")
        return cls(name, frm, to, issued, base_hash, result_hash, tuple(upsert), tuple(remove),
                   force)


def diff(old: MmapIdList, new: MmapIdList) -> Delta:
    """The delta that turns `old` into `new` (one merge walk over both, in tid order)."""
    if old.name != new.name:
        raise DeltaError(f"lists differ in name: {old.name!r} vs {new.name!r}")
    if new.version <= old.version:
        raise DeltaError("a delta goes from a lower to a higher version")
    a, b = old.rows(), new.rows()
    upsert: list[Row] = []
    remove: list[int] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if j == len(b) or (i < len(a) and a[i][0] < b[j][0]):
            remove.append(a[i][0])
            i += 1
        elif i == len(a) or b[j][0] < a[i][0]:
            upsert.append(b[j])
            j += 1
        else:
            if a[i] != b[j]:
                upsert.append(b[j])
            i += 1
            j += 1
    return Delta(new.name, old.version, new.version, new.issued_ms, old.body_hash,
                 new.body_hash, tuple(upsert), tuple(remove))


def apply_delta(base: MmapIdList, delta: Delta) -> bytes:
    """Rebuild the list file the delta leads to. Raises DeltaError if it does not fit `base`
    or the result is not the file the publisher hashed."""
    if delta.name != base.name:
        raise DeltaError("delta is for another list", "delta_base")
    if delta.from_version != base.version or delta.base_hash != base.body_hash:
        raise DeltaError("delta base is not the applied list", "delta_base")
    try:
        data: bytes | None = merge(base, delta.upsert, delta.remove, version=delta.to_version,
                                   issued_ms=delta.issued_ms)
    except MergeConflict as exc:
        raise DeltaError(f"delta does not fit the list: {exc}") from None
    except Exception:  # the merge is an optimisation: any surprise goes to the reference
        data = None
    if data is not None and _body_hash(data) == delta.result_hash:
        return data
    # Never install a merge whose result differs from what the publisher signed without
    # asking the reference rebuild.
    data = rebuild(base, delta)
    if _body_hash(data) != delta.result_hash:
        raise DeltaError("rebuilt list does not match the delta's result hash",
                         "delta_result_hash")
    return data


def rebuild(base: MmapIdList, delta: Delta) -> bytes:
    """Reference apply: every row through build_rows (seconds for millions of rows)."""
    changed = {r[0] for r in delta.upsert}
    gone = set(delta.remove)
    try:
        rows = base.rows()
    except ListFormatError as exc:
        raise DeltaError(f"the applied list is unreadable: {exc}") from None
    if {r[0] for r in rows if r[0] in gone} != gone:
        raise DeltaError("delta removes technicians the base does not hold")
    changed |= gone
    kept = [r for r in rows if r[0] not in changed] if changed else rows
    kept.extend(delta.upsert)
    try:
        return build_rows(kept, name=base.name, version=delta.to_version,
                          issued_ms=delta.issued_ms)
    except ListFormatError as exc:
        raise DeltaError(f"delta leads to an invalid list: {exc}") from None


def _body_hash(data: bytes) -> bytes:
    return load_list(data, verify=False).body_hash
