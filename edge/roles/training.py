"""Training-center stations: the role plug-in, and the course schedule (pure) that tells which
course a touch belongs to. Every readable card is counted (edge.decision.decide_training)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edge.config import ConfigError
from edge.decision import decide_training
from edge.roles import Facts, NoFacts, RoleContext
from protocol.touch import fact_text_ok

if TYPE_CHECKING:
    from edge.config import ReaderConfig
    from edge.decision import CardRead, Verdict
    from edge.idlist.base import IdList


@dataclass(frozen=True, slots=True)
class Course:
    id: str
    name: str
    start_ms: int   # inclusive, UTC ms
    end_ms: int     # exclusive, UTC ms


class Schedule:
    """Courses of one station; at most one is current at any moment (overlaps are refused)."""

    def __init__(self, courses: list[Course]) -> None:
        ordered = sorted(courses, key=lambda c: c.start_ms)
        for c in ordered:
            if c.end_ms <= c.start_ms:
                raise ValueError(f"course {c.id}: ends before it starts")
        for a, b in zip(ordered, ordered[1:], strict=False):
            if b.start_ms < a.end_ms:
                raise ValueError(f"courses {a.id} and {b.id} overlap")
        self.courses = ordered

    def current(self, now_ms: int) -> Course | None:
        for c in self.courses:
            if c.start_ms <= now_ms < c.end_ms:
                return c
        return None

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """TOML: [[course]] id, name, start, end (TOML datetimes with offset, e.g. +09:00)."""
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        courses = []
        for i, c in enumerate(raw.get("course", [])):
            naive = [k for k in ("start", "end") if isinstance(c, dict)
                     and isinstance(c.get(k), datetime) and c[k].tzinfo is None]
            if naive:  # the station's own time zone must not decide which course a tap is in
                raise ValueError(f"{path}: course[{i}].{naive[0]}: give the UTC offset "
                                 "(e.g. 2026-12-01T09:00:00+09:00)")
            try:
                courses.append(Course(str(c["id"]), str(c["name"]),
                                      int(c["start"].timestamp() * 1000),
                                      int(c["end"].timestamp() * 1000)))
            except (KeyError, AttributeError, TypeError) as exc:
                raise ValueError(f"{path}: course[{i}]: needs id, name, start, end with a "
                                 f"UTC offset ({exc})") from exc
        for i, c in enumerate(courses):
            if not c.id or not fact_text_ok(c.id):  # touches carry it as their `course` fact
                raise ValueError(f"{path}: course[{i}].id: 1..64 characters, no NUL")
        return cls(courses)


class TrainingRole(NoFacts):
    """A touch experience: counted, with the course the schedule says is running."""

    def __init__(self, schedule: Schedule | None) -> None:
        self.schedule = schedule

    def decide(self, reader: ReaderConfig, read: CardRead,
               idlist: IdList | None) -> tuple[Verdict, Facts]:
        return decide_training(read, idlist), {}

    def facts(self, reader: ReaderConfig, now_ms: int) -> Facts:
        facts: Facts = {"reader": reader.name}
        course = self.schedule.current(now_ms) if self.schedule is not None else None
        if course is not None:
            facts["course"] = course.id
        return facts


def make(ctx: RoleContext) -> TrainingRole:
    """Entry point `training` (group ccus.roles)."""
    path = ctx.cfg.training.schedule
    try:
        return TrainingRole(Schedule.load(path) if path else None)
    except OSError as exc:
        raise ConfigError(f"training.schedule: cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:  # TOMLDecodeError too  # ccus agent: one line, exit 2
        raise ConfigError(f"training.schedule: {exc}") from exc
