"""The `ccus` command: lazy registration (what `ccus agent` loads), `-v` anywhere, one-line
errors for a missing extra, and the log formats (text, journal, json)."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccus import cli
from ccus.logs import JournalFormatter, JsonFormatter, priority, under_journal

ROOT = Path(__file__).resolve().parent.parent
# What a device must never load: the sink, the operator's tools, simulators, demo, charts.
# prometheus_client: only with [metrics] listen set (edge/metrics.py is imported then)
FOREIGN = {"cloud_sink", "ops", "sim", "demo", "matplotlib", "psycopg", "tqdm", "prometheus_client"}

AGENT_PATH = """
import contextlib, io, sys
from ccus.cli import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["agent", "--help"])
import edge.agent, edge.config, edge.check   # what `ccus agent [--check]` imports
"""


def _python(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, **kw)  # type: ignore[call-overload,no-any-return]


def test_agent_path_loads_no_sink_ops_sim_demo_or_charts() -> None:
    r = _python("-c", AGENT_PATH + "print(' '.join(sys.modules))")
    assert r.returncode == 0, r.stderr
    tops = {m.split(".")[0] for m in r.stdout.split()}
    assert {"edge", "paho", "cryptography"} <= tops  # the probe did reach the agent
    assert tops & FOREIGN == set()


def test_importtime_of_the_agent_path_names_no_foreign_module() -> None:
    r = _python("-X", "importtime", "-c", AGENT_PATH)
    assert r.returncode == 0, r.stderr
    rows = [m.groups() for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", r.stderr)]
    loaded = {name.split(".")[0] for _, _, name in rows}
    total_ms = sum(int(cum) for cum, indent, _ in rows if indent == " ") / 1000
    assert "edge" in loaded and len(rows) > 50, r.stderr[-2000:]
    assert loaded & FOREIGN == set(), f"agent path loads {loaded & FOREIGN} ({total_ms:.0f} ms)"


def test_help_lists_every_command_with_its_table_help() -> None:
    text = " ".join(cli.build_parser().format_help().split())
    for name, (help_, _) in cli.COMMANDS.items():
        assert f"{name} {help_}" in text


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_table_help_is_the_help_the_command_registers(name: str) -> None:
    # the chosen command's line comes from its own register(): it must say what the table says
    text = " ".join(cli.build_parser(name).format_help().split())
    assert f"{name} {cli.COMMANDS[name][0]}" in text


def test_every_command_builds() -> None:
    p = cli.build_parser(every=True)
    assert p.parse_args(["sink", "gaps", "--db", "x.sqlite"]).cmd == "sink"


@pytest.mark.parametrize("argv, level", [
    (["agent", "--config", "a.toml"], 0),
    (["-v", "agent", "--config", "a.toml"], 1),
    (["agent", "--config", "a.toml", "-v"], 1),
    (["-v", "agent", "-v", "--config", "a.toml"], 2),
    (["sink", "run", "--db", "s.sqlite", "-vv"], 2),
    (["--log-format", "json", "sink", "-v", "gaps", "--db", "s.sqlite"], 1),
])
def test_verbose_is_accepted_anywhere(argv: list[str], level: int) -> None:
    args = cli.build_parser(cli.chosen_command(argv)).parse_args(argv)
    assert cli.verbosity(args) == level


def test_chosen_command_skips_option_values() -> None:
    assert cli.chosen_command(["--log-format", "json", "-v", "agent"]) == "agent"
    assert cli.chosen_command(["-h"]) is None
    assert cli.chosen_command(["nosuch"]) is None


def _hidden(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`ccus ARGV` with `module` not importable, as on an install without its extra."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from ccus.cli import main; sys.exit(main({argv!r}))")
    return _python("-c", code)


def test_png_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    from cloud_sink.store import open_store

    open_store(tmp_path / "s.sqlite").close()  # reports read existing stores only
    r = _hidden("matplotlib", ["report", "work-history", "--db", str(tmp_path / "s.sqlite"),
                               "--site", "13100000000001", "--month", "2026-11",
                               "--png", str(tmp_path / "wh.png")])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "ccus report: matplotlib is not installed; install it with: pip install 'ccus-touch[sink]'"]


def test_postgres_store_without_psycopg_names_the_extra() -> None:
    r = _hidden("psycopg", ["sink", "gaps", "--db", "postgresql://127.0.0.1:1/none"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("ccus sink: psycopg is not installed; install it with: "
                                "pip install 'ccus-touch[sink]'")


def test_a_missing_module_that_is_no_extra_still_raises() -> None:
    r = _hidden("sqlite3", ["sink", "gaps", "--db", "x.sqlite"])
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr


# -- log formats -------------------------------------------------------------------------------

def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise OSError("disk gone")
        except OSError:
            info = sys.exc_info()
    return logging.LogRecord("edge.link", level, __file__, 1, msg, None, info)


def test_priorities_are_syslog_levels() -> None:
    assert [priority(n) for n in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                  logging.CRITICAL, 5, 25, 35)] == [7, 6, 4, 3, 2, 7, 6, 4]


def test_journal_lines_all_carry_a_priority_and_no_timestamp() -> None:
    text = JournalFormatter().format(_record(logging.ERROR, "link lost\nsecond line", exc=True))
    lines = text.split("\n")
    assert len(lines) >= 4 and lines[0] == "<3>edge.link: link lost"
    assert all(line.startswith("<3>") for line in lines)
    assert "OSError: disk gone" in text and not re.search(r"\d\d:\d\d:\d\d", text)


def test_json_lines_parse_with_level_and_exception() -> None:
    doc = json.loads(JsonFormatter().format(_record(logging.WARNING, "broker refused", exc=True)))
    assert doc["level"] == "warning" and doc["priority"] == 4 and doc["logger"] == "edge.link"
    assert doc["msg"] == "broker refused" and "OSError: disk gone" in doc["exc"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", doc["ts"])


def test_journal_stream_must_name_the_stream(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journal(a, env) and not under_journal(b, env)
        assert not under_journal(a, {}) and not under_journal(a, {"JOURNAL_STREAM": "x"})


def _agent_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "agent.toml"
    # a broker port nothing listens on: the agent runs, logs and keeps retrying
    conf.write_text(f"""
