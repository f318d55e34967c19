"""Delivery, sans-IO: which touches the link sends, when it sends them again, when the device may
forget them, and how long it waits before the next connection attempt. No sockets, no clocks,
no outbox here: the adapter (edge/link.py) feeds events in and carries the actions out.

Rules of this file (docs/delivery.md is the protocol):

- Events in: ``connected(now)``, ``disconnected(now)``, ``sent(seq, mid, now)`` (the adapter
  handed seq to the client under message id mid), ``puback(mid, failed, reason, now)``,
  ``ack(upto, epoch, made, now, retained)`` (the sink's end-to-end acknowledgement; made = the
  highest seq this device ever made) and ``tick(now)`` (timers, and "the outbox may have rows":
  the adapter calls it after every wake-up). Each returns the actions to carry out, in order.
- Actions out: ``Publish(after, count)`` (send up to count outbox rows with seq > after, in seq
  order, reporting each with sent()), ``Forget(upto)`` (delete seq <= upto from the outbox),
  ``Hold(until, ...)`` (a refusal: no touches until then), ``Replay(start, why)`` (the window
  rewinds: drop anything read ahead, the next Publish starts at start), ``AckAhead(upto, made)``
  (an ack beyond any seq made here: outbox reset? report it loudly).
- Forget only on the sink's word: never beyond its ``upto``, never beyond ``made``. A PUBACK
  only frees a place in the window.
- At most ``inflight`` messages are sent and not yet PUBACKed on a connection; a rewind does not
  clear the window (those messages are still on the wire), only a lost connection does.
- Seqs go out in increasing order; every rewind restarts at the oldest unacknowledged seq.
- Rewinds (REPLAYS below): on every connect; when a refusal's hold-off ends; when everything
  sent is PUBACKed but the acknowledgement has not moved for ``ack_timeout_s`` (doubling up to
  ``ack_timeout_max_s`` while nothing moves); at once when a live ack names a sink epoch other
  than the last one seen (the sink reconnected and re-subscribed: what it missed meanwhile was
  dropped by the broker after its PUBACK).
- Connection state changes are a table (TABLE); a pair not in it changes nothing.
- Reconnect delay (Reconnect): equal jitter over a doubling step; every CONNACK starts it over;
  while the failure is one that ends the moment the broker is back (the broker's host refuses
  TCP, a connection was lost) the step is capped at ``fast_max_s``, so a returning broker sees
  every device again within that cap, whatever happened before.
"""

import enum
from dataclasses import dataclass, field

__all__ = ["CAUSES", "TABLE", "AckAhead", "Action", "Cause", "Delivery", "Forget", "Hold",
           "Policy", "Publish", "Reconnect", "Replay", "State", "Why"]


class State(enum.Enum):
    OFFLINE = "offline"      # no connection: nothing is sent
    SENDING = "sending"      # connected: the window is refilled
    HOLDING = "holding"      # connected, the broker refused a touch: nothing sent until the hold ends


