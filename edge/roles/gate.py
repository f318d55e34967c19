"""The gate role: entry and exit readers, the technician's status decides (GATE_TABLE in
edge.decision), optional anti-passback; the reader's direction goes on the touch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.decision import AntiPassback, decide_gate
from edge.roles import Facts, NoFacts, RoleContext

if TYPE_CHECKING:
    from edge.config import ReaderConfig
    from edge.decision import CardRead, Verdict
    from edge.idlist.base import IdList


class GateRole(NoFacts):
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.anti_passback = AntiPassback() if ctx.cfg.gate.anti_passback else None

    def decide(self, reader: ReaderConfig, read: CardRead,
               idlist: IdList | None) -> tuple[Verdict, Facts]:
        return decide_gate(read, idlist, reader.direction, self.anti_passback), {}

    def facts(self, reader: ReaderConfig, now_ms: int) -> Facts:
        return {"reader": reader.name, "dir": reader.direction}


def make(ctx: RoleContext) -> GateRole:
    """Entry point `gate` (group ccus.roles)."""
    return GateRole(ctx)
