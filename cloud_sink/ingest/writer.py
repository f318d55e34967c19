"""The sink's writer process: decode, validate and store batches; answer each after its commit.

Rules of this file:

- It runs in its own interpreter (started by cloud_sink.ingest.receiver as
  ``python -c "from cloud_sink.ingest.writer import main; main()" FD``), reads frames
  (cloud_sink.ingest.pipe) from the socket FD, one batch at a time, and ends on EOF.
- One transaction a batch (store.ingest_rows, or store.ingest with Touches when the policy
  requires registered devices). A batch the store refuses for its data is halved until the
  refused touches stand alone (cloud_sink.isolate); any other store error (the store is down)
  is retried every second, never fatal (a StoreError, such as a PostgreSQL connection lost
  in a failover, is logged as one line; anything else with its traceback); the writer gives
  up only when the receiving process is gone (its broker session redelivers).
- After the commit it feeds the acknowledgement ledger (cloud_sink.acks) the keys written,
  and the device touches kept as dead letters (cloud_sink.deadletters), and answers with the
  counts and the acknowledgements to publish.
- A message that fails to map in an unforeseen way is dead-lettered as ``internal_error`` with
  its bytes: one bad touch must never hold back the batch behind it.
- An ``ANNOUNCE`` request instead of a batch (the receiver has just subscribed) is answered with
  the current acknowledgement of every device the store knows, for the receiver to publish
  under its new epoch (docs/sink.md, "Epochs").
"""

import contextlib
import logging
import os
import socket
import sys
import time

from cloud_sink.acks import AckLedger
from cloud_sink.deadletters import dead_letter_key
from cloud_sink.derive.rows import Row, touch_row
from cloud_sink.ingest.fastpath import fast_row
from cloud_sink.ingest.pipe import ANNOUNCE, frame, read_frame
from cloud_sink.isolate import write_isolating
from cloud_sink.model import DeadLetter, Policy, StoreError
from cloud_sink.store import open_store
from cloud_sink.validate import validate

log = logging.getLogger(__name__)


def map_items(items: list[tuple[str, bytes]], now: int, policy: Policy, slow: bool
              ) -> tuple[list[Row], list[tuple[str, bytes]], list[DeadLetter]]:
    """(topic, payload)s -> store rows (Touches when `slow`: store.ingest maps them), the
    (topic, payload) of each row, and dead letters."""
    rows: list[Row] = []
    sources: list[tuple[str, bytes]] = []
    dead: list[DeadLetter] = []
    for topic, payload in items:
        try:
            row = None if slow else fast_row(topic, payload, now, policy)
            if row is None:
                item = validate(topic, payload)
                if isinstance(item, DeadLetter):
                    log.warning("sink: dead letter on %s: %s (%s)", item.topic, item.reason,
                                item.detail)
                    dead.append(item)
                    continue
                row = item if slow else touch_row(item, now, policy)  # type: ignore[assignment]
        except Exception as exc:  # noqa: BLE001 - a bug in mapping one message
            log.exception("sink: could not map a message on %s; dead-lettered", topic)
            dead.append(DeadLetter(topic, payload, "internal_error", f"{type(exc).__name__}: {exc}"))
            continue
        rows.append(row)
        sources.append((topic, payload))
    return rows, sources, dead


def main() -> None:
    """The writer process's entry: the socket is the fd in argv[1]; the hello comes first."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    url, policy, level = read_frame(sock)
    serve(sock, url, policy, level)


def serve(sock: socket.socket, url: str, policy: Policy, level: int) -> None:
    """Store batches from `sock` and answer each after its commit. Ends on EOF."""
    logging.basicConfig(level=level or logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    sock.setblocking(True)
    store = open_store(url, policy)
    ledger = AckLedger(store)
    slow = policy.require_registered or not hasattr(store, "ingest_rows")
    try:
        while True:
            try:
                batch_id, items = read_frame(sock)
            except (EOFError, OSError):
                return
            if items == ANNOUNCE:
                if not _announce(sock, batch_id, ledger, parent):
                    return
                continue
            now = int(time.time() * 1000)
            rows, sources, dead = map_items(items, now, policy, slow)
            while True:
                try:
                    # acknowledged: what was written, and the device's touches kept as dead
                    # letters (cloud_sink.deadletters.dead_letter_key)
                    if slow:  # --registered-only dead-letters Touches of unknown devices
                        res, kept, refused = write_isolating(
                            lambda r, d, now=now: store.ingest(r, d, now_ms=now), rows, sources, dead)
                        keys = [(t.site, t.device, t.seq) for t in kept]  # type: ignore[attr-defined]
                    else:
                        res, kept, refused = write_isolating(
                            lambda r, d, now=now: store.ingest_rows(r, d, now), rows, sources, dead)
                        keys = [(r[2], r[0], r[1]) for r in kept]  # type: ignore[misc]
                    if dead or refused:  # rare: no set of the batch's keys on the common path
                        keys += {k for d in [*dead, *refused] if (k := dead_letter_key(d))} - set(keys)
                    # committed when ingest returns
                    opened = ledger.gaps_opened
                    acks = ledger.observe(keys)  # type: ignore[arg-type]
                    break
                except Exception as exc:  # noqa: BLE001 - the store is down or refused: keep it
                    if isinstance(exc, StoreError):  # expected (the store is away): one line
                        log.warning("sink: storing a batch of %d failed: %s; retrying in 1 s",
                                    len(items), exc)
                    else:
                        log.exception("sink: storing a batch of %d failed; retrying in 1 s",
                                      len(items))
                    time.sleep(1.0)
                    if os.getppid() != parent:
                        return  # the receiving process is gone; its broker session redelivers
            reasons: dict[str, int] = {}
            for d in [*dead, *refused]:
                reasons[d.reason] = reasons.get(d.reason, 0) + 1
            reply = frame((batch_id, (res.stored, res.repeated, res.dead, res.flagged),
                           [(a.site, a.device, a.upto) for a in acks],
                           ledger.gaps_opened - opened,
                           {"dead": reasons, "open_gaps": ledger.open_gaps()}))
            try:
                sock.sendall(reply)
            except OSError:
                return
    finally:
        with contextlib.suppress(Exception):
            store.close()


def _announce(sock: socket.socket, batch_id: int, ledger: AckLedger, parent: int) -> bool:
    """Answer an ANNOUNCE with every known device's acknowledgement. False: the receiver is gone."""
    while True:
        try:
            acks = ledger.current()
            break
        except Exception as exc:  # noqa: BLE001 - the store is down: retry, as a batch would
            if isinstance(exc, StoreError):
                log.warning("sink: reading the devices' acknowledgements failed: %s; retrying"
                            " in 1 s", exc)
            else:
                log.exception("sink: reading the devices' acknowledgements failed; retrying in"
                              " 1 s")
            time.sleep(1.0)
            if os.getppid() != parent:
                return False
    try:
        sock.sendall(frame((batch_id, (0, 0, 0, 0), [(a.site, a.device, a.upto) for a in acks],
                            0, {"open_gaps": ledger.open_gaps()})))
    except OSError:
        return False
    return True