[device]
id = "gate-log"
site = "13100000000002"
data_dir = "{tmp_path / 'data'}"
[mqtt]
host = "127.0.0.1"
port = 1
tls = false
""")
    return conf


def _run_agent_for(seconds: float, argv: list[str], err: Path, env: dict[str, str]) -> str:
    """Run an agent until it has logged for `seconds` (startup may be slow on a busy machine),
    stop it as systemd does, and return its stderr."""
    with open(err, "w") as f:
        if "JOURNAL_STREAM" in env:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, **env})
        deadline = time.monotonic() + 20
        while err.stat().st_size == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    return err.read_text()


@pytest.mark.e2e
def test_agent_under_systemd_logs_journal_lines(tmp_path: Path) -> None:
    out = _run_agent_for(1, ["agent", "--config", str(_agent_conf(tmp_path))],
                         tmp_path / "err", {"JOURNAL_STREAM": "set below"})
    lines = out.splitlines()
    assert lines, "the agent logged nothing"
    assert all(re.match(r"<[2-7]>[\w.]+: ", line) for line in lines), out
    assert not re.search(r"^<\d>\d{4}-\d\d-\d\d", out, re.M)  # no timestamp of ours


@pytest.mark.e2e
def test_agent_log_format_json_given_after_the_subcommand(tmp_path: Path) -> None:
    out = _run_agent_for(1, ["agent", "--config", str(_agent_conf(tmp_path)), "--log-format",
                             "json", "-v"], tmp_path / "err", {})
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs and all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)
    assert any(d["level"] == "info" for d in docs)


def _under_journal(argv: list[str], tmp_path: Path) -> str:
    """stderr of `python ARGV` run with JOURNAL_STREAM naming its stderr, as systemd does."""
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=f, cwd=ROOT,
                       timeout=60, env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    return err.read_text()


def test_a_commands_error_line_under_systemd_is_an_error_priority(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[device]\nid = "gate-1"\nsite = "123"\n')
    out = _under_journal(["-m", "ccus.cli", "agent", "--config", str(conf)], tmp_path)
    assert out.startswith("<3>ccus agent: device.site") and out.count("\n") == 1, out


def test_an_uncaught_traceback_under_systemd_is_error_on_every_line(tmp_path: Path) -> None:
    out = _under_journal(["-c", "from ccus.logs import setup_logging; setup_logging(20)\n"
                                "import logging; logging.getLogger('x').warning('careful')\n"
                                "raise RuntimeError('boom')"], tmp_path)
    lines = out.splitlines()
    assert lines[0] == "<4>x: careful" and lines[-1] == "<3>RuntimeError: boom"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines[1:]), out


def test_a_module_of_two_extras_names_the_commands_own() -> None:
    r = _hidden("tqdm", ["ops", "list", "publish", "--help"])
    assert r.returncode == 0  # help needs no progress bar: tqdm is imported where it is used
    from ccus.extras import MissingExtra

    exc = ModuleNotFoundError("No module named 'tqdm'", name="tqdm")
    assert "ccus-touch[ops]" in str(MissingExtra.for_module(exc, "ops"))
    assert "ccus-touch[sink]" in str(MissingExtra.for_module(exc, "sink"))
    assert MissingExtra.for_module(ModuleNotFoundError(name="nosuch"), "ops").name == "nosuch"  # type: ignore[attr-defined]


def test_main_in_process_leaves_a_harness_logging_alone(tmp_path: Path) -> None:
    # pytest's own capture handlers sit on the root logger: main() must not replace them
    # with a handler on a stream pytest closes after this test
    root = logging.getLogger()
    before = list(root.handlers)
    assert before, "pytest installs its capture handlers"
    cli.main(["sink", "gaps", "--db", str(tmp_path / "s.sqlite")])
    assert root.handlers == before
