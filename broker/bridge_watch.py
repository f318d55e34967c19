"""The site bridge watchdog's decision: is the bridge stuck, and may the site broker be restarted now.

Rules of this file:

- Pure: no clock, no sockets, no MQTT. It is fed what the adapter (broker/bridge_watchdog.py)
  sees on the site broker, each with the monotonic time it was seen, and asked on every tick.
- Two ways a bridge is stuck (docs/operations.md, "The site bridge watchdog"): its state
  (``$SYS/broker/connection/<bridge>/state``) has said down for longer than ``limit_s``
  (a CONNECT that never completes), or it says up while a touch published on the site broker
  ``limit_s`` ago has had no end-to-end acknowledgement since (seen on NATS 2.9.10 after a
  node's kill -9: the bridge got its CONNACK and forwarded nothing).
- A restart is allowed only when at least one cloud node accepts a TCP connection (the caller
  says so: restarting while the whole cloud is down helps nothing), and never sooner than
  ``backoff_s`` after the previous one, doubling up to ``backoff_max_s`` while restarts do not
  bring acknowledgements back (no restart storm when the sinks, not the bridge, are down).
- Knowing nothing is not "down": before the first state, and after the watchdog lost its own
  connection to the site broker, nothing is due (that broker's restart is systemd's job).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class WatchConfig:
    limit_s: float = 15.0        # down (or unanswered) longer than this: stuck
    backoff_s: float = 30.0      # the least time between two restarts
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if not (self.limit_s > 0 and 0 < self.backoff_s <= self.backoff_max_s):
            raise ValueError("limit_s > 0 and 0 < backoff_s <= backoff_max_s")


class BridgeWatch:
    """Feed ``state``, ``touch``, ``ack``, ``lost``; call ``due`` (why stuck, or "") and, when the
    cloud answers, ``decide`` (True: restart now, then call ``restarted``)."""

    def __init__(self, config: WatchConfig | None = None) -> None:
        self.config = config or WatchConfig()
        self.up: bool | None = None          # the bridge's last state; None: not known
        self.down_since: float | None = None
        self.unanswered_since: float | None = None  # first touch seen after the last ack
        self.last_restart: float | None = None
        self.backoff = self.config.backoff_s
        self.restarts = 0
        self._in_a_row = False  # restarted, and no acknowledgement since

    # -- what the adapter sees -------------------------------------------------------------
    def state(self, up: bool, now: float) -> None:
        if up:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = now
        self.up = up

    def touch(self, now: float) -> None:
        """A touch (or a replay) was published on the site broker, to go through the bridge."""
        if self.unanswered_since is None:
            self.unanswered_since = now

    def ack(self, now: float) -> None:
        """An end-to-end acknowledgement came back through the bridge: it carries both ways."""
        self.unanswered_since = None
        self.backoff = self.config.backoff_s
        self._in_a_row = False

    def lost(self) -> None:
        """The watchdog's own connection to the site broker is gone: it knows nothing now."""
        self.up = None
        self.down_since = None
        self.unanswered_since = None

    # -- the decision ----------------------------------------------------------------------
    def due(self, now: float) -> str:
        """Why the bridge counts as stuck at `now` ("" when it does not)."""
        limit = self.config.limit_s
        if self.up is False and self.down_since is not None and now - self.down_since > limit:
            return f"bridge down for {now - self.down_since:.0f}s"
        if self.up and self.unanswered_since is not None and now - self.unanswered_since > limit:
            return (f"bridge up but no acknowledgement for {now - self.unanswered_since:.0f}s "
                    f"of touches sent")
        return ""

    def waiting(self, now: float) -> float:
        """Seconds until the backoff allows the next restart (0: allowed now)."""
        if self.last_restart is None:
            return 0.0
        return max(0.0, self.last_restart + self.backoff - now)

    def wanted(self, now: float) -> str:
        """Why a restart is wanted at `now`, stuck and the backoff over ("" when it is not):
        all but the cloud check, which the adapter makes (a TCP connect) only when this says so."""
        return self.due(now) if self.waiting(now) == 0.0 else ""

    def decide(self, now: float, cloud_reachable: bool) -> bool:
        return bool(self.wanted(now)) and cloud_reachable

    def restarted(self, now: float) -> None:
        """The site broker was restarted at `now`: its bridge starts over (down until it says up)."""
        if self._in_a_row:   # the last restart brought no acknowledgement: wait longer
            self.backoff = min(self.backoff * 2, self.config.backoff_max_s)
        self._in_a_row = True
        self.last_restart = now
        self.restarts += 1
        self.up = False
        self.down_since = now
        self.unanswered_since = None
