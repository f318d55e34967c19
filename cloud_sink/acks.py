"""End-to-end acknowledgement, sink side: per device, the contiguous stored prefix and the gaps.

Rules of this file:

- SeqTracker is pure: it is fed the seqs of one device that are committed in the store, in any
  order, with repeats, and says up to which seq *everything* is stored (``upto``) and which
  ranges above it are missing (``gaps()``). It never moves backwards.
- AckLedger is the adapter (on the store, SQLite or PostgreSQL; the sink's writer process owns
  it): it keeps a tracker per device, loads it from the store's touches table the first time a
  device is seen (the store, not memory, is the truth), reloads it when
  gaps persist (another sink in the shared-subscription group may have stored the missing
  touches), keeps the open and closed gaps in the ``seq_gaps`` table, and says which devices
  need an acknowledgement published. It is called only after the batch is committed.
- seq_gaps is derived from what is stored, never from a process's memory: each write of a
  device's gaps replaces that device's open rows by its current missing ranges (a shrunk gap
  keeps the time it was first seen), so a restarted sink or writer can neither open a gap
  again nor keep one open that is filled.
- A gap means loss somewhere or a replay in progress: it is logged and kept in seq_gaps; the
  acknowledgement covers only the contiguous prefix, so the device keeps and replays the rest.
- A dead letter of a device's own touch counts as accounted for (the store keeps its seq:
  cloud_sink.deadletters.dead_letter_key); the ledger reads that from the store like a touch.
- It imports no store module: the store (or what to read gaps from) is passed in, so the
  store backends may import what they share with it without a cycle.
"""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud_sink.stores.base import SqlStore

log = logging.getLogger(__name__)

RESYNC_S = 1.0  # with gaps open, re-read the store at most this often per device


class SeqTracker:
    """The contiguous prefix of a set of positive seqs, kept incrementally (pure)."""

    __slots__ = ("upto", "_above")

    def __init__(self, upto: int = 0, above: Iterable[int] = ()) -> None:
        self.upto = upto
        self._above: set[int] = {s for s in above if s > upto}
        self._advance()

    def add(self, seq: int) -> bool:
        """Record a stored seq. Returns False when it was known already (a repeat)."""
        if seq <= self.upto or seq in self._above:
            return False
        if seq == self.upto + 1:
            self.upto = seq
            self._advance()
        else:
            self._above.add(seq)
        return True

    def _advance(self) -> None:
        above = self._above
        while above and self.upto + 1 in above:
            self.upto += 1
            above.discard(self.upto)

    @property
    def max_seen(self) -> int:
        return max(self._above) if self._above else self.upto

    @property
    def has_gaps(self) -> bool:
        return bool(self._above)

    def gaps(self) -> list[tuple[int, int]]:
        """Missing ranges (first, last), inclusive, between upto and the highest seq seen."""
        out: list[tuple[int, int]] = []
        prev = self.upto
        for s in sorted(self._above):
            if s > prev + 1:
                out.append((prev + 1, s - 1))
            prev = s
        return out


@dataclass
class _Device:
    site: str
    tracker: SeqTracker
    published: int = -1                  # last upto this process published
    # the gaps last written to seq_gaps; None: not yet reconciled with the store's rows (a
    # fresh process must close what an earlier one left open, not trust an empty list)
    gaps: list[tuple[int, int]] | None = None
    loaded_at: float = 0.0


@dataclass(frozen=True)
class Ack:
    site: str
    device: str
    upto: int


