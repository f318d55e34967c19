#!/usr/bin/env python3
"""A `journalctl -u ccus-agent -p warning` sample of a broker outage and its recovery, on a
machine without systemd: a real agent (`ccus agent`) on a private Mosquitto, its stderr a pipe
named by JOURNAL_STREAM (as systemd's `StandardError=journal` does), the broker killed (-9) and
started again ~5 s later on the same port. Each line the agent writes is stamped as it arrives
(the journal stamps; the agent writes no time of its own) and printed the way journalctl's
short format shows it: `Mon DD HH:MM:SS HOST ccus-agent[PID]: logger: message`, priority 4
(warning) and more severe only. The `<N>` prefix itself is journald's to strip, as it is here.

    .venv/bin/python scripts/journal-sample.py [--down-s 5] [--all]

Exit 0 when every line carried a `<N>` prefix and the outage (a WARNING with its cause and the
next attempt) and the recovery (connected again) were both logged; else 1 with one line.
Rules: no fixed sleep except the outage itself; every wait polls with a deadline.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2

from broker.launcher import PrivateBroker
from broker.procs import stop_process
from demo.site_day import card_of, write_idlist_csv
from edge.idlist import Entry, Status
from ops.mqttc import BrokerOpts, snapshot
from protocol import topics
from sim.agent_config import gate_agent_toml
from sim.nfc_card import free_udp_port

SITE, DEV = "12345678901234", "gate-01"
PRIO = re.compile(r"^<(\d)>(.*)$")


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"journal-sample: {what} did not happen within {timeout_s:g} s")
        time.sleep(0.2)


def online(broker: PrivateBroker) -> bool:
    got = snapshot(BrokerOpts(broker.host, broker.port), topics.state(SITE, DEV), quiet_s=0.2)
    return any(cbor2.loads(b).get("online") for b in got.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--down-s", type=float, default=5.0, help="how long the broker stays down")
    ap.add_argument("--all", action="store_true", help="every priority, not only warning+")
    a = ap.parse_args()
    lines: list[tuple[float, int, str]] = []  # (arrival, priority, text)
    bare: list[str] = []                      # lines without a priority prefix
    with tempfile.TemporaryDirectory(prefix="ccus-journal-") as tmp:
        d = Path(tmp)
        write_idlist_csv(d / "list.csv", [Entry("10000000000001", Status.ACTIVE,
                                                cards=(card_of(1).ident,))])
        broker = PrivateBroker(d / "broker", persistence=True).start()
        conf = d / "agent.toml"
        conf.write_text(gate_agent_toml(dev=DEV, site=SITE, data_dir=d / "data",
                                        host=broker.host, port=broker.port,
                                        list_path=d / "list.csv", udp_port=free_udp_port()))
        r, w = os.pipe()
        st = os.fstat(w)
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        agent = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config",
                                  str(conf)], stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                                 env=env)
        os.close(w)

        def read() -> None:
            with os.fdopen(r, encoding="utf-8", errors="replace") as f:
                for raw in f:
                    raw = raw.rstrip("\n")
                    m = PRIO.match(raw)
                    if m is None:
                        bare.append(raw)
                        lines.append((time.time(), 6, raw))  # journald's default for stdout
                    else:
                        lines.append((time.time(), int(m.group(1)), m.group(2)))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_for(lambda: online(broker), 30, "the agent's first connection")
            broker.kill()
            down_at = time.monotonic()
            wait_for(lambda: any("mqtt:" in t and p <= 4 for _, p, t in lines), 30,
                     "a warning about the lost connection")
            time.sleep(max(0.0, a.down_s - (time.monotonic() - down_at)))  # the outage
            broker.start()
            wait_for(lambda: any("again after" in t for _, _, t in lines), 60,
                     "the agent's reconnect")
        finally:
            stop_process(agent, timeout=20)
            reader.join(5)
            broker.close()
    host = socket.gethostname().split(".")[0]
    print(f"$ journalctl -u ccus-agent{'' if a.all else ' -p warning'}")
    for at, prio, text in lines:
        if a.all or prio <= 4:
            print(f"{time.strftime('%b %d %H:%M:%S', time.localtime(at))} {host} "
                  f"ccus-agent[{agent.pid}]: {text}")
    if bare:
        print(f"journal-sample: {len(bare)} line(s) without a <N> priority prefix, e.g. "
              f"{bare[0]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
