"""The store interface every backend implements, and open_store(url) that picks the backend.

`sqlite:///path/store.sqlite` or a plain path: the embedded SQLite store (the default).
`postgresql://user@host:5432/db` (or `postgres://`): PostgreSQL through psycopg 3.
The record types live in cloud_sink.model; they are re-exported here for older imports.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cloud_sink.model import (
    Course,
    CourseStats,
    DeadLetter,
    Device,
    IngestResult,
    NoStore,
    Policy,
    Rederived,
    StoreError,
    TrainingMonth,
    VendingRow,
    WorkDay,
)
from cloud_sink.registry import ChainLink, SiteRule, Technician
from cloud_sink.stores.sqlite import SqliteStore
from protocol.touch import Touch

__all__ = ["DeadLetter", "IngestResult", "NoStore", "Policy", "SqliteStore", "Store", "StoreError",
           "WorkDay", "open_store"]


class BadStoreUrl(StoreError, ValueError):
    """--store names no backend we know."""


@runtime_checkable
class Store(Protocol):
    url: str
    policy: Policy

    def ingest(self, touches: Iterable[Touch], dead: Iterable[DeadLetter] = (), *,
               now_ms: int | None = None) -> IngestResult: ...

    def rederive(self) -> int: ...

    def rederive_all(self) -> Rederived: ...

    def import_sites(self, rules: Iterable[SiteRule]) -> Rederived: ...

    def import_technicians(self, techs: Iterable[Technician]) -> int: ...

    def import_chain(self, links: Iterable[ChainLink]) -> int: ...

    def sites(self, site: str | None = None) -> list[SiteRule]: ...

    def unregistered_sites(self) -> list[tuple[str, int]]: ...

    def technicians(self) -> list[Technician]: ...

    def chain(self, site: str | None = None) -> list[ChainLink]: ...

    def site_touch_counts(self, site: str) -> tuple[int, int]: ...

    def training_persons(self, center: str, first: str | None = None, last: str | None = None,
                         *, with_course: bool = False) -> int: ...

    def import_courses(self, courses: Iterable[Course]) -> int: ...

    def register_devices(self, devices: Iterable[Device]) -> int: ...

    def work_history(self, site: str | None = None, month: str | None = None) -> list[WorkDay]: ...

    def on_site(self, site: str, day: str) -> list[tuple[str, int]]: ...

    def days_worked(self, site: str | None = None,
                    month: str | None = None) -> list[tuple[str, str, str, int]]: ...

    def training_monthly(self, site: str | None = None,
                         month: str | None = None) -> list[TrainingMonth]: ...

    def training_courses(self, center: str | None = None) -> list[CourseStats]: ...

    def courses(self) -> list[Course]: ...

    def vending_ledger(self, month: str | None = None,
                       contractor: str | None = None) -> list[VendingRow]: ...

    def devices(self) -> list[Device]: ...

    def flagged(self, limit: int = 100) -> list[tuple[str, int, str, str, int, int, str]]: ...

    def dead_letters(self, limit: int = 100) -> list[tuple[int, int, str, str, str, bytes]]: ...

    def counts(self) -> dict[str, int]: ...

    def table(self, name: str) -> list[tuple[Any, ...]]: ...

    def close(self) -> None: ...


def open_store(url: str | Path, policy: Policy | None = None, *, create: bool = True) -> Store:
    """A store for a URL or a path; migrations are applied before it is returned.

    create=False (reports, listings, export: commands that only read): a store that does not
    exist raises NoStore instead of being created empty (a typo must not print an empty
    report with exit 0). A SQLite store's folder is never created. Faults are StoreError with
    one line naming the store and what to do."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from cloud_sink.stores.postgres import PostgresStore

        return PostgresStore(text, policy=policy, create=create)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
        # sqlite:////abs/path and sqlite:///rel/path, as SQLAlchemy spells them
    elif "://" in text:
        raise BadStoreUrl(f"unknown store URL scheme: {text.split('://')[0]}:// "
                         "(use sqlite:///path, a plain path, or postgresql://...)")
    path = Path(text)
    if not create and not path.exists():
        raise NoStore(f"no store at {path}; create it with `ccus sink run --store {path}` or "
                      f"`ccus sink import --store {path} FILE`")
    if not path.parent.is_dir():
        raise StoreError(f"cannot create the store {path}: the folder {path.parent} does not "
                         "exist (create it, or check --store)")
    return SqliteStore(text, policy=policy)