class Event(enum.Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    REFUSED = "refused"      # a PUBACK with a reason code >= 128
    HOLD_OVER = "hold_over"


TABLE: dict[tuple[State, Event], State] = {
    (State.OFFLINE, Event.CONNECTED): State.SENDING,
    (State.SENDING, Event.CONNECTED): State.SENDING,   # a new connection replaces the old one
    (State.HOLDING, Event.CONNECTED): State.SENDING,   # a new connection ends the hold
    (State.SENDING, Event.DISCONNECTED): State.OFFLINE,
    (State.HOLDING, Event.DISCONNECTED): State.OFFLINE,
    (State.SENDING, Event.REFUSED): State.HOLDING,
    (State.HOLDING, Event.HOLD_OVER): State.SENDING,
}


class Why(enum.Enum):
    CONNECT = "connect"          # a fresh connection: the broker session holds nothing of ours
    REFUSAL = "refusal"          # a refusal's hold-off ended
    ACK_TIMEOUT = "ack_timeout"  # everything PUBACKed, the acknowledgement did not move
    SINK_EPOCH = "sink_epoch"    # the sink re-subscribed: it may have missed what we sent


# which rewinds count in `replays` (a connect replays by nature; it is counted in `connects`)
REPLAYS: dict[Why, bool] = {Why.CONNECT: False, Why.REFUSAL: True, Why.ACK_TIMEOUT: True,
                            Why.SINK_EPOCH: True}


@dataclass(frozen=True)
class Publish:
    after: int
    count: int


@dataclass(frozen=True)
class Forget:
    upto: int


@dataclass(frozen=True)
class Hold:
    until: float
    seq: int
    reason: str
    seconds: float


@dataclass(frozen=True)
class Replay:
    start: int
    why: Why
    waited_s: float = 0.0  # ACK_TIMEOUT: how long the acknowledgement stood still


@dataclass(frozen=True)
class AckAhead:
    upto: int
    made: int


Action = Publish | Forget | Hold | Replay | AckAhead


@dataclass(frozen=True)
class Policy:
    inflight: int = 50
    ack_timeout_s: float = 30.0
    ack_timeout_max_s: float = 600.0
    holdoff_s: float = 5.0
    holdoff_max_s: float = 300.0


class Delivery:
    """The window, the rewinds and the acknowledged prefix of one device's touch stream."""

    def __init__(self, policy: Policy, acked_upto: int = 0) -> None:
        self.policy = policy
        self.state = State.OFFLINE
        self.acked = acked_upto       # the sink has committed every seq <= this
        self.sent_upto = acked_upto        # highest seq sent since the last rewind
        self.window: dict[int, int] = {}  # mid -> seq, sent and not yet PUBACKed
        self.epoch: int | None = None  # the sink epoch of the last ack that named one
        self.hold_until = 0.0
        self.holdoff = policy.holdoff_s
        self.timeout = policy.ack_timeout_s
        self.last_progress = 0.0
        # counters for the state message
        self.published = 0            # PUBACKs with success
        self.refused = 0              # PUBACKs with a reason code >= 128
        self.last_refusal = ""
        self.replays = 0
        self.ack_ahead = 0

    def _go(self, event: Event) -> bool:
        nxt = TABLE.get((self.state, event))
        if nxt is None:
            return False
        self.state = nxt
        return True

    def _rewind(self, why: Why, now: float) -> list[Action]:
        waited = now - self.last_progress
        self.sent_upto, self.last_progress = self.acked, now
        if REPLAYS[why]:
            self.replays += 1
        return [Replay(self.acked + 1, why, waited)]

    # -- events ---------------------------------------------------------------------------
    def connected(self, now: float) -> list[Action]:
        self._go(Event.CONNECTED)
        self.window.clear()
        self.hold_until = 0.0
        self.timeout = self.policy.ack_timeout_s
        return self._rewind(Why.CONNECT, now)

    def disconnected(self, now: float) -> list[Action]:
        self._go(Event.DISCONNECTED)
        self.window.clear()  # a fresh client next time: nothing of this connection comes back
        return []

    def sent(self, seq: int, mid: int, now: float) -> None:
        if seq <= self.sent_upto or self.state is State.OFFLINE:
            raise ValueError(f"seq {seq} sent out of order (after {self.sent_upto}) or offline")
        if self.sent_upto <= self.acked:
            self.last_progress = now  # the ack timeout counts from the first unacknowledged send
        self.window[mid] = seq
        self.sent_upto = seq

    def puback(self, mid: int, failed: bool, reason: str, now: float) -> list[Action]:
        seq = self.window.pop(mid, None)
        if seq is None:
            return []  # not of this connection (or a state message, a config ack)
        if not failed:
            self.published += 1
            return []
        self.refused += 1
        self.last_refusal = reason
        if not self._go(Event.REFUSED):
            return []  # already holding: counted, the hold is not stretched per message
        seconds = self.holdoff
        self.hold_until = now + seconds
        self.holdoff = min(self.holdoff * 2, self.policy.holdoff_max_s)
        return [Hold(self.hold_until, seq, reason, seconds)]

    def ack(self, upto: int, epoch: int | None, made: int, now: float,
            retained: bool = False) -> list[Action]:
        """The sink committed every seq <= upto. A `retained` ack is the copy the broker hands
        over on subscribe: it says nothing about what the sink missed since this connection."""
        actions: list[Action] = []
        if upto > self.acked:
            if upto > made:
                # the sink has seqs this device never made: the outbox was reset or restored and
                # seqs are being reused. Never forget on that word.
                self.ack_ahead = upto
                actions.append(AckAhead(upto, made))
                upto = made
            if upto > self.acked:
                self.acked = upto
                self.sent_upto = max(self.sent_upto, upto)
                self.last_progress, self.timeout = now, self.policy.ack_timeout_s
                self.holdoff = self.policy.holdoff_s
                actions.append(Forget(upto))
        changed = epoch is not None and self.epoch is not None and epoch != self.epoch
        if epoch is not None:
            self.epoch = epoch
        if changed and not retained and self.state is not State.OFFLINE and self.sent_upto > self.acked:
            actions += self._rewind(Why.SINK_EPOCH, now)
        return actions

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.state is State.HOLDING and now >= self.hold_until:
            self._go(Event.HOLD_OVER)
            self.hold_until = 0.0
            if self.sent_upto > self.acked:
                actions += self._rewind(Why.REFUSAL, now)
        elif (self.state is State.SENDING and not self.window and self.sent_upto > self.acked
              and now - self.last_progress > self.timeout):
            actions += self._rewind(Why.ACK_TIMEOUT, now)
            self.timeout = min(self.timeout * 2, self.policy.ack_timeout_max_s)
        room = self.policy.inflight - len(self.window)
        if self.state is State.SENDING and room > 0:
            actions.append(Publish(self.sent_upto, room))
        return actions

    def next_timer(self, now: float) -> float | None:
        """Seconds until tick() has something to do on its own (None: only events wake it)."""
        if self.state is State.HOLDING:
            return max(0.0, self.hold_until - now)
        if self.state is State.SENDING and not self.window and self.sent_upto > self.acked:
            return max(0.0, self.last_progress + self.timeout - now)
        return None


# -- reconnecting -----------------------------------------------------------------------------
class Cause(enum.Enum):
    """Why a connection attempt failed or a connection ended."""

    REFUSED = "refused"
    LOST = "lost"
    TLS_VERIFY = "tls_verify"
    BAD_CERT = "bad_cert"
    TLS = "tls"
    UNKNOWN_HOST = "unknown_host"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    CONNACK = "connack"
    OTHER = "other"


# cause -> (words for the operator, what to check, fast retry?). Fast: the failure ends the
# moment the broker is back (its host answers at once), so the retry step stays short.
CAUSES: dict[Cause, tuple[str, str, bool]] = {
    Cause.REFUSED: ("connection refused", "is the broker running on that port?", True),
    Cause.LOST: ("connection lost", "", True),
    Cause.TLS_VERIFY: ("TLS verification failed",
                       "check mqtt.ca_file and that mqtt.host matches the broker certificate",
                       False),
    Cause.BAD_CERT: ("bad certificate", "the broker refused this device's certificate: "
                     "check mqtt.cert_file / key_file (revoked or from another CA?)", False),
    Cause.TLS: ("TLS handshake failed", "is that port a TLS listener (mqtt.tls, mqtt.port)?",
                False),
    Cause.UNKNOWN_HOST: ("unknown host", "check mqtt.host and the device's DNS", False),
    Cause.TIMEOUT: ("timeout", "is the broker host reachable (network, firewall)?", False),
    Cause.UNREACHABLE: ("network unreachable", "check the device's network", False),
    Cause.CONNACK: ("broker refused the connection", "check the device's credentials and ACL",
                    False),
    Cause.OTHER: ("connection failed", "", False),
}


@dataclass
class Reconnect:
    """The delay before the next connection attempt: equal jitter (50-100 %) over a step that
    doubles from min_s to max_s; capped at fast_max_s while the cause is a fast one; a CONNACK
    starts it over."""

    min_s: float = 1.0
    max_s: float = 60.0
    fast_max_s: float = 3.0
    step: float = field(init=False)

    def __post_init__(self) -> None:
        self.step = self.min_s

    def connected(self) -> None:
        self.step = self.min_s

    def failed(self, cause: Cause, rnd: float) -> float:
        """The wait before the next attempt; rnd is uniform in [0, 1] (the caller's random)."""
        cap = min(self.fast_max_s, self.max_s) if CAUSES[cause][2] else self.max_s
        wait = min(self.step, cap) * (0.5 + 0.5 * rnd)
        self.step = min(self.step * 2, self.max_s)
        return wait


@dataclass
class FaultLog:
    """Connection faults for the operator: one warning per new cause (and a reminder every
    remind_s while it lasts), one line when it is over; repeats of a cause are only counted."""

    remind_s: float = 600.0
    cause: Cause | None = None
    detail: str = ""
    since: float = 0.0
    failures: int = 0
    warned_at: float = 0.0

    def failed(self, cause: Cause, detail: str, now: float) -> bool:
        """Count a failure; True if it is to be logged as a warning."""
        self.failures += 1
        if self.cause is None:
            self.since = now
        if cause != self.cause or now - self.warned_at >= self.remind_s:  # not per detail: an
            # alert one time, an EOF the next, is the same fault for the operator
            self.cause, self.detail, self.warned_at = cause, detail, now
            return True
        return False

    def recovered(self, now: float) -> tuple[float, int, Cause] | None:
        """(seconds down, failures, last cause) if a fault was open, and closes it."""
        if self.cause is None:
            return None
        out = (now - self.since, self.failures, self.cause)
        self.cause, self.detail, self.failures = None, "", 0
        return out
