"""The ID-list lookup protocol, its entry type, and a small in-memory implementation."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

TECHNICIAN_ID = re.compile(r"[0-9]{14}\Z")


class Status(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Entry:
    """One technician as the list knows them."""

    tid: str  # 14 ASCII digits (技能者ID); no public check-digit rule, so nothing more is checked
    status: Status
    level: int = 1  # card level 1..4
    cards: tuple[bytes, ...] = field(default=())  # UIDs / IDms mapped to this technician

    def __post_init__(self) -> None:
        if not TECHNICIAN_ID.match(self.tid):
            raise ValueError(f"technician id must be 14 ASCII digits, got {self.tid!r}")
        if not 1 <= self.level <= 4:
            raise ValueError(f"card level must be 1..4, got {self.level}")


class IdList(Protocol):
    """What the decision core needs from a list; every implementation serves this."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def issued_ms(self) -> int: ...

    def by_tid(self, tid: str) -> Entry | None: ...

    def by_card(self, card: bytes) -> Entry | None: ...

    def __len__(self) -> int: ...


class ListIdentity:
    """The name, version and issue time every list implementation reports (set by __init__)."""

    _name: str
    _version: int
    _issued_ms: int

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return self._version

    @property
    def issued_ms(self) -> int:
        return self._issued_ms


class MemoryIdList(ListIdentity):
    """A dict-backed list: fine for tests, the demo and small sites."""

    def __init__(self, entries: Iterable[Entry], *, name: str = "default", version: int = 0,
                 issued_ms: int = 0) -> None:
        self._name, self._version, self._issued_ms = name, version, issued_ms
        self._by_tid: dict[str, Entry] = {}
        self._by_card: dict[bytes, Entry] = {}
        for e in entries:
            self._by_tid[e.tid] = e
            for c in e.cards:
                self._by_card[bytes(c)] = e
    def by_tid(self, tid: str) -> Entry | None:
        return self._by_tid.get(tid)

    def by_card(self, card: bytes) -> Entry | None:
        return self._by_card.get(bytes(card))

    def __len__(self) -> int:
        return len(self._by_tid)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._by_tid.values())


def read_technicians_csv(path: str | Path) -> Iterator[Entry]:
    """Rows of `tid,status,level,cards` (cards: hex identifiers separated by spaces or ';').

    Raises ValueError naming the line for a bad row.
    """
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            try:
                cards = tuple(
                    bytes.fromhex(c) for c in re.split(r"[;\s]+", row.get("cards") or "") if c
                )
                yield Entry(
                    tid=(row["tid"] or "").strip(),
                    status=Status((row.get("status") or "active").strip()),
                    level=int(row.get("level") or 1),
                    cards=cards,
                )
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
