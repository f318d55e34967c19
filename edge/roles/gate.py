"""The gate role: entry and exit readers, the technician's status decides (GATE_TABLE in
edge.decision), optional anti-passback; the reader's direction goes on the touch. With a
controller board (`[gate] serial`) an allowed tap opens the gate and its passage is confirmed
by the door sensor (edge/roles/passage.py, through edge/roles/gate_board.py).

How a tap is recorded at a gate with a board (docs/architecture.md, "The gate loop"):
- the tap's touch is written at once, before the relay moves, with `passage: "pending"` when
  the gate was opened for it; the work history does not count a pending touch;
- the outcome follows as a second touch (its own seq): same card, technician and decision,
  facts `dir`, `passage` (passed | not_passed | unconfirmed | not_actuated) and `tap` (the
  tap's seq). The sink counts it unless it is `not_passed`;
- board offline: the tap is decided and recorded with reason not_actuated (no pending
  passage: nothing opened); emergency release in force: reason emergency_open.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from edge.decision import AntiPassback, Verdict, decide_gate
from edge.roles import Facts, FollowUp, NoFacts, RoleContext
from protocol.reasons import Reason
from protocol.touch import Decision, decode, encode

if TYPE_CHECKING:
    from edge.config import ReaderConfig
    from edge.decision import CardRead
    from edge.idlist.base import IdList
    from edge.roles.gate_board import GateBoard, Outcome
    from protocol.touch import Touch

log = logging.getLogger(__name__)

PENDING = "pending"
# follow-up `passage` values that the work history counts (docs/sink.md): a tap whose gate
# opened and nobody went through (not_passed) is no entry; one the board could not confirm is
# counted, since the tap is then the only record that the technician was at the gate
COUNTED = ("passed", "unconfirmed", "not_actuated")


class GateRole(NoFacts):
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        g = ctx.cfg.gate
        self.anti_passback = AntiPassback() if g.anti_passback else None
        self.readers = {r.name: r for r in ctx.cfg.readers}
        self.board: GateBoard | None = None
        self.alarms: dict[str, int] = {}           # alarm -> times raised since start
        self.passages: dict[str, int] = {}         # outcome -> count since start
        if g.serial:
            from edge.roles.gate_board import GateBoard

            self.board = GateBoard(g, ctx.clock, ctx.cfg.data_dir / "gate-pending.log",
                                   self._outcome, self._alarm, ctx.state_changed)

    # -- edge.roles.DeviceRole ---------------------------------------------------------------
    def decide(self, reader: ReaderConfig, read: CardRead,
               idlist: IdList | None) -> tuple[Verdict, Facts]:
        verdict = decide_gate(read, idlist, reader.direction, self.anti_passback)
        if self.board is None or verdict.decision is not Decision.ALLOW:
            return verdict, {}
        if self.board.emergency:
            return Verdict(Decision.ALLOW, Reason.EMERGENCY_OPEN, verdict.tid,
                           verdict.list_version), {}
        if not self.board.online:
            return Verdict(Decision.ALLOW, Reason.NOT_ACTUATED, verdict.tid,
                           verdict.list_version), {}
        return verdict, {"passage": PENDING}

    def facts(self, reader: ReaderConfig, now_ms: int) -> Facts:
        return {"reader": reader.name, "dir": reader.direction}

    def after(self, reader: ReaderConfig, touch: Touch) -> None:
        """The tap is durable: open the gate (allowed) or signal the denial."""
        b = self.board
        if b is None:
            return
        if touch.facts.get("passage") == PENDING:
            g = self.ctx.cfg.gate
            relay = g.relay_in if reader.direction == "in" else g.relay_out
            key = f"{touch.seq}:{touch.ts_ms}:{reader.name}"
            b.open(key, relay, {"reader": reader.name, "touch": encode(touch).hex()})
        elif touch.decision is Decision.DENY and b.online:
            b.signal(2, 2, 450)  # red LED, double beep; the relay stays shut

    def start(self) -> None:
        if self.board is None:
            return
        # passages a previous run left pending: the outcome is unknown, so `unconfirmed` -
        # unless its outcome record was written just before the stop (still in the outbox)
        from edge.roles.gate_board import Outcome

        left = self.board.leftovers()
        seqs = [int(k.split(":")[0]) for k in left if k.split(":")[0].isdigit()]
        done = {int(t.facts["tap"]) for t in self.ctx.unacked(min(seqs) if seqs else 0)
                if isinstance(t.facts.get("tap"), int)} if left else set()
        for key, record in left.items():
            if key.split(":")[0].isdigit() and int(key.split(":")[0]) in done:
                log.info("gate: passage of %s was recorded before the restart", key)
            else:
                log.warning("gate: passage of %s left pending by a restart: unconfirmed", key)
                self._outcome(Outcome(key, "unconfirmed"), record)
            self.board.forget(key)
        self.board.start()

    def stop(self) -> None:
        if self.board is not None:
            self.board.stop()

    def state(self) -> dict[str, Any]:
        if self.board is None:
            return {}
        return {"gate": {**self.board.state(), "alarms_raised": dict(self.alarms),
                         "passages": dict(self.passages)}}

    # -- from the board thread ------------------------------------------------------------
    def _outcome(self, o: Outcome, record: dict[str, Any]) -> None:
        try:
            tap = decode(bytes.fromhex(record["touch"]))
            reader = self.readers[record["reader"]]
        except (KeyError, ValueError) as exc:
            log.error("gate: pending passage %s unusable (%s): dropped", o.key, exc)
            return
        facts: Facts = {"reader": reader.name, "dir": str(tap.facts.get("dir", reader.direction)),
                        "passage": o.outcome, "tap": tap.seq}
        reason = Reason.NOT_ACTUATED if o.outcome == "not_actuated" else None
        self.passages[o.outcome] = self.passages.get(o.outcome, 0) + 1
        self.ctx.record(FollowUp(reader, tap, facts, reason))

    def _alarm(self, alarm: str, raised: bool) -> None:
        if raised:
            self.alarms[alarm] = self.alarms.get(alarm, 0) + 1
        self.ctx.event({"kind": "alarm", "alarm": alarm, "state": "raised" if raised else "cleared",
                        "door": self.board.machine.state.phase if self.board else None})


def make(ctx: RoleContext) -> GateRole:
    """Entry point `gate` (group ccus.roles)."""
    return GateRole(ctx)
