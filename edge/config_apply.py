"""Signed configuration on the device: envelope codec, the apply decision (pure), atomic apply, ack.

An operator pushes a TOML overlay for one device (ccus/v1/{site}/{dev}/config) or for a whole
site (ccus/v1/{site}/_site/config), signed with Ed25519 (edge/signing.py, purpose "config"),
retained. The document inside the signed envelope:

    {"version": 1..2**63-1, "target": {"site": str, "dev": str | "_site"},
     "issued_ms": UTC ms, "body": {table: ...},  # body: a partial agent.toml
     "force": true}                              # optional: `ccus ops config push --force`

The effective config is  local file  <-  site overlay  <-  device overlay  (tables merge, other
values replace), checked with edge.config.from_dict. Each scope keeps its own version; the
device refuses a version lower than or equal to the one it applied (replay), except a
redelivery of the very envelope it applied (retained messages come again on every connect).
Overlays may not change who the device is (device.id, device.site), where it keeps its
state (device.data_dir) or the config version itself. A refused config leaves the running
one untouched; every outcome is acknowledged on .../config/ack (QoS 1, retained).

Freshness: a config issued longer ago than `[security] max_config_age_days` is refused
(`too_old`) unless the operator forced it (`force` inside the signed body) and it is newer
(a higher version) than the applied one. Every bound is checked here, where the config enters:
the version is carried by every touch (`cv`, at most 2**63-1), so a version past it would make
every later touch unencodable.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.atomic import write_atomic
from edge.config import AgentConfig, ConfigError, from_dict
from edge.errors import EdgeError
from edge.signing import SignatureError, load_public_key, open_sealed, seal
from protocol import topics
from protocol.topics import SITE_LEVEL
from protocol.touch import DEVICE_ID, MAX_SEQ, MAX_TS_MS, SITE_ID

log = logging.getLogger(__name__)

PURPOSE = "config"
PROTECTED = (("device", "id"), ("device", "site"), ("device", "data_dir"), ("version",))
KEYS_DIR = "/etc/ccus-touch/keys"   # trusted operator public keys (*.pub), read-only on the device
MAX_VERSION = MAX_SEQ               # touches carry the config version (cv): the same bound
MAX_PAYLOAD = 64 * 1024             # the broker's max_packet_size; a config is a few KiB
MAX_DEPTH = 8                       # tables in tables in the body (agent.toml needs 3)
DAY_MS = 86_400_000
DEFAULT_MAX_AGE_DAYS = 90.0         # [security] max_config_age_days


class ConfigRefused(EdgeError, ValueError):
    """A config envelope the device will not apply; `reason` is a short code for the ack."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# -- the envelope codec ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigDoc:
    version: int
    site: str
    dev: str                      # a device id, or "_site" for every device of the site
    issued_ms: int
    body: dict[str, Any]
    digest: str = ""              # sha256 of the envelope: tells a redelivery from a replay
    force: bool = False           # the operator pushed it with --force: older than the window

    @property
    def scope(self) -> str:
        return "site" if self.dev == SITE_LEVEL else "device"

    @property
    def topic(self) -> str:
        return topics.config(self.site, self.dev)


def encode(key: Ed25519PrivateKey, *, version: int, site: str, dev: str, body: Mapping[str, Any],
           issued_ms: int | None = None, force: bool = False) -> bytes:
    """The retained payload `ccus ops config push` publishes."""
    if not (isinstance(version, int) and 0 < version <= MAX_VERSION):
        raise ValueError("version: an integer 1..2**63-1")
    if not SITE_ID.match(site) or not (dev == SITE_LEVEL or DEVICE_ID.match(dev)):
        raise ValueError("target: a 14-digit site and a device id (or _site)")
    doc = {"version": version, "target": {"site": site, "dev": dev},
           "issued_ms": int(time.time() * 1000) if issued_ms is None else issued_ms,
           "body": dict(body)}
    if force:  # only when set: an unforced envelope stays byte-identical to older ones
        doc["force"] = True
    return seal(key, PURPOSE, doc)


