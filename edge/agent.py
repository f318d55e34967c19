"""The agent: readers -> decision -> outbox -> MQTT link, for every device role.

One lock serialises taps from all readers, so seq order is decision order. A tap is made
durable (outbox) before the person at the gate is answered.
"""

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cbor2

from edge import __version__, config_apply, roles
from edge.clock import Clock, SystemClock
from edge.config import AgentConfig, ProfileConfig, ReaderConfig
from edge.decision import CardRead, Debouncer, list_age_h
from edge.idlist.base import IdList, MemoryIdList, read_technicians_csv
from edge.idlist.codec import open_list
from edge.idlist.dist import subscription as list_subscription
from edge.idlist.updater import DAY_MS, ListUpdater
from edge.link import Link
from edge.outbox import Outbox
from edge.reader.backend import Feedback, make_reader
from protocol import topics
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision, Role, Touch, decode, encode

log = logging.getLogger(__name__)

UID_PROFILE = ProfileConfig(kind="uid")


def _without_list(cfg: AgentConfig) -> str:
    """What the agent does while it has no usable static list: for a log line."""
    if cfg.idlist.name:
        return f"using the signed list {cfg.idlist.name!r} once it arrives, denying every card until then"
    return "denying every card (set idlist.name to follow a signed list)"


def load_idlist(cfg: AgentConfig) -> IdList | None:
    """The static list named by idlist.path (a mapped .idl file, or a CSV for small sites and
    tests), or None. A list that arrives signed over MQTT (idlist.name) replaces it.

    Never fatal: a missing, unreadable or corrupt file, or a folder (such as the signed list's
    own folder, data_dir/idlist), is one WARNING naming the key and what happens next; under
    Restart=always a fatal error here would be a crash loop at every boot."""
    path = cfg.idlist.path
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        own = " (the signed lists' own folder)" if p.resolve() == _list_dir(cfg).resolve() else ""
        log.warning("idlist.path %s is a folder%s, not a list file: ignored, %s; set it to a "
                    ".idl or .csv file, or remove it", path, own, _without_list(cfg))
        return None
    if not p.exists():
        log.warning("id list %s does not exist yet: %s", path, _without_list(cfg))
        return None
    try:
        if path.endswith(".csv"):
            return MemoryIdList(read_technicians_csv(path))
        return open_list(path)
    except (OSError, ValueError) as exc:  # ListFormatError and CSV errors are ValueErrors
        log.warning("idlist.path %s is unreadable (%s): ignored, %s; replace the file",
                    path, exc, _without_list(cfg))
        return None


def _list_dir(cfg: AgentConfig) -> Path:
    """Where the signed lists (idlist.name) are kept."""
    return cfg.data_dir / "idlist"


