"""The sink on the NATS cluster tier: a JetStream durable pull consumer, acked after the commit.

Rules of this file:

- Touches arrive as MQTT over NATS's MQTT gateway (topic ``ccus/v1/{site}/{dev}/touch`` is the
  subject ``ccus.v1.{site}.{dev}.touch``) and are kept by the stream ``CCUS_TOUCHES``
  (protocol.topics.TOUCH_STREAM, replicas 3 on the local cluster), which the sink creates
  when missing. Every sink process of one ``--group`` pulls from one durable consumer of that
  name: JetStream splits the touches between them (this replaces ``$share``), and a touch
  fetched but not acknowledged is redelivered after ``ACK_WAIT_S`` to whichever sink asks.
- Storing is the MQTT sink's own path: the same writer process (cloud_sink.ingest.writer,
  over the socketpair framing of cloud_sink.ingest.pipe): one transaction a batch, the
  acknowledgement ledger after the commit. Only after the writer's answer does this process
  ack each message to JetStream (explicit acks), then publish the end-to-end
  acknowledgements on the touch_ack subjects. A sink killed anywhere before that leaves the
  messages unacknowledged: redelivered, stored as repeats (insert-or-ignore), acked then.
- The end-to-end acknowledgement is a plain NATS publish: MQTT subscribers of the ack topic
  receive it (QoS 0 delivery), but it is NOT retained (a retained MQTT message is only made by
  an MQTT publisher on NATS 2.9). A device that missed one replays its unacknowledged touches
  on reconnect or after its e2e timeout; a repeat is acknowledged again (cloud_sink.acks).
- ``tls``: the CA, certificate and key of a ``sink:{name}`` identity; the secure cluster
  (``ccus cluster up --secure``) maps the certificate to the sink's NATS user, whose
  permissions allow exactly this stream's JetStream API, the touch subjects and the acks.
- Fetching and storing overlap: one task fetches (short waits) into a list while the writer
  commits the batch before; the next batch is all that arrived meanwhile (at most
  ``batch_max``), so the writer never waits for a fetch. One batch with the writer at a time;
  a writer that dies is started again and given the same batch; a store error is retried
  inside the writer; NATS errors are retried here.
- ``metrics`` (cloud_sink.metrics.SinkMetrics, `ccus sink run --nats --metrics`): the MQTT
  sink's counters from the writer's answers, the batch time from the hand-over to the
  writer's answer, writer restarts; and how many fetched touches wait for the writer. No
  subscription epoch here (JetStream keeps the position, not the sink).
"""

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from cloud_sink.errors import SinkError
from cloud_sink.ingest.pipe import frame, read_frame, start_writer, stop_writer
from cloud_sink.ingest.receiver import TlsFiles
from cloud_sink.model import BATCH_MAX, IngestResult, Policy
from protocol import topics
from protocol.ack import encode_ack

log = logging.getLogger(__name__)

ACK_WAIT_S = 10.0          # a fetched touch not acked within this goes to another fetch
MAX_ACK_PENDING = 20_000   # fetched, not yet acked, over all sinks of the group
STREAM_MAX_AGE_S = 7 * 86400
STREAM_MAX_BYTES = 1 << 30
# How long one fetch waits for touches. nats-py's fetch(n) keeps its pull request open until n
# messages or this deadline, so a caught-up sink committed once per deadline: at 0.5 s a touch
# waited 0-500 ms before its batch even began (bench/bench_freshness.py). Fetching goes on
# while the writer stores (_fetch_loop), so a backlog makes big batches by itself: what
# arrived during one commit is the next batch (a longer wait to fill batches, 0.5 s once a
# fetch brought 200, held 1 touch in 10 up to half a second at 1,000 touches/s).
FETCH_WAIT_S = 0.02


class JetStreamSinkError(SinkError, RuntimeError):
    pass


