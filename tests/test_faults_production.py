"""A fault run with the PRODUCTION delivery timing (edge/config.py defaults: reconnect 1 s
doubling to 60 s, 3 s while the broker's host refuses TCP, acknowledgement timeout 30 s):
the broker is killed (-9) under a running agent that is building a backlog, stays down while
the taps go on, and is started again on its persistence. Everything must be acknowledged end
to end and stored once; the reconnect and drain times are printed (docs/delivery.md has them).

    CCUS_PROD_TOUCHES (default 3000) touches at 1,000/s; the broker is down for 5 s.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import DEVICE, DRIVER, ROOT, Rig, made_by_agent, snapshot

from broker.procs import wait_until

pytestmark = pytest.mark.e2e

TOTAL = int(os.environ.get("CCUS_PROD_TOUCHES", "3000"))
RATE = 1000.0
DOWN_S = 5.0


def test_broker_kill_under_a_backlog_with_production_timing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        rig.broker.start()
        rig.start_sink()
        log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - the process owns it
        rig.agent = subprocess.Popen(
            [sys.executable, str(DRIVER), "--data", str(rig.agent_data), "--port",
             str(rig.broker.port), "--total", str(TOTAL), "--rate", str(RATE), "--production"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        assert rig.agent.stdout
        assert "started" in json.loads(rig.agent.stdout.readline() or "{}")
        time.sleep(0.5)
        rig.broker.kill()
        killed = time.monotonic()
        time.sleep(DOWN_S)  # the taps go on into the outbox
        seen = len(rig.broker.log_path.read_text(errors="replace"))
        rig.broker.start()
        back = time.monotonic()
        wait_until(lambda: f"as {DEVICE}" in rig.broker.log_path.read_text(errors="replace")[seen:],
                   30, "the agent reconnected")
        reconnect_s = time.monotonic() - back
        rig.agent.wait(180)
        drain_s = time.monotonic() - back
        out = rig.agent.stdout.read()
        assert rig.agent.returncode == 0, (tmp_path / "agent.log").read_text()[-2000:]
        done = next(json.loads(x) for x in out.splitlines() if x.strip() and "done" in x)
        n = made_by_agent(rig.agent_data)  # asserts the outbox is empty: all acknowledged
        rows, _ = snapshot(rig.store)
        seqs = [r[0] for r in rows]
        assert n == TOTAL and seqs == list(range(1, TOTAL + 1))  # each once, none missing
        backlog = TOTAL - min(TOTAL, int(0.5 * RATE))
        agent_log = (tmp_path / "agent.log").read_text(errors="replace")
        replays = re.findall(r"replaying|retrying from seq", agent_log)
        print(f"\nproduction timing: broker down {back - killed:.1f} s, "
              f"backlog ~{backlog} touches; reconnect {reconnect_s:.2f} s after the broker's "
              f"return; drained (all acknowledged end to end) {drain_s:.1f} s after it; "
              f"link {done['link']}; replay lines in the agent log: {len(replays)}")
        print("".join(f"  {line}\n" for line in agent_log.splitlines() if "edge.link" in line))
        assert reconnect_s < 5.0
    finally:
        rig.close()