class Agent:
    def __init__(self, cfg: AgentConfig, *, clock: Clock | None = None,
                 idlist: IdList | None = None,
                 on_touch: Callable[[Touch], None] | None = None,
                 config_keys: list[Any] | None = None,
                 feedback: Feedback | None = None) -> None:
        # signed config: the file config with the saved operator overlays on top
        keys = config_keys if config_keys is not None else config_apply.load_keys(
            os.environ.get("CCUS_KEYS_DIR", config_apply.KEYS_DIR))
        base = cfg
        cfg, applied = config_apply.boot_config(base, keys)
        self.cfg = cfg
        self.restart_requested = threading.Event()  # an applied config needing a restart
        self.clock = clock or SystemClock(assume_synced=cfg.clock.assume_synced)
        self._static_list = idlist if idlist is not None else load_idlist(cfg)
        # signed lists over MQTT: verified, applied atomically off the link's thread (a delta
        # at 2 million IDs takes seconds), served from the mapped file
        self.lists: ListUpdater | None = None
        self._list_worker: ThreadPoolExecutor | None = None
        self.list_refusals: list[str] = []  # reported in the state message, newest last
        if cfg.idlist.name:
            self.lists = ListUpdater(
                _list_dir(cfg), cfg.idlist.name, keys, now_ms=self.clock.now_ms,
                max_issued_age_ms=cfg.idlist.max_issued_age_days * DAY_MS)
            self._list_worker = ThreadPoolExecutor(1, thread_name_prefix="idlist")
            if self.lists.load_error:
                then = (f"falling back to the static list {cfg.idlist.path}"
                        if self._static_list is not None else "denying every card")
                log.warning("id list cache dropped: %s; moved to %s; %s until a new list "
                            "arrives", self.lists.load_error, self.lists.corrupt_path, then)
        self.role = Role(cfg.device.role)
        self.on_touch = on_touch
        self.outbox = Outbox(cfg.data_dir / "outbox.sqlite")
        self.link = Link(cfg.mqtt, cfg.device.site, cfg.device.id, self.outbox, self.state)
        self.config = config_apply.ConfigApplier(
            base, keys, applied, self.link.publish, self._config_applied,
            now_ms=self.clock.now_ms, max_age_days=cfg.security.max_config_age_days)
        for t in self.config.subscriptions:
            self.link.subscribe(t, self.config.submit)
        if self.lists is not None:
            self.link.subscribe(list_subscription(self.lists.name), self._list_message)
        # the backend (nfcpy, pcsc) is chosen per reader by its config; `feedback` is the
        # controller board's beep/LED hook for readers that cannot signal themselves
        self.feedback: Feedback | None = feedback
        self.readers = [make_reader(r, self._profile(r), self.handle_read, self._on_health,
                                    self._feedback) for r in cfg.readers]
        self._debounce = {r.name: Debouncer(r.retap_window_s) for r in cfg.readers}
        self._lock = threading.RLock()  # a role's follow-up record may come from inside a tap
        self.counts = {"taps": 0, "suppressed": 0, "allowed": 0, "denied": 0}
        self.decisions: dict[tuple[str, str], int] = {}  # (decision, reason) -> taps: metrics
        # the role plug-in, found by name in the ccus.roles entry points (edge/roles/__init__.py)
        ctx = roles.RoleContext(cfg=cfg, clock=self.clock, record=self.record_follow_up,
                                event=self.publish_event, state_changed=self.link.publish_state,
                                unacked=self._unacked)
        self.plugin: roles.DeviceRole = roles.load(self.role.value)(ctx)

    @property
    def fatal(self) -> str | None:
        """Why the agent cannot go on (its MQTT link died): the process must exit non-zero."""
        return self.link.fatal

    @property
    def idlist(self) -> IdList | None:
        """The list decisions are made with: the newest verified signed list, else the static one."""
        signed = self.lists.current if self.lists is not None else None
        return signed if signed is not None else self._static_list

    def _list_message(self, topic: str, payload: bytes) -> None:
        assert self._list_worker is not None
        self._list_worker.submit(self._apply_list, topic, payload)

    def _apply_list(self, topic: str, payload: bytes) -> None:
        assert self.lists is not None
        try:
            outcomes = self.lists.handle(topic, payload)
        except Exception:  # noqa: BLE001 - a bad update must never take the agent down
            log.exception("id list: update on %s failed", topic)
            return
        for o in outcomes:
            if o.fetch:  # chunks came before their manifest and were dropped: get them again
                self.link.resubscribe(o.fetch)
            if o.kind == "applied":
                log.info("id list %s v%s applied (%d technicians)", self.lists.name, o.version,
                         len(self.lists.current) if self.lists.current is not None else 0)
            elif o.kind == "refused":
                self.list_refusals.append(f"v{o.version}: {o.reason.value if o.reason else '?'}")
                log.warning("id list %s: refused %s: %s %s", self.lists.name, o.version,
                            o.reason.value if o.reason else "", o.detail)
        if any(o.kind in ("applied", "refused") for o in outcomes):
            self.link.publish_state()

    def _profile(self, r: ReaderConfig) -> ProfileConfig:
        return UID_PROFILE if r.profile == "uid" else self.cfg.profiles[r.profile]

    def start(self) -> None:
        self.config.start()
        self.link.start()
        self.plugin.start()  # e.g. settles what a restart left open before the first tap
        for r in self.readers:
            r.start()
        log.info("agent %s (%s) at site %s: %d reader(s), list v%s", self.cfg.device.id,
                 self.role.value, self.cfg.device.site, len(self.readers),
                 self.idlist.version if self.idlist else "none")

    def stop(self) -> None:
        for r in self.readers:
            r.stop()
        self.plugin.stop()
        self.link.stop()
        if self._list_worker is not None:
            self._list_worker.shutdown(wait=True, cancel_futures=True)
        self.config.stop()
        self.outbox.close()

    # -- taps -----------------------------------------------------------------------------
    def handle_read(self, reader: ReaderConfig, read: CardRead) -> Touch | None:
        """One tap from one reader. Returns the touch made, or None for a repeat tap."""
        with self._lock:
            if read.card and not self._debounce[reader.name].is_new_tap(
                    read.card, self.clock.monotonic()):
                self.counts["suppressed"] += 1
                return None
            self.counts["taps"] += 1
            now = self.clock.now_ms()
            verdict, role_facts = self.plugin.decide(reader, read, self.idlist)
            facts = {**self.plugin.facts(reader, now), **role_facts}
            touch = self._write(now, read.card, read.tech, verdict.tid, verdict.decision,
                                verdict.reason, verdict.list_version, facts)
            self.counts["allowed" if verdict.decision.value == "allow" else "denied"] += 1
            key = (touch.decision.value, touch.reason.value)
            self.decisions[key] = self.decisions.get(key, 0) + 1
        self.link.notify()
        log.info("tap %s on %s: %s (%s) tid=%s seq=%d", read.card.hex(), reader.name,
                 touch.decision.value, touch.reason.value, touch.tid, touch.seq)
        self.plugin.after(reader, touch)  # durable first, then the gate opens
        if self.on_touch:
            self.on_touch(touch)
        return touch

    def record_follow_up(self, f: roles.FollowUp) -> Touch | None:
        """A role's second record for a tap (the gate's passage outcome): its own seq, the same
        card, technician and decision as the tap, the role's facts. Counted in `followups`."""
        with self._lock:
            tap = f.tap
            touch = self._write(self.clock.now_ms(), tap.card, tap.card_tech, tap.tid,
                                tap.decision, f.reason or tap.reason, tap.list_version, f.facts)
            self.counts["followups"] = self.counts.get("followups", 0) + 1
        self.link.notify()
        log.info("follow-up of seq %d on %s: %s seq=%d", tap.seq, f.reader.name,
                 dict(f.facts), touch.seq)
        if self.on_touch:
            self.on_touch(touch)
        return touch

    def _write(self, now: int, card: bytes, tech: CardTech, tid: str | None, decision: Decision,
               reason: Reason, list_version: int, facts: dict[str, str | int | bool]) -> Touch:
        """Build the touch around the next seq and commit it to the outbox (under the lock)."""
        def make(seq: int) -> Touch:
            return Touch(device=self.cfg.device.id, site=self.cfg.device.site, role=self.role,
                         seq=seq, ts_ms=now, tq=self.clock.quality(), card=card, card_tech=tech,
                         tid=tid, decision=decision, reason=reason, list_version=list_version,
                         config_version=self.cfg.version, facts=facts)

        touch: Touch | None = None

        def build(seq: int) -> bytes:
            nonlocal touch
            touch = make(seq)
            return encode(touch)

        if self.outbox.append(build, created_ms=now) is None:
            # disk full: the decision stands and the person is answered; the touch waits in
            # the outbox's emergency ring without a seq (seq 0 here), or is counted lost,
            # and the state message says so (docs/delivery.md, "Disk full")
            self.counts["disk_full"] = self.counts.get("disk_full", 0) + 1
            touch = make(0)
            self.link.publish_state()
        assert touch is not None
        return touch

    def _unacked(self, after_seq: int) -> list[Touch]:
        out = []
        for _, payload in self.outbox.pending(after_seq, 100_000):
            try:
                out.append(decode(payload))
            except ValueError:  # TouchError: a bad row is the link's to report, not ours
                continue
        return out

    def publish_event(self, event: dict[str, Any]) -> None:
        """An alarm (door forced, held open, emergency release) on ccus/v1/{site}/{dev}/event:
        CBOR, QoS 1, not a touch; the state message carries the alarms in force as well."""
        body = {"v": 1, "dev": self.cfg.device.id, "site": self.cfg.device.site,
                "ts": self.clock.now_ms(), **event}
        log.warning("event: %s", event)
        self.link.publish(topics.event(self.cfg.device.site, self.cfg.device.id),
                          cbor2.dumps(body))
        self.link.publish_state()

    def _config_applied(self, new: AgentConfig) -> None:
        # the version (carried by touches) changes at once; anything else takes a restart
        old = dataclasses.replace(self.cfg, version=new.version)
        self.cfg.version = new.version
        if new != old:
            log.warning("config v%d applied: restart the agent for it to take effect", new.version)
            self.restart_requested.set()
        self.link.publish_state()

    # -- state ----------------------------------------------------------------------------
    def _feedback(self, reader: str, decision: Decision, reason: Reason) -> None:
        if self.feedback is not None:
            self.feedback(reader, decision, reason)

    def _on_health(self, name: str, health: str) -> None:
        self.link.publish_state()

    def state(self) -> dict[str, Any]:
        return {
            "v": 1,
            "dev": self.cfg.device.id,
            "site": self.cfg.device.site,
            "role": self.role.value,
            "online": True,
            "ts": self.clock.now_ms(),
            "tq": self.clock.quality().value,
            "sw": __version__,
            "lv": self.idlist.version if self.idlist else None,
            "cv": self.cfg.version,
            **self._delivery_state(),
            "readers": {r.cfg.name: r.health for r in self.readers},
            **self.plugin.state(),
            **self._list_condition(),
            **({"idlist": {**self.lists.state(), "refused": len(self.list_refusals),
                           "last_refusal": self.list_refusals[-1] if self.list_refusals else None}}
               if self.lists is not None else {}),
        }

    def _list_condition(self) -> dict[str, Any]:
        """A list older than idlist.max_age_h is a reported condition, never a silent one."""
        age = list_age_h(self.idlist, self.clock.now_ms())
        return {"list_age_h": None if age is None else round(age, 2),
                "list_stale": age is None or age > self.cfg.idlist.max_age_h}

    def _delivery_state(self) -> dict[str, Any]:
        """Outbox, disk and link fields of the state message (docs/delivery.md lists them)."""
        ob = self.outbox
        now, oldest = self.clock.now_ms(), ob.oldest_ms()
        return {
            "backlog": ob.depth(),              # touches not yet acknowledged end to end
            "oldest_ms": oldest,
            "oldest_age_s": None if oldest is None else max(0, (now - oldest) // 1000),
            "next_seq": ob.next_seq(),
            "disk": ob.disk_state(),            # ok | low | reserve | full
            "disk_free": ob.disk_free(),
            "ring": ob.ring_depth,              # held in memory only (disk full)
            "lost": ob.lost,                    # disk full and emergency ring full
            "link": self.link.stats(),          # published, refused (+reason), acked_upto, ...
        }
