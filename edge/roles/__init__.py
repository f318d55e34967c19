"""Role plug-ins: what a gate, a vending machine or a training station adds to the agent.

Rules of this package:
- One interface, `DeviceRole` (below). The agent calls it and nothing else of a role.
- A role is found by its name (`device.role`) in the Python entry-point group `ccus.roles`
  (pyproject.toml: gate, training, vending). The agent never imports a role's package by
  name, so `edge/` never imports `vending/`; a site integrator can add a role in their own
  package the same way.
- A role's policy is a table where it can be (`edge.decision.GATE_TABLE`,
  `edge.roles.passage.TABLE`, `vending/transaction.py`).
- decide() runs under the agent's tap lock, before the touch is written; after() runs once the
  touch is durable (the gate opens only for a recorded tap). Neither raises for board trouble:
  it becomes a reason or a fact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge.clock import Clock
    from edge.config import AgentConfig, ReaderConfig
    from edge.decision import CardRead, Verdict
    from edge.idlist.base import IdList
    from protocol.reasons import Reason
    from protocol.touch import Touch

GROUP = "ccus.roles"

Facts = dict[str, str | int | bool]


class RoleError(Exception):
    """A role that cannot be found or built; the message says what to do."""


@dataclass(frozen=True)
class FollowUp:
    """A record a role adds after a tap (the gate's passage outcome): a touch of its own seq,
    for the same card and technician as the tap it follows."""

    reader: ReaderConfig
    tap: Touch
    facts: Facts
    reason: Reason | None = None   # None: the tap's reason


@dataclass
class RoleContext:
    """What the agent gives a role: its config, its clock, and three ways to speak."""

    cfg: AgentConfig
    clock: Clock
    record: Callable[[FollowUp], Touch | None]   # a follow-up touch, durable like a tap's
    event: Callable[[dict[str, Any]], None]      # an alarm on the device's event topic
    state_changed: Callable[[], None]            # publish the state message now
    # the touches after a seq still in the outbox (not yet acknowledged end to end): a role
    # that recovers at start checks what it already recorded
    unacked: Callable[[int], list[Touch]] = lambda after_seq: []


class DeviceRole(Protocol):
    def decide(self, reader: ReaderConfig, read: CardRead,
               idlist: IdList | None) -> tuple[Verdict, Facts]:
        """The verdict and the facts only the role knows (a vend's slot and result)."""
        ...

    def facts(self, reader: ReaderConfig, now_ms: int) -> Facts:
        """Facts of the moment and the reader (gate direction, training course)."""
        ...

    def after(self, reader: ReaderConfig, touch: Touch) -> None:
        """The touch is durable: act on it (open the gate). Must not block for long."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def state(self) -> dict[str, Any]:
        """The role's part of the state message (board health, alarms); {} for none."""
        ...


RoleFactory = Callable[[RoleContext], DeviceRole]


def load(name: str) -> RoleFactory:
    """The factory registered as `name` in the `ccus.roles` entry-point group."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in entry_points(group=GROUP)})
        raise RoleError(
            f"role {name!r}: no plug-in in entry-point group {GROUP} (registered: "
            f"{', '.join(known) or 'none'}); reinstall the package (./dev.sh setup, or "
            f"pip install -e .) so its entry points are registered")
    try:
        factory = found[0].load()
    except ImportError as exc:
        raise RoleError(f"role {name!r}: its plug-in {found[0].value} does not import: {exc}") from exc
    return factory  # type: ignore[no-any-return]


class NoFacts:
    """Defaults for roles that have nothing to do at a step (mixed into the built-in roles)."""

    def facts(self, reader: ReaderConfig, now_ms: int) -> Facts:
        return {"reader": reader.name}

    def after(self, reader: ReaderConfig, touch: Touch) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}