def _depth(v: Any, limit: int, max_nodes: int = 10_000) -> int:
    """Nesting depth of lists and tables, counted no further than `limit` + 1, iteratively.
    CBOR shared references (tags 28/29) can make a cycle or a graph that is exponentially
    larger than its bytes: more than `max_nodes` values counts as too deep, too."""
    stack, deepest, seen = [(v, 0)], 0, 0
    while stack:
        node, d = stack.pop()
        deepest, seen = max(deepest, d), seen + 1
        if deepest > limit or seen > max_nodes:
            return limit + 1
        if isinstance(node, dict):
            stack.extend((x, d + 1) for x in node.values())
        elif isinstance(node, list):
            stack.extend((x, d + 1) for x in node)
    return deepest


def decode(keys: Iterable[Ed25519PublicKey], payload: bytes) -> ConfigDoc:
    """Verify and parse an envelope. Raises ConfigRefused (and nothing else) on any bad input."""
    if len(payload) > MAX_PAYLOAD:
        raise ConfigRefused("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    try:
        outer = cbor2.loads(payload)
    except Exception:  # cbor2 raises many types on hostile input
        outer = None
    if isinstance(outer, dict) and "sig" not in outer:
        raise ConfigRefused("unsigned", "the envelope carries no signature")
    try:
        doc = open_sealed(keys, PURPOSE, payload)
    except SignatureError as exc:
        raise ConfigRefused(exc.reason, str(exc)) from None
    version, target, issued, body = (doc.get(k) for k in ("version", "target", "issued_ms", "body"))
    force = doc.get("force", False)
    if type(version) is not int:
        raise ConfigRefused("malformed", "version: an integer")
    if not 0 < version <= MAX_VERSION:  # touches carry it: past 2**63-1 none would encode
        raise ConfigRefused("out_of_range", "version: 1..2**63-1")
    if not (isinstance(target, dict) and isinstance(target.get("site"), str)
            and isinstance(target.get("dev"), str) and SITE_ID.match(target["site"])
            and (target["dev"] == SITE_LEVEL or DEVICE_ID.match(target["dev"]))):
        raise ConfigRefused("malformed", "target: {site, dev}")
    if type(issued) is not int:
        raise ConfigRefused("malformed", "issued_ms: an integer")
    if not 0 <= issued <= MAX_TS_MS:
        raise ConfigRefused("out_of_range", "issued_ms: UTC milliseconds, year 1970..9999")
    if type(force) is not bool:
        raise ConfigRefused("malformed", "force: true or false")
    if not (isinstance(body, dict) and all(isinstance(k, str) for k in body)):
        raise ConfigRefused("malformed", "body: a table")
    if _depth(body, MAX_DEPTH) > MAX_DEPTH:
        raise ConfigRefused("malformed", f"body: nested deeper than {MAX_DEPTH}")
    return ConfigDoc(version, target["site"], target["dev"], issued, body,
                     hashlib.sha256(payload).hexdigest(), force)


# -- the decision (pure) --------------------------------------------------------------------------
@dataclass(frozen=True)
class Applied:
    """What the device has applied, per scope: version, envelope digest, overlay body."""
    site: tuple[int, str, dict[str, Any]] = (0, "", {})
    device: tuple[int, str, dict[str, Any]] = (0, "", {})

    @property
    def version(self) -> int:
        """The config version touches carry: the newer of the two scopes."""
        return max(self.site[0], self.device[0])


@dataclass(frozen=True)
class Decision:
    result: str                   # applied | unchanged | refused
    reason: str = ""
    detail: str = ""
    state: Applied = field(default_factory=Applied)
    config: AgentConfig | None = None


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (values, lists such as readers) replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in overlay.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _touches_protected(body: Mapping[str, Any], base: Mapping[str, Any]) -> str | None:
    for path in PROTECTED:
        node: Any = body
        ref: Any = base
        for part in path:
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
            ref = ref.get(part, _MISSING) if isinstance(ref, Mapping) else _MISSING
        if node is not _MISSING and (path == ("version",) or node != ref):
            return ".".join(path)
    return None


_MISSING = object()


def effective(base: Mapping[str, Any], state: Applied) -> AgentConfig:
    """Local file <- site overlay <- device overlay, validated; raises ConfigError."""
    merged = merge(merge(base, state.site[2]), state.device[2])
    merged["version"] = state.version
    return from_dict(merged)


def decide(state: Applied, doc: ConfigDoc, base: Mapping[str, Any], site: str,
           dev: str, *, now_ms: int | None = None,
           max_age_ms: float = DEFAULT_MAX_AGE_DAYS * DAY_MS) -> Decision:
    """Apply `doc` on top of `state` for device (site, dev), or refuse it and say why.

    With `now_ms` (the device clock), a config issued more than `max_age_ms` before it is
    refused unless forced; a forced one still has to be newer than the applied one (the replay
    rule before it sees to that)."""
    def refuse(reason: str, detail: str) -> Decision:
        return Decision("refused", reason, detail, state)

    if doc.site != site or doc.dev not in (dev, SITE_LEVEL):
        return refuse("wrong_target", f"for {doc.site}/{doc.dev}, this is {site}/{dev}")
    current = state.site if doc.scope == "site" else state.device
    if doc.version == current[0] and doc.digest == current[1]:
        return Decision("unchanged", "", "", state, effective(base, state))
    if doc.version <= current[0]:
        return refuse("replay", f"{doc.scope} version {doc.version} <= applied {current[0]}")
    if now_ms is not None and now_ms - doc.issued_ms > max_age_ms and not doc.force:
        return refuse("too_old", f"issued {(now_ms - doc.issued_ms) // DAY_MS} days ago, "
                                 f"beyond security.max_config_age_days "
                                 f"({max_age_ms / DAY_MS:g}): push it again, or with --force")
    bad = _touches_protected(doc.body, base)
    if bad:
        return refuse("protected", f"{bad} cannot be changed remotely")
    entry = (doc.version, doc.digest, doc.body)
    new = dataclasses.replace(state, **{doc.scope: entry})
    try:
        cfg = effective(base, new)
    except ConfigError as exc:
        return refuse("schema", str(exc))
    return Decision("applied", "", "", new, cfg)


# -- the adapter: persistence, MQTT, a worker thread ---------------------------------------------
def load_keys(keys_dir: str | Path = KEYS_DIR) -> list[Ed25519PublicKey]:
    """Every *.pub in the trust folder; unreadable ones are logged and skipped."""
    keys = []
    for p in sorted(Path(keys_dir).glob("*.pub")):
        try:
            keys.append(load_public_key(p))
        except (OSError, ValueError) as exc:
            log.warning("trusted key %s unusable: %s", p, exc)
    return keys


def load_state(state_dir: Path, keys: Iterable[Ed25519PublicKey], site: str, dev: str) -> Applied:
    """The applied overlays, re-verified from the saved envelopes (a key revoked since is dropped)."""
    keys = list(keys)
    state = Applied()
    for scope in ("site", "device"):
        path = state_dir / f"{scope}.cbor"
        if not path.exists():
            continue
        try:
            doc = decode(keys, path.read_bytes())
        except (OSError, ConfigRefused) as exc:
            log.warning("saved %s config %s ignored: %s", scope, path, exc)
            continue
        if doc.scope == scope and doc.site == site and doc.dev in (dev, SITE_LEVEL):
            state = dataclasses.replace(state, **{scope: (doc.version, doc.digest, doc.body)})
    return state


def boot_config(base: AgentConfig, keys: Iterable[Ed25519PublicKey]) -> tuple[AgentConfig, Applied]:
    """At start: the file config with the saved overlays on top (the file alone if they fail)."""
    site, dev = base.device.site, base.device.id
    state = load_state(base.data_dir / "config", keys, site, dev)
    if state == Applied():
        return base, state
    try:
        return effective(dataclasses.asdict(base), state), state
    except ConfigError as exc:  # e.g. the local file changed under the overlays
        log.error("saved config overlays no longer valid (%s): running the file config", exc)
        return base, Applied()


class ConfigApplier:
    """Receives config messages (from the link's network thread), decides and applies them on
    its own thread, and acknowledges through `publish(topic, payload, retain)`."""

    def __init__(self, base: AgentConfig, keys: Iterable[Ed25519PublicKey], state: Applied,
                 publish: Callable[[str, bytes, bool], object],
                 on_applied: Callable[[AgentConfig], object] = lambda cfg: None,
                 now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 max_age_days: float = DEFAULT_MAX_AGE_DAYS) -> None:
        self.base = dataclasses.asdict(base)
        self.site, self.dev = base.device.site, base.device.id
        self.state_dir = base.data_dir / "config"
        self.keys = list(keys)
        self.state = state
        self._publish, self._on_applied, self._now_ms = publish, on_applied, now_ms
        self.max_age_ms = max_age_days * DAY_MS
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="config-apply", daemon=True)
        self.outcomes: list[Decision] = []

    @property
    def subscriptions(self) -> list[str]:
        return [topics.config(self.site, self.dev), topics.config(self.site, SITE_LEVEL)]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(5)

    def submit(self, topic: str, payload: bytes) -> None:
        """Safe from any thread: only enqueues."""
        self._queue.put((topic, bytes(payload)))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.handle(*item)
            except Exception:  # one bad message must not end config handling for good
                log.exception("config: unexpected error handling a message on %s", item[0])

    def handle(self, topic: str, payload: bytes) -> Decision | None:
        if not payload:
            return None  # a retained config was cleared: keep running what we have
        scope = "site" if topic == topics.config(self.site, SITE_LEVEL) else "device"
        try:
            doc = decode(self.keys, payload)
        except ConfigRefused as exc:
            decision = Decision("refused", exc.reason, exc.detail, self.state)
            return self._finish(decision, scope, None)
        if doc.topic != topic:
            # signed for another place: a signature does not travel to a topic it was not made for
            decision = Decision("refused", "wrong_target", f"signed for {doc.topic}", self.state)
            return self._finish(decision, scope, doc.version)
        decision = decide(self.state, doc, self.base, self.site, self.dev,
                          now_ms=self._now_ms(), max_age_ms=self.max_age_ms)
        if decision.result == "applied":
            try:
                write_atomic(self.state_dir / f"{doc.scope}.cbor", payload)
            except OSError as exc:
                decision = Decision("refused", "io", f"cannot save: {exc.strerror}", self.state)
        return self._finish(decision, doc.scope, doc.version)

    def _finish(self, decision: Decision, scope: str, version: int | None) -> Decision:
        if decision.result == "applied":
            self.state = decision.state
            log.info("config: %s version %s applied (effective v%d)", scope, version,
                     self.state.version)
            assert decision.config is not None
            self._on_applied(decision.config)
        elif decision.result == "refused":
            log.warning("config: %s version %s refused: %s %s", scope, version, decision.reason,
                        decision.detail)
        ack = {"v": 1, "site": self.site, "dev": self.dev, "scope": scope, "version": version,
               "result": "applied" if decision.result == "unchanged" else decision.result,
               "reason": decision.reason, "detail": decision.detail[:200],
               "cv": self.state.version, "ts": self._now_ms()}
        self._publish(topics.config_ack(self.site, self.dev), cbor2.dumps(ack), True)
        self.outcomes.append(decision)
        return decision
