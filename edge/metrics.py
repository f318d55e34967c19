"""The agent's Prometheus metrics (prometheus-client, the [metrics] extra) and their endpoint.

Rules of this file:

- Off by default ([metrics] listen = ""); imported only when it is on, so a plain `ccus agent`
  imports nothing new (tests/test_cli.py checks that).
- Nothing is counted twice: every scrape reads the agent's own state message (Agent.state())
  and counters (Agent.counts, Agent.decisions), so the metrics and the fleet view always agree.
  A scrape is what the state timer does anyway (a few SQLite reads under the outbox lock).
- One registry per AgentMetrics (not the process-global one), so several agents in one process
  (tests) never collide; the endpoint serves exactly that registry at /metrics.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from edge.errors import EdgeError

if TYPE_CHECKING:
    from edge.agent import Agent

# the sink takes 9464 (cloud_sink/metrics.py); a device that runs both keeps them apart
DEFAULT_LISTEN = "127.0.0.1:9465"
DISK_STATES = ("ok", "low", "reserve", "full")


class MetricsError(EdgeError):
    """The metrics port cannot be bound."""


def families(agent: "Agent") -> Iterator[Any]:
    """The metric families of one scrape, from the agent's state message and counters."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, value: float | None, **labels: str) -> Any:
        g = GaugeMetricFamily(name, doc, labels=list(labels))
        g.add_metric(list(labels.values()), float("nan") if value is None else float(value))
        return g

    s = agent.state()
    link = s["link"]
    counts = dict(agent.counts)
    yield CounterMetricFamily("ccus_agent_taps", "card reads that became a tap (not a repeat)",
                              value=counts["taps"])
    yield CounterMetricFamily("ccus_agent_taps_suppressed",
                              "repeat reads of the same card within retap_window_s",
                              value=counts["suppressed"])
    dec = CounterMetricFamily("ccus_agent_decisions", "taps by decision and reason",
                              labels=["decision", "reason"])
    for (decision, reason), n in sorted(dict(agent.decisions).items()):
        dec.add_metric([decision, reason], n)
    yield dec
    yield CounterMetricFamily("ccus_agent_followups", "a role's second record of a tap "
                              "(the gate's passage outcome)", value=counts.get("followups", 0))
    yield gauge("ccus_agent_outbox_backlog", "touches not yet acknowledged end to end",
                s["backlog"])
    yield gauge("ccus_agent_outbox_oldest_age_seconds",
                "age of the oldest unacknowledged touch (NaN: none)", s["oldest_age_s"])
    yield CounterMetricFamily("ccus_agent_outbox_lost",
                              "touches lost (disk full and the emergency ring full)",
                              value=s["lost"])
    disk = GaugeMetricFamily("ccus_agent_disk_state", "the outbox disk's state (1: current)",
                             labels=["state"])
    for name in DISK_STATES:
        disk.add_metric([name], 1.0 if s["disk"] == name else 0.0)
    yield disk
    yield gauge("ccus_agent_link_connected", "1 while the MQTT link is connected",
                1 if link["connected"] else 0)
    yield CounterMetricFamily("ccus_agent_reconnects",
                              "MQTT connections after the first one",
                              value=max(0, link["connects"] - 1))
    yield CounterMetricFamily("ccus_agent_published", "touches published", value=link["published"])
    yield CounterMetricFamily("ccus_agent_replays", "replays of unacknowledged touches",
                              value=link["replays"])
    yield gauge("ccus_agent_list_version", "version of the ID list in use (NaN: none)", s["lv"])
    yield gauge("ccus_agent_list_age_hours", "age of the ID list in use (NaN: none)",
                s["list_age_h"])
    yield gauge("ccus_agent_list_stale", "1: no list, or older than idlist.max_age_h",
                1 if s["list_stale"] else 0)
    yield gauge("ccus_agent_config_version", "config version in force", s["cv"])
    readers = GaugeMetricFamily("ccus_agent_reader_up", "1 while a reader is ok",
                                labels=["reader"])
    for name, health in sorted(s["readers"].items()):
        readers.add_metric([name], 1.0 if health == "ok" else 0.0)
    yield readers
    # board health of the role (gate: {"gate": {"board": "ok", ...}}), where the role has one
    board = GaugeMetricFamily("ccus_agent_board_up", "1 while the role's controller board is ok",
                              labels=["role"])
    alarms = GaugeMetricFamily("ccus_agent_alarms", "alarms in force (door forced, held open...)",
                               labels=["role"])
    for role, sub in sorted(s.items()):
        if isinstance(sub, dict) and "board" in sub:
            board.add_metric([role], 1.0 if sub["board"] == "ok" else 0.0)
            alarms.add_metric([role], float(len(sub.get("alarms", ()))))
    yield board
    yield alarms


class _Collector:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        return families(self.agent)


class AgentMetrics:
    def __init__(self, agent: "Agent") -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.registry.register(_Collector(agent))  # type: ignore[arg-type]
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics on host:port (prometheus_client's own server, a daemon thread; it
        logs no scrape). -> the address bound (port 0: the one the kernel chose)."""
        from prometheus_client import start_http_server

        try:
            self._server, _thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise MetricsError(f"metrics.listen {host}:{port}: cannot serve metrics: "
                               f"{exc.strerror or exc} (port taken? set another, or \"\" for off)"
                               ) from exc
        return host, int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start(agent: "Agent") -> AgentMetrics | None:
    """The endpoint [metrics] listen asks for, serving; None when it is off.
    Raises ModuleNotFoundError (prometheus_client: ccus.extras names the extra), MetricsError."""
    from edge.config import parse_listen

    if not agent.cfg.metrics.listen:
        return None
    host, port = parse_listen(agent.cfg.metrics.listen)
    m = AgentMetrics(agent)
    m.serve(host, port)
    return m
