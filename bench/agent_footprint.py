"""What `ccus agent` costs a device: import time, modules loaded, resident memory after 5 s.

    .venv/bin/python bench/agent_footprint.py [--settle 5]

Starts a private Mosquitto, writes a small gate config (one udp: reader, a CSV list), runs
`python -m ccus.cli agent --config FILE` and reads VmRSS from /proc/PID/status after `--settle`
seconds; the import figures come from `python -X importtime` over the agent's import path.
Prints one JSON object. Takes about 15 s.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.launcher import PrivateBroker  # noqa: E402
from sim.agent_config import gate_agent_toml  # noqa: E402
from sim.nfc_card import free_udp_port  # noqa: E402

# The agent's import path, as `ccus agent` walks it: the command line parsed, then the agent.
AGENT_PATH = ("import contextlib, io, ccus.cli\n"
              "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
              "    ccus.cli.main(['agent', '--help'])\n"
              "import edge.agent, edge.config")


def import_us(code: str) -> tuple[int, int]:
    """Cumulative import time (us) of everything `code` imports, and the number of modules."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                       text=True, check=True, cwd=ROOT)
    total, n = 0, 0
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            n += 1
            if m.group(3) == " ":  # top level: its cumulative time covers its children
                total += int(m.group(2))
    return total, n


def cpu_ms(code: str, runs: int = 7) -> float:
    """Median CPU time (user + sys, ms) of a fresh interpreter running `code`: steadier than
    -X importtime's wall clock on a loaded machine."""
    import resource

    times = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
    return round(sorted(times)[len(times) // 2], 1)


def modules_of(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                       capture_output=True, text=True, check=True, cwd=ROOT)
    return set(r.stdout.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=5.0)
    a = ap.parse_args()
    out: dict[str, object] = {}
    out["import_cli_us"], out["import_cli_modules"] = import_us("import ccus.cli")
    out["import_agent_path_us"], out["import_agent_path_modules"] = import_us(AGENT_PATH)
    out["agent_path_cpu_ms"] = cpu_ms(AGENT_PATH)
    out["bare_python_cpu_ms"] = cpu_ms("pass")
    mods = modules_of(AGENT_PATH)
    out["agent_path_foreign"] = sorted({m.split(".")[0] for m in mods} &
                                       {"cloud_sink", "ops", "sim", "demo", "matplotlib", "psycopg"})
    with tempfile.TemporaryDirectory() as tmp, PrivateBroker(Path(tmp) / "broker") as b:
        t = Path(tmp)
        (t / "list.csv").write_text("tid,status,level,cards\n10000000000001,active,1,0102030405060708\n")
        conf = t / "agent.toml"
        conf.write_text(gate_agent_toml(dev="gate-fp", site="13100000000002", data_dir=t / "data",
                                        host=b.host, port=b.port, list_path=t / "list.csv",
                                        udp_port=free_udp_port()))
        proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config", str(conf)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(a.settle)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            out["agent_rss_kib"] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            out["agent_alive"] = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(15)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