def parse_servers(spec: str) -> list[str]:
    """`--nats URL[,URL...]` -> server URLs; a bare host:port gets nats://."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            out.append(part if "://" in part else f"nats://{part}")
    if not out:
        raise JetStreamSinkError("--nats needs at least one URL (nats://HOST:PORT[,...])")
    return out


class _Writer:
    """The writer process (cloud_sink.ingest.writer) driven synchronously, one batch at a time."""

    def __init__(self, url: str, policy: Policy, on_restart: Callable[[], None] | None = None
                 ) -> None:
        self.url, self.policy, self.on_restart = url, policy, on_restart
        self.proc: Any = None
        self.sock: socket.socket | None = None
        self._next = 0

    def start(self) -> None:
        self.proc, self.sock = start_writer(self.url, self.policy)

    def stop(self) -> None:
        stop_writer(self.proc, self.sock)
        self.proc, self.sock = None, None

    def call(self, items: list[tuple[str, bytes]]) -> tuple[Any, ...]:
        """Store one batch; the writer's answer after its commit. A writer that dies is started
        again and given the same batch (insert-or-ignore makes a second write harmless)."""
        self._next += 1
        while True:
            try:
                assert self.sock is not None
                self.sock.sendall(frame((self._next, items)))
                reply = read_frame(self.sock)
                if reply[0] == self._next:
                    return tuple(reply)
            except (OSError, EOFError, AssertionError):
                log.error("sink: the writer process ended (exit %s); starting it again",
                          self.proc.poll() if self.proc is not None else "?")
                self.stop()
                time.sleep(0.5)
                self.start()
                if self.on_restart is not None:
                    self.on_restart()


class JetStreamSink:
    """``JetStreamSink(store, ["nats://..", ..]).start()``; ``.stop()``. Same counters as Sink."""

    def __init__(self, store: Any, servers: list[str], *, group: str = "sink",
                 client_id: str = "sink-1", batch_max: int = BATCH_MAX, replicas: int = 3,
                 on_batch: Callable[[IngestResult], None] | None = None,
                 tls: TlsFiles | None = None, metrics: Any = None) -> None:
        self.servers, self.group, self.client_id = servers, group, client_id
        self.tls = tls
        self.metrics = metrics          # cloud_sink.metrics.SinkMetrics or None
        self.url: str = store.url
        self.policy: Policy = store.policy
        self.batch_max, self.replicas, self.on_batch = batch_max, replicas, on_batch
        self.totals = IngestResult()
        self.subscribed = threading.Event()
        self.batches = 0
        self.gaps_opened = 0
        self.last_commit = 0.0          # time.monotonic() of the last batch with new touches
        self._stop = threading.Event()
        self._writer = _Writer(self.url, self.policy,
                               metrics.writer_restarts.inc if metrics is not None else None)
        self._thread = threading.Thread(target=self._run, name="sink-js", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._writer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)
        self._writer.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on the sink
            self.error = exc
            log.exception("sink: the JetStream consumer stopped")

    async def _main(self) -> None:
        import nats
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            DeliverPolicy,
            DiscardPolicy,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )

        async def on_error(exc: Exception) -> None:  # a node down is expected: one line, no trace
            log.warning("sink: NATS: %s", str(exc) or type(exc).__name__)

        async def on_disconnected() -> None:
            if not self._stop.is_set():  # not our own close on the way out
                log.warning("sink: NATS connection lost; reconnecting to another node")

        async def on_reconnected() -> None:
            log.info("sink: NATS connected to %s", nc.connected_url.netloc if nc.connected_url else "?")

        ctx = None
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=self.tls.ca)
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
        nc = await nats.connect(servers=self.servers, name=self.client_id, tls=ctx,
                                max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                connect_timeout=2, ping_interval=2, max_outstanding_pings=2,
                                error_cb=on_error, disconnected_cb=on_disconnected,
                                reconnected_cb=on_reconnected)
        js = nc.jetstream(timeout=5)
        stream = StreamConfig(name=topics.TOUCH_STREAM, subjects=[topics.ALL_TOUCH_SUBJECTS],
                              retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                              num_replicas=self.replicas, max_age=STREAM_MAX_AGE_S,
                              max_bytes=STREAM_MAX_BYTES, discard=DiscardPolicy.OLD)
        consumer = ConsumerConfig(durable_name=self.group, ack_policy=AckPolicy.EXPLICIT,
                                  deliver_policy=DeliverPolicy.ALL, ack_wait=ACK_WAIT_S,
                                  max_ack_pending=MAX_ACK_PENDING, max_deliver=-1,
                                  filter_subject=topics.ALL_TOUCH_SUBJECTS)
        psub = None
        while psub is None and not self._stop.is_set():
            try:
                with contextlib.suppress(nats.js.errors.BadRequestError):  # exists (other config)
                    await js.add_stream(stream)
                psub = await js.pull_subscribe(topics.ALL_TOUCH_SUBJECTS, durable=self.group,
                                               stream=topics.TOUCH_STREAM, config=consumer)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("sink: JetStream not ready (%s); retrying", exc)
                await asyncio.sleep(0.5)
        if psub is None:
            await nc.close()
            return
        log.info("sink: pulling %s from stream %s (durable %s)", topics.ALL_TOUCH_SUBJECTS,
                 topics.TOUCH_STREAM, self.group)
        self.subscribed.set()
        pending: list[Any] = []          # fetched, not yet with the writer
        arrived = asyncio.Event()
        fetcher = asyncio.create_task(self._fetch_loop(psub, pending, arrived))
        try:
            # stopping, what was fetched is stored first (else it would wait ACK_WAIT_S)
            while not self._stop.is_set() or pending:
                if fetcher.done() and not self._stop.is_set():
                    fetcher.result()             # raises what ended it (reported by _run)
                    break
                if not pending:
                    arrived.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(arrived.wait(), 0.2)
                    continue
                # everything fetched while the writer had the last batch goes in this one
                take = pending[:self.batch_max]
                del pending[:len(take)]
                if self.metrics is not None:
                    self.metrics.fetched_waiting.set(len(pending))
                await self._store(nc, take)
        finally:
            fetcher.cancel()
            with contextlib.suppress(BaseException):
                await fetcher
            # not drain(): the pull subscription's lingering request never drains, so drain()
            # sat out its 30 s timeout and a stopping sink took 15 s (stop()'s join) to exit.
            # Every message fetched is stored and acked by now (or, cut short, redelivered
            # after ACK_WAIT_S); flush sends the last acks (one lost is a redelivery, stored
            # as a repeat).
            with contextlib.suppress(Exception):
                await nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await nc.close()

    async def _fetch_loop(self, psub: Any, pending: list[Any], arrived: asyncio.Event) -> None:
        """Fetch while the writer stores: touches wait in `pending` for the writer, never the
        writer for a fetch. At most 2 x batch_max are held fetched and unstored (the rest wait
        in the stream, replicated); a caught-up fetch waits FETCH_WAIT_S."""
        import nats

        while not self._stop.is_set():
            room = 2 * self.batch_max - len(pending)
            if room <= 0:
                await asyncio.sleep(0.005)
                continue
            try:
                msgs = await psub.fetch(min(room, self.batch_max), timeout=FETCH_WAIT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                # nothing to fetch within the wait: nats-py 2.16 says so with its own
                # TimeoutError or, when the deadline runs out between its two pull requests,
                # with a bare asyncio one (~1 a second on an idle stream)
                continue
            except nats.errors.Error as exc:
                log.warning("sink: fetch failed (%s); retrying", str(exc) or type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            if msgs:
                pending.extend(msgs)
                arrived.set()

    async def _store(self, nc: Any, msgs: list[Any]) -> None:
        items = [(topics.mqtt_topic(m.subject), m.data) for m in msgs]
        # (batch_id, counts, acks, gaps_opened[, extra]): extra has dead-letter reasons and
        # open gaps, for the metrics
        began = time.monotonic()
        _, counts, acks, gaps_opened, *extra = await asyncio.to_thread(self._writer.call, items)
        if self.metrics is not None:
            self.metrics.batch_answered(True, time.monotonic() - began, counts,
                                        extra[0] if extra else {})
        # committed: now JetStream may forget them, and the devices may too
        for m in msgs:
            with contextlib.suppress(Exception):  # lost ack: redelivered, stored as a repeat
                await m.ack()
        for site, device, upto in acks:
            with contextlib.suppress(Exception):  # the device replays and is acked again
                await nc.publish(topics.nats_subject(topics.touch_ack(site, device)),
                                 encode_ack(upto))
        res = IngestResult(*counts)
        self.batches += 1
        self.totals.add(res)
        self.gaps_opened += gaps_opened
        if res.stored:
            self.last_commit = time.monotonic()
        if self.on_batch:
            self.on_batch(res)