class AckLedger:
    """The sink's per-device acknowledgement state, read from and kept in the store itself
    (SQLite or PostgreSQL: ``device_prefix``, ``sync_gaps`` and ``known_devices`` of
    cloud_sink.stores.base)."""

    def __init__(self, store: "SqlStore") -> None:
        self._devices: dict[str, _Device] = {}
        self.gaps_opened = 0
        self.store = store

    def _load(self, device: str) -> SeqTracker:
        upto, above = self.store.device_prefix(device)
        return SeqTracker(upto, above)

    def _device(self, site: str, device: str, now: float) -> _Device:
        d = self._devices.get(device)
        if d is None:
            d = self._devices[device] = _Device(site, self._load(device), loaded_at=now)
        return d

    def observe(self, stored: Iterable[tuple[str, str, int]]) -> list[Ack]:
        """(site, device, seq) of every touch in a committed batch, new or repeated.

        Returns the acknowledgements to publish: a device whose prefix grew, or that sent a
        repeat (it has not heard the acknowledgement it needs: say it again).
        """
        now = time.monotonic()
        touched: dict[str, bool] = {}    # device -> saw a repeat
        for site, device, seq in stored:
            new = self._device(site, device, now).tracker.add(seq)
            touched[device] = touched.get(device, False) or not new
        acks: list[Ack] = []
        for device, repeat in touched.items():
            d = self._devices[device]
            if d.tracker.has_gaps and now - d.loaded_at >= RESYNC_S:
                fresh = self._load(device)  # another sink may hold what we miss
                d.tracker = SeqTracker(max(fresh.upto, d.tracker.upto),
                                       [*fresh._above, *d.tracker._above])
                d.loaded_at = now
            self._update_gaps(device, d)
            if d.tracker.upto > d.published or repeat:
                d.published = d.tracker.upto
                acks.append(Ack(d.site, device, d.tracker.upto))
        return acks

    def current(self) -> list[Ack]:
        """The acknowledgement of every device the store knows (stored touches, dead letters
        with a seq, the registry) or this ledger has seen: what a sink that has just
        (re)subscribed publishes under its new epoch. Also reconciles their gaps."""
        now = time.monotonic()
        for device, site in self.store.known_devices():
            self._device(site, device, now)
        acks = []
        for device, d in sorted(self._devices.items()):
            self._update_gaps(device, d)
            d.published = d.tracker.upto
            acks.append(Ack(d.site, device, d.tracker.upto))
        return acks

    def _update_gaps(self, device: str, d: _Device) -> None:
        gaps = d.tracker.gaps()
        if gaps == d.gaps:
            return
        opened, closed = self.store.sync_gaps(device, d.site, gaps, int(time.time() * 1000))
        for a, b in closed:
            log.info("sink: gap in %s seq %d..%d closed", device, a, b)
        for a, b in opened:
            self.gaps_opened += 1
            log.warning("sink: gap in %s: seq %d..%d missing (%d touches; a replay in "
                        "progress or a loss): acknowledging only up to %d",
                        device, a, b, b - a + 1, d.tracker.upto)
        d.gaps = gaps

    def upto(self, device: str) -> int | None:
        d = self._devices.get(device)
        return d.tracker.upto if d else None

    def open_gaps(self) -> int:
        return sum(len(d.gaps or ()) for d in self._devices.values())


def gap_report(store: "SqlStore", *, include_closed: bool = False) -> list[tuple]:  # type: ignore[type-arg]
    """Rows (device, site, first_missing, last_missing, seen_ms, closed_ms) from seq_gaps of an
    open store (SQLite or PostgreSQL); the caller opens and closes it."""
    return store.gaps(include_closed=include_closed)


def format_gaps(rows: list[tuple]) -> str:  # type: ignore[type-arg]
    if not rows:
        return "no open gaps: every device's touches are stored contiguously"
    now = time.time() * 1000
    lines = [f"{'device':<16} {'site':<14} {'missing seq':>21} {'count':>7} {'age':>8}  state"]
    for dev, site, lo, hi, seen, closed in rows:
        age = f"{(now - seen) / 1000:.0f}s"
        lines.append(f"{dev:<16} {site:<14} {f'{lo}..{hi}':>21} {hi - lo + 1:>7} {age:>8}  "
                     f"{'open' if closed is None else 'closed'}")
    return "\n".join(lines)
