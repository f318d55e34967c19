"""A gate agent as its own process for the fault tests and the idle benchmark.

It runs the production Agent (decision, outbox, MQTT link) without nfcpy readers and taps
synthetic cards through Agent.handle_read at a steady rate. What touch number `seq` is made of
(card, reader, time) is a pure function of seq, so a run that is killed and restarted makes
exactly the touches an undisturbed run makes: it resumes at the outbox's next_seq.

    python tests/fault_agent.py --data DIR --port PORT --total N [--rate R] [--idle S]

Prints JSON lines: {"started": next_seq}, then {"done": next_seq} once every touch up to
--total is made and acknowledged end to end (outbox empty); then exits 0.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_sink.workday import jst_ms  # noqa: E402
from edge.agent import Agent  # noqa: E402
from edge.clock import ManualClock
from edge.config import from_dict  # noqa: E402
from edge.decision import CardRead  # noqa: E402
from edge.idlist import Entry, MemoryIdList, Status  # noqa: E402
from protocol.timequality import TimeQuality  # noqa: E402
from protocol.touch import CardTech  # noqa: E402

SITE = "13100000000001"
DEVICE = "gate-f1"
DAY0_MS = jst_ms(2026, 11, 26, 6)
TECHS = 200                   # cards 0..199 are registered, 200..249 are not (denials)
NEVER_SYNCED_UPTO = 10        # the first touches are made before the clock was ever synced


def card(i: int) -> bytes:
    return bytes.fromhex(f"012E4CD3{i:08X}")


def tid(i: int) -> str:
    return f"{10000000000000 + i:014d}"


def tap_of(seq: int) -> tuple[bytes, str, int]:
    """(card, reader name, ts_ms) of touch number seq: 1,000 touches a work day, the first half
    entries and the second half exits, 30 s apart."""
    day, k = divmod(seq, 1000)
    c = card((seq * 7919) % 250)
    reader = "entry" if k < 500 else "exit"
    return c, reader, DAY0_MS + day * 86_400_000 + k * 30_000


def idlist() -> MemoryIdList:
    return MemoryIdList([Entry(tid(i), Status.ACTIVE, level=1, cards=(card(i),))
                         for i in range(TECHS)])


def config(data: Path, port: int, timing: dict | None = None,  # type: ignore[type-arg]
           device: str = DEVICE) -> dict:  # type: ignore[type-arg]
    """timing: [mqtt] delivery keys (short ones for the fault rounds); None: the production
    defaults of edge/config.py."""
    return {
        "device": {"id": device, "site": SITE, "role": "gate", "data_dir": str(data)},
        "mqtt": {"host": "127.0.0.1", "port": port, "tls": False, "keepalive_s": 5,
                 "inflight": 50, "state_interval_s": 5.0, **(timing or {})},
        "readers": [
            {"name": "entry", "path": "udp:127.0.0.1:65000", "direction": "in",
             "retap_window_s": 0.0},
            {"name": "exit", "path": "udp:127.0.0.1:65001", "direction": "out",
             "retap_window_s": 0.0},
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--total", type=int, default=2000)
    p.add_argument("--rate", type=float, default=500.0, help="touches per second")
    p.add_argument("--idle", type=float, default=0.0, help="make no touches; stay up S seconds")
    p.add_argument("--device", default=DEVICE, help="the device id (several agents at once)")
    p.add_argument("--e2e-timeout", type=float, default=3.0)
    p.add_argument("--production", action="store_true",
                   help="the production [mqtt] timing defaults, not the short test values")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    timing = None if args.production else {
        "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "reconnect_fast_max_s": 1.0,
        "ack_timeout_s": args.e2e_timeout, "ack_timeout_max_s": max(600.0, args.e2e_timeout)}
    cfg = from_dict(config(Path(args.data), args.port, timing, args.device))
    clock = ManualClock(DAY0_MS)
    agent = Agent(cfg, clock=clock, idlist=idlist(), config_keys=[])
    agent.readers = []  # taps come from this driver, not from nfcpy
    link = agent.link
    readers = {r.name: r for r in cfg.readers}
    agent.start()
    print(json.dumps({"started": agent.outbox.next_seq()}), flush=True)
    if args.idle:
        time.sleep(args.idle)
        agent.stop()
        return 0
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    while (seq := agent.outbox.next_seq()) <= args.total:
        c, reader, ts = tap_of(seq)
        clock.set(ts)
        clock._quality = (TimeQuality.NEVER_SYNCED if seq <= NEVER_SYNCED_UPTO  # noqa: SLF001
                          else TimeQuality.SYNCED)
        t = agent.handle_read(readers[reader], CardRead(card=c, tech=CardTech.FELICA))
        assert t is not None and t.seq == seq, (t, seq)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    while agent.outbox.depth() > 0:
        time.sleep(0.05)
    print(json.dumps({"done": agent.outbox.next_seq(), "link": link.stats()}), flush=True)
    agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
