"""The sink's Prometheus metrics (prometheus-client) and the HTTP endpoint that serves them.

Rules of this file:

- One registry per SinkMetrics (not the process-global one), so several sinks in one process
  (tests) never collide; the endpoint serves exactly that registry at /metrics.
- The receiving process owns it (cloud_sink/ingest/receiver.py for MQTT,
  cloud_sink/ingest/jetstream.py for --nats): the writer's answers carry what it knows (counts, dead
  letters by reason, open gaps), the receiver measures the batch latency (handed to the
  writer -> its answer after the commit) and counts writer restarts. Nothing here blocks the
  MQTT loop: a counter update is a lock and an add.
- parse_listen() is pure: "off" or HOST:PORT (PORT 0: any free port, for tests).
"""

from typing import Any
from wsgiref.simple_server import WSGIServer

from cloud_sink.errors import SinkError

DEFAULT_LISTEN = "127.0.0.1:9464"  # the port OpenTelemetry's Prometheus exporter uses too
# commits take ~5-100 ms (docs/sink.md, Benchmarks); a store that is down shows as seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsError(SinkError):
    """--metrics is malformed or its port cannot be bound."""


def parse_listen(text: str) -> tuple[str, int] | None:
    """'off' -> None; 'HOST:PORT' -> (host, port). Raises MetricsError."""
    if text.strip().lower() == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsError(f"--metrics {text!r}: say HOST:PORT (e.g. {DEFAULT_LISTEN}) or off")
    return host.strip("[]") or "127.0.0.1", int(port)


class SinkMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.stored = Counter("ccus_sink_touches_stored", "touches newly stored", registry=r)
        self.repeated = Counter("ccus_sink_touches_repeated",
                                "touches received again (already stored: ignored)", registry=r)
        self.flagged = Counter("ccus_sink_touches_flagged",
                               "touches stored with a clock flag (kept out of derived tables)",
                               registry=r)
        self.dead = Counter("ccus_sink_dead_letters", "messages kept as dead letters",
                            ["reason"], registry=r)
        self.batches = Counter("ccus_sink_batches", "batches committed", registry=r)
        self.batch_seconds = Histogram("ccus_sink_batch_seconds",
                                       "a batch from the hand-over to the writer to its commit",
                                       buckets=BUCKETS, registry=r)
        self.open_gaps = Gauge("ccus_sink_open_gaps",
                               "open seq gaps of the devices this sink has seen", registry=r)
        self.writer_restarts = Counter("ccus_sink_writer_restarts",
                                       "writer processes started again after they ended",
                                       registry=r)
        self.epoch = Gauge("ccus_sink_epoch_ms", "the epoch of the current subscription "
                           "(the MQTT sink; 0 on --nats)", registry=r)
        self.fetched_waiting = Gauge("ccus_sink_fetched_waiting",
                                     "touches fetched from JetStream, waiting for the writer "
                                     "(--nats; 0 on MQTT)", registry=r)
        self._server: WSGIServer | None = None

    def batch_answered(self, is_batch: bool, seconds: float, counts: tuple[int, int, int, int],
                       extra: dict[str, Any]) -> None:
        """The writer answered a batch (or an announce: is_batch False)."""
        if "open_gaps" in extra:
            self.open_gaps.set(extra["open_gaps"])
        if not is_batch:
            return
        stored, repeated, _dead, flagged = counts
        self.batches.inc()
        self.batch_seconds.observe(seconds)
        self.stored.inc(stored)
        self.repeated.inc(repeated)
        self.flagged.inc(flagged)
        for reason, n in (extra.get("dead") or {}).items():
            self.dead.labels(reason).inc(n)

    # -- the endpoint ---------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics on host:port (prometheus_client's own server, a daemon thread; it
        logs no scrape). -> the address bound (port 0: the one the kernel chose)."""
        from prometheus_client import start_http_server

        try:
            self._server, _thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} "
                               "(another sink on this port? use --metrics HOST:PORT or off)"
                               ) from exc
        return host, int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
