"""The sink's records (pure data): ingest policy, dead letters, derived rows, courses, devices."""

from dataclasses import dataclass

from cloud_sink.errors import SinkError

DAY_MS = 24 * 3600 * 1000
# touches per write transaction at most: one commit (an fsync) and one pass over the day's
# work-history pages serve more touches; a batch is cut from what has arrived, so a quiet
# sink still writes each touch at once (bench/bench_sink.py: 300k touches, 0.73 -> 0.88 of bare)
BATCH_MAX = 5000


class StoreError(SinkError, RuntimeError):
    """A store that cannot be opened or used, said in one line with what to do."""


class NoStore(StoreError):
    """A command that only reads was pointed at a store that does not exist (a typo?)."""


@dataclass(frozen=True)
class Policy:
    """What the sink accepts and how it cuts days. Part of how a store is opened."""

    cut_hour: int = 4                      # work-day cut, Asia/Tokyo
    max_future_ms: int = DAY_MS            # a touch stamped further ahead of its receipt is flagged
    max_past_ms: int = 400 * DAY_MS        # ... or further behind it
    require_registered: bool = False       # dead-letter touches from devices not in the registry

    def __post_init__(self) -> None:
        if not 0 <= self.cut_hour <= 23:
            raise ValueError("cut_hour must be 0..23")
        if self.max_future_ms < 0 or self.max_past_ms < 0:
            raise ValueError("skew limits must be >= 0")


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    detail: str


@dataclass
class IngestResult:
    stored: int = 0      # new touches
    repeated: int = 0    # already stored (a replay): ignored
    dead: int = 0
    flagged: int = 0     # stored, but kept out of the derived tables (timestamp out of range)
    past: int = 0        # ... of them flagged ts_past, the furthest this far before receipt
    past_ms_max: int = 0
    future: int = 0      # ... flagged ts_future, the furthest this far ahead
    future_ms_max: int = 0

    def add(self, other: "IngestResult") -> None:
        self.stored += other.stored
        self.repeated += other.repeated
        self.dead += other.dead
        self.flagged += other.flagged
        self.past += other.past
        self.future += other.future
        self.past_ms_max = max(self.past_ms_max, other.past_ms_max)
        self.future_ms_max = max(self.future_ms_max, other.future_ms_max)


@dataclass
class Rederived:
    """What a re-derivation did: touches looked at, their work day or cut changed, flags."""

    work_history_rows: int = 0
    touches: int = 0
    recut: int = 0           # touches whose work day or cut changed
    moved: int = 0           # ... of them, to another work day
    admitted: int = 0        # flagged before, admitted now
    newly_flagged: int = 0   # admitted before, flagged now
    still_flagged: int = 0
    sites: tuple[str, ...] = ()   # the sites re-derived (a registry import)
    imported: int = 0             # registry rows taken (a registry import)


@dataclass(frozen=True)
class WorkDay:
    tid: str
    site: str
    work_day: str
    first_in_ms: int | None
    last_out_ms: int | None
    taps: int
    cut_hour: int | None = None   # the cut the row was made with (None: before the store kept it)

    @property
    def exit_missing(self) -> bool:
        return self.last_out_ms is None

    @property
    def entry_missing(self) -> bool:
        return self.first_in_ms is None


@dataclass(frozen=True)
class TrainingMonth:
    site: str          # the training center
    month: str         # 'YYYY-MM'
    persons: int
    touches: int


@dataclass(frozen=True)
class Course:
    """A course as the operator defines it (imported from CSV)."""

    course: str
    name: str
    starts: str        # 'YYYY-MM-DD'
    ends: str          # 'YYYY-MM-DD', inclusive
    enrolled: int
    center: str = ""   # the training center's site ID, when known


@dataclass(frozen=True)
class CourseStats:
    """A course with what its touches show; definition fields are None for an undefined course."""

    course: str
    name: str | None
    starts: str | None
    ends: str | None
    enrolled: int | None
    center: str | None
    persons: int
    touches: int


@dataclass(frozen=True)
class VendingRow:
    device: str
    site: str
    contractor: str    # '' when the touch did not say
    month: str
    dispensed: int
    failed: int
    indeterminate: int


@dataclass(frozen=True)
class Device:
    device: str
    site: str
    role: str = ""
