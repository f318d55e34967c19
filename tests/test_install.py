"""The agent-only install: `pip install ccus-touch` without extras, in a fresh venv, runs an
agent that reads an emulated card and publishes the touch to a private Mosquitto; the sink and
chart commands say in one line which extra they need.

The venv is built once per module (pip's cache makes it ~30 s; only PyPI is reached).
"""

import shutil
import subprocess
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import PrivateBroker
from demo.site_day import card_of, write_idlist_csv
from edge.idlist import Entry, Status
from protocol import topics
from protocol.touch import decode
from sim.agent_config import gate_agent_toml
from sim.nfc_card import CardField, free_udp_port

ROOT = Path(__file__).resolve().parent.parent
SITE = "13100000000002"
SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
                              ".ruff_cache", ".hypothesis", "build", "demo-data")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # build from a copy: the checkout stays clean
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    r = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    yield env


def _run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout: only the installed package is importable
    return subprocess.run([str(env / "bin" / "ccus"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_base_install_has_the_agent_and_none_of_the_extras(agent_venv: Path, tmp_path: Path) -> None:
    r = _run(agent_venv, "agent", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout and "--check" in r.stdout, r.stderr
    probe = subprocess.run([str(agent_venv / "bin" / "python"), "-c",
                            "import importlib.util as u; print([m for m in ('psycopg', 'matplotlib', "
                            "'tqdm', 'smartcard', 'pytest') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_missing_extras_are_one_line_each(agent_venv: Path, tmp_path: Path) -> None:
    from cloud_sink.store import open_store

    open_store(tmp_path / "s.sqlite").close()  # reports read existing stores only
    r = _run(agent_venv, "report", "work-history", "--db", str(tmp_path / "s.sqlite"), "--site",
             SITE, "--month", "2026-11", "--png", str(tmp_path / "wh.png"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "ccus report: matplotlib is not installed; install it with: pip install 'ccus-touch[sink]'")
    r = _run(agent_venv, "sink", "run", "--db", "postgresql://127.0.0.1:1/x", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "ccus sink: psycopg is not installed; install it with: pip install 'ccus-touch[sink]'")


def test_agent_from_the_base_install_publishes_a_tap(agent_venv: Path, tmp_path: Path) -> None:
    port = free_udp_port()
    write_idlist_csv(tmp_path / "list.csv",
                     [Entry("10000000000001", Status.ACTIVE, cards=(card_of(1).ident,))])
    with PrivateBroker(tmp_path / "broker") as b:
        conf = tmp_path / "agent.toml"
        conf.write_text(gate_agent_toml(dev="gate-pip", site=SITE, data_dir=tmp_path / "data",
                                        host=b.host, port=b.port, list_path=tmp_path / "list.csv",
                                        udp_port=port))
        got: list[bytes] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_message = lambda cl, u, m: got.append(bytes(m.payload))
        c.connect(b.host, b.port)
        c.subscribe(topics.touch(SITE, "gate-pip"), qos=1)
        c.loop_start()
        field = CardField(port)
        proc = subprocess.Popen([str(agent_venv / "bin" / "ccus"), "agent", "--config", str(conf)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert field.tap(card_of(1), timeout_s=20)
            deadline = time.monotonic() + 15
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
            field.close()
            c.loop_stop()
            c.disconnect()
        assert got, out.decode()
        t = decode(got[0])
        assert (t.device, t.seq, t.tid, t.decision.value) == ("gate-pip", 1, "10000000000001", "allow")
        assert proc.returncode == 0, out.decode()
