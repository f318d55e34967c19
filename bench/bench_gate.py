"""Tap to gate relay energized, over the pty with the real firmware, beside the raw nfcpy read
of the same card in the same run.

One emulated FeliCa card in a field process (sim.nfc_card) read through nfcpy's udp driver,
and a controller board that is the real firmware under the MicroPython unix port on a pty
(sim.board). Two ways, taking turns in blocks of 50 taps:

- raw:   nfcpy's ContactlessFrontend.connect with the bare FeliCa read (bench_reader.py's raw);
- relay: the production agent with the gate role and its board: reader + card profile +
         decision + the touch committed to the outbox (fsync) + the GATE_PULSE to the board,
         up to the board's ACK of that pulse, which the firmware sends in the same loop pass
         that drives the relay pin (firmware/app.py step()).

Latency = from nfcpy's on-discover (the card answered the poll) to the end of the read / to
the pulse's ACK, perf_counter in this process. Target (issue 16): relay p99 under 20 ms.
Prints one JSON document; `--taps` (default 200) per way; about 30 s.

    .venv/bin/python bench/bench_gate.py [--taps 200] [--out bench.json]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nfc  # noqa: E402
from bench_reader import TECHS, WARMUP, Field, run_raw, stats  # noqa: E402

from edge.agent import Agent  # noqa: E402
from edge.config import from_dict  # noqa: E402
from edge.decision import CardRead, Debouncer  # noqa: E402
from edge.idlist import Entry, MemoryIdList, Status  # noqa: E402
from edge.reader.nfcpy_backend import NfcpyReader  # noqa: E402
from edge.roles.gate import GateRole  # noqa: E402
from sim.board import BoardProcess  # noqa: E402
from sim.nfc_card import free_udp_port  # noqa: E402

BLOCK = 50
TID = "12345678901234"


def run_relay(agent: Agent, field: Field, taps: int, warmup: int,
              durable: list[float]) -> list[float]:
    target, card, profile = TECHS["felica"]
    role = agent.plugin
    assert isinstance(role, GateRole) and role.board is not None
    board = role.board
    rcfg = agent.cfg.readers[0]
    samples: list[float] = []
    returned: list[float] = []

    def handle(c: Any, read: CardRead) -> Any:
        agent._debounce[c.name] = Debouncer(0.0)  # the same card every tap, on purpose
        t = agent.handle_read(c, read)
        returned.append(time.perf_counter() - reader.discovered_at)  # touch committed, pulse queued
        assert t is not None and read.tid == TID, read
        key = f"{t.seq}:{t.ts_ms}:{c.name}"
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            hit = next((at for k, at in reversed(board.relay_log) if k == key), None)
            if hit is not None:
                samples.append(hit - reader.discovered_at)
                return t
            time.sleep(0.0002)
        raise RuntimeError(f"no relay pulse acknowledged for {key}: board {board.health}")

    reader = NfcpyReader(rcfg, profile, handle)
    reader.start()
    try:
        for _ in range(warmup + taps):
            if not field.tap(card):
                raise RuntimeError("the reader did not read the card")
    finally:
        reader.stop()
    durable += returned[warmup:]
    return samples[warmup:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taps", type=int, default=200)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    started = time.monotonic()
    target, card, _ = TECHS["felica"]
    report: dict[str, Any] = {"taps_per_way": args.taps, "python": sys.version.split()[0],
                              "nfcpy": getattr(nfc, "__version__", "?"), "cpus": os.cpu_count(),
                              "loadavg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        board = BoardProcess(Path(tmp))
        board.start()
        field = Field(free_udp_port())
        cfg = from_dict({
            "device": {"id": "bench-gate", "site": "13100000000001", "role": "gate",
                       "data_dir": str(Path(tmp) / "agent")},
            "mqtt": {"tls": False, "port": 1},
            # a short pulse so the relay has dropped again before the next tap
            "gate": {"serial": board.port, "pulse_ms": 20, "passage_timeout_s": 1.0},
            "readers": [{"name": "entry", "path": f"udp:127.0.0.1:{field.port}",
                         "targets": [target], "profile": "felica", "feedback": "none"}],
            "profiles": {"felica": {"kind": "felica"}},
        })
        agent = Agent(cfg, idlist=MemoryIdList([Entry(TID, Status.ACTIVE)]), config_keys=[])
        agent.plugin.start()
        try:
            deadline = time.monotonic() + 10
            while agent.state()["gate"]["board"] != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("the board did not come online")
                time.sleep(0.05)
            raw: list[float] = []
            relay: list[float] = []
            durable: list[float] = []
            done = 0
            while done < args.taps:
                n = min(BLOCK, args.taps - done)
                warm = WARMUP if done == 0 else 2
                raw += run_raw(field, target, card, n, warm)
                relay += run_relay(agent, field, n, warm, durable)
                done += n
            pulses = sum(1 for p, lvl, _ in board.pins() if p == 7 and lvl == 1)
        finally:
            agent.plugin.stop()
            agent.outbox.close()
            field.close()
            board.close()
    r, g = stats(raw), stats(relay)
    report.update({
        "raw_nfcpy_read": r, "tap_to_relay": g,
        # handle_read returned: decision made, touch committed (fsync), pulse handed over
        "tap_to_durable_touch": stats(durable),
        "ratio_relay_to_raw_median": round(g["median_ms"] / r["median_ms"], 3),
        "ratio_relay_to_raw_p99": round(g["p99_ms"] / r["p99_ms"], 3),
        "relay_minus_raw_median_ms": round(g["median_ms"] - r["median_ms"], 3),
        "target_p99_ms": 20, "target_met": g["p99_ms"] < 20,
        "relay_edges_at_board_pin": pulses,
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_after": os.getloadavg()[0],
    })
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"raw {r['median_ms']:.2f}/{r['p99_ms']:.2f} ms  tap->relay {g['median_ms']:.2f}/"
          f"{g['p99_ms']:.2f} ms (median/p99)  ratio {report['ratio_relay_to_raw_median']:.2f}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
