"""The agent's Prometheus endpoint ([metrics] listen), scraped over HTTP from an agent linked to
a private Mosquitto from the project's config: taps, decisions by reason, outbox backlog, link
state and reconnects, list version; off by default; a missing prometheus_client is one line."""

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker.launcher import PrivateBroker, free_port
from broker.procs import stop_process, wait_until
from cloud_sink.workday import jst_ms
from edge import metrics
from edge.agent import Agent
from edge.clock import ManualClock
from edge.config import ConfigError, from_dict
from edge.decision import CardRead
from edge.idlist import Entry, MemoryIdList, Status
from protocol.touch import CardTech
from sim.nfc_card import free_udp_port

SITE = "13100000000009"
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Scrape = {}
    for m in re.finditer(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.M):
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(m: Scrape, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def config(tmp_path: Path, broker_port: int, listen: str) -> dict[str, object]:
    return {
        "device": {"id": "gate-m", "site": SITE, "data_dir": str(tmp_path / "agent")},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "tls": False,
                 "reconnect_min_s": 0.2, "reconnect_fast_max_s": 0.5, "reconnect_max_s": 1.0},
        "readers": [{"name": "entry", "path": f"udp:127.0.0.1:{free_udp_port()}",
                     "targets": ["212F"]}],  # an empty field: the taps come in by hand
        "metrics": {"listen": listen},
    }


def test_metrics_listen_is_checked() -> None:
    base = {"device": {"id": "g", "site": SITE}}
    assert from_dict(base).metrics.listen == ""  # off by default
    assert from_dict({**base, "metrics": {"listen": "[::1]:9465"}}).metrics.listen == "[::1]:9465"
    for bad in ("9465", "host:port", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="^metrics.listen: "):
            from_dict({**base, "metrics": {"listen": bad}})


def test_a_scrape_shows_taps_decisions_backlog_link_and_reconnects(tmp_path: Path) -> None:
    broker = PrivateBroker(tmp_path / "broker").start()
    cfg = from_dict(config(tmp_path, broker.port, "127.0.0.1:0"))
    clock = ManualClock(jst_ms(2026, 12, 2, 7, 0))
    card = b"\x01" * 8
    idlist = MemoryIdList([Entry("10000000000001", Status.ACTIVE, cards=(card,))], version=7,
                          issued_ms=jst_ms(2026, 12, 2, 4, 0))
    agent = Agent(cfg, clock=clock, idlist=idlist, config_keys=[])
    served = metrics.start(agent)
    assert served is not None and served._server is not None
    port = int(served._server.server_port)
    agent.start()
    reader = cfg.readers[0]
    try:
        wait_until(lambda: value(scrape(port), "ccus_agent_link_connected") == 1, 10, "connected")
        m0 = scrape(port)
        assert value(m0, "ccus_agent_taps_total") == 0
        assert value(m0, "ccus_agent_outbox_backlog") == 0
        assert value(m0, "ccus_agent_reconnects_total") == 0
        assert value(m0, "ccus_agent_list_version") == 7
        assert value(m0, "ccus_agent_list_age_hours") == 3.0
        assert value(m0, "ccus_agent_list_stale") == 0
        assert value(m0, "ccus_agent_disk_state", state="ok") == 1

        assert agent.handle_read(reader, CardRead(card, CardTech.FELICA)) is not None
        assert agent.handle_read(reader, CardRead(card, CardTech.FELICA)) is None  # a repeat
        clock.advance(60_000)
        assert agent.handle_read(reader, CardRead(b"\x02" * 8, CardTech.FELICA)) is not None
        m1 = scrape(port)
        assert value(m1, "ccus_agent_taps_total") == 2
        assert value(m1, "ccus_agent_taps_suppressed_total") == 1
        assert value(m1, "ccus_agent_decisions_total", decision="allow", reason="ok") == 1
        assert value(m1, "ccus_agent_decisions_total", decision="deny",
                     reason="unknown_card") == 1
        # no sink here: nothing is acknowledged end to end, the backlog waits and ages
        assert value(m1, "ccus_agent_outbox_backlog") == 2
        assert value(m1, "ccus_agent_outbox_oldest_age_seconds") == 60
        wait_until(lambda: value(scrape(port), "ccus_agent_published_total") == 2, 10,
                   "both touches published")

        broker.stop()
        wait_until(lambda: value(scrape(port), "ccus_agent_link_connected") == 0, 10,
                   "the link down")
        broker.start()
        wait_until(lambda: value(scrape(port), "ccus_agent_link_connected") == 1, 15,
                   "the link back")
        assert value(scrape(port), "ccus_agent_reconnects_total") == 1
    finally:
        agent.stop()
        served.close()
        broker.close()
    with pytest.raises(urllib.error.URLError):  # closed with the agent
        scrape(port)


def test_off_by_default_and_a_taken_port_is_a_metrics_error(tmp_path: Path) -> None:
    off = Agent(from_dict({**config(tmp_path / "a", 1, "")}), config_keys=[])
    try:
        assert metrics.start(off) is None
    finally:
        off.outbox.close()
    first = Agent(from_dict(config(tmp_path / "b", 1, "127.0.0.1:0")), config_keys=[])
    served = metrics.start(first)
    assert served is not None and served._server is not None
    taken = f"127.0.0.1:{served._server.server_port}"
    second = Agent(from_dict(config(tmp_path / "c", 1, taken)), config_keys=[])
    try:
        with pytest.raises(metrics.MetricsError, match=f"^metrics.listen {taken}: "):
            metrics.start(second)
    finally:
        served.close()
        first.outbox.close()
        second.outbox.close()


def test_ccus_agent_without_prometheus_client_names_the_extra(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nid = "gate-m"\nsite = "{SITE}"\ndata_dir = "{tmp_path}/d"\n'
                   '[mqtt]\ntls = false\nport = 1\n[metrics]\nlisten = "127.0.0.1:0"\n')
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            f"from ccus.cli import main; sys.exit(main(['agent', '--config', {str(cfg)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "ccus agent: prometheus-client is not installed; install it with: "
        "pip install 'ccus-touch[metrics]'"]


def test_ccus_agent_serves_metrics_until_it_stops(tmp_path: Path) -> None:
    broker = PrivateBroker(tmp_path / "broker").start()
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nid = "gate-p"\nsite = "{SITE}"\ndata_dir = "{tmp_path}/d"\n'
                   f'[mqtt]\ntls = false\nport = {broker.port}\n'
                   f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ,
                            "CCUS_KEYS_DIR": str(tmp_path / "keys")})
    try:
        wait_until(lambda: _connected(port), 20, "the agent's endpoint, linked")
        assert value(scrape(port), "ccus_agent_list_stale") == 1  # no list configured
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
        with pytest.raises(urllib.error.URLError):
            scrape(port)
    finally:
        stop_process(proc)
        broker.close()


def _connected(port: int) -> bool:
    try:
        return value(scrape(port), "ccus_agent_link_connected") == 1
    except (urllib.error.URLError, ConnectionError):
        return False
