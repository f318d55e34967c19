"""Tap-to-decision latency through nfcpy's udp path, beside the raw nfcpy read of the same card.

For each technology (FeliCa, Type 4A, Type 4B), in one run, one emulated card in a separate
field process (sim.nfc_card), and three ways of reading it, each for N taps:

- raw:      nfcpy's ContactlessFrontend.connect with an on-connect that does the bare read
            (FeliCa: tag.read_without_encryption; Type 4: tag.send_apdu SELECT, SELECT,
            READ BINARY) - what any nfcpy program must spend;
- decision: the project's NfcpyReader + card profile + re-tap Debouncer + gate decision core
            against an in-memory ID list (the person at the gate is answered here);
- durable:  the same, through Agent.handle_read: the touch is also encoded and committed to
            the SQLite outbox (synchronous=FULL, fsync) before the answer.

Latency = from nfcpy's on-discover (the card answered the poll) to the end of the read /
the verdict / the durable touch, perf_counter in the reader process. Each tap ends when the
card leaves at the reader's first presence check, so taps come as fast as the udp driver
allows. The ways take turns in blocks of 50 taps; the first 20 taps of each way and the
first 2 of each later block (a reader starting afresh) are not measured. Prints one JSON
document; `--taps` (default 500) per technology and way.

    .venv/bin/python bench/bench_reader.py [--taps 500] [--out bench.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nfc
import nfc.tag.tt3 as tt3

from edge.agent import Agent
from edge.config import AgentConfig, DeviceConfig, ProfileConfig, ReaderConfig
from edge.decision import CardRead, Debouncer, decide_gate
from edge.idlist import Entry, MemoryIdList, Status
from edge.reader.nfcpy_backend import NfcpyReader
from protocol.touch import CardTech
from sim.cards import DEMO_AID, DEMO_FILE, EmulatedCard, felica_card, type4_card
from sim.nfc_card import free_udp_port

TID = "12345678901234"
TECHS: dict[str, tuple[str, EmulatedCard, ProfileConfig]] = {
    "felica": ("212F", felica_card(bytes.fromhex("012E4CD300000001"), tid=TID),
               ProfileConfig(kind="felica")),
    "type4a": ("106A", type4_card(CardTech.ISO_A, bytes.fromhex("04A1B2C3D4E5F6"), tid=TID),
               ProfileConfig(kind="iso_dep", aid=DEMO_AID.hex(), file_id=DEMO_FILE.hex())),
    "type4b": ("106B", type4_card(CardTech.ISO_B, bytes.fromhex("A1B2C3D4"), tid=TID),
               ProfileConfig(kind="iso_dep", aid=DEMO_AID.hex(), file_id=DEMO_FILE.hex())),
}


class Field:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "sim.nfc_card", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout and "ready" in json.loads(self.proc.stdout.readline())

    def tap(self, card: EmulatedCard) -> bool:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"port": self.port, "tap": card.to_json(),
                                          "hold_ms": None}) + "\n")
        self.proc.stdin.flush()
        return bool(json.loads(self.proc.stdout.readline()).get("seen"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "median_ms": round(statistics.median(s) * 1000, 4),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 4),
            "max_ms": round(s[-1] * 1000, 4)}


WARMUP = 20   # taps before measuring: nfcpy imports its tag modules at the first activation
BLOCK = 50    # the three ways take turns in blocks of this many taps, so drift hits all alike


def run_raw(field: Field, target: str, card: EmulatedCard, taps: int,
            warmup: int) -> list[float]:
    samples: list[float] = []
    state = {"t0": 0.0}
    stop = threading.Event()

    def on_discover(target: Any) -> bool:
        state["t0"] = time.perf_counter()
        return True

    def on_connect(tag: Any) -> bool:
        if card.tech is CardTech.FELICA:
            sc = tt3.ServiceCode(0x100B >> 6, 0x100B & 0x3F)
            data = tag.read_without_encryption([sc], [tt3.BlockCode(0, service=0)])
        else:
            tag.send_apdu(0, 0xA4, 4, 0, DEMO_AID, mrl=256)
            tag.send_apdu(0, 0xA4, 2, 0x0C, DEMO_FILE)
            data = tag.send_apdu(0, 0xB0, 0, 0, mrl=16)
        samples.append(time.perf_counter() - state["t0"])
        assert bytes(data[:14]) == TID.encode()
        return True

    clf = nfc.ContactlessFrontend(f"udp:127.0.0.1:{field.port}")

    def loop() -> None:
        rdwr = {"targets": [target], "on-discover": on_discover, "on-connect": on_connect,
                "on-release": lambda tag: True, "iterations": 1, "interval": 0.05,
                "beep-on-connect": False}
        while not stop.is_set():
            clf.connect(rdwr=rdwr, terminate=stop.is_set)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        for _ in range(warmup + taps):
            if not field.tap(card):
                raise RuntimeError("raw: the reader did not read the card")
    finally:
        stop.set()
        t.join(5)
        clf.close()
    return samples[warmup:]


def run_reader(field: Field, target: str, card: EmulatedCard, profile: ProfileConfig,
               taps: int, warmup: int, on_read: Any) -> list[float]:
    samples: list[float] = []
    cfg = ReaderConfig("bench", f"udp:127.0.0.1:{field.port}", targets=[target],
                       feedback="none")

    def handle(c: ReaderConfig, read: CardRead) -> Any:
        out = on_read(c, read)
        samples.append(time.perf_counter() - reader.discovered_at)
        if read.tid != TID:
            raise RuntimeError(f"bad read: {read}")
        return out

    reader = NfcpyReader(cfg, profile, handle)
    reader.start()
    try:
        for _ in range(warmup + taps):
            if not field.tap(card):
                raise RuntimeError("the reader did not read the card")
    finally:
        reader.stop()
    return samples[warmup:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taps", type=int, default=500)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    idlist = MemoryIdList([Entry(TID, Status.ACTIVE)])
    report: dict[str, Any] = {"taps_per_way": args.taps, "python": sys.version.split()[0],
                              "nfcpy": getattr(nfc, "__version__", "?"),
                              "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()[0],
                              "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        acfg = AgentConfig(device=DeviceConfig(id="bench-01", site="13100000000001",
                                               data_dir=str(Path(tmp) / "agent")))
        agent = Agent(acfg, idlist=idlist, config_keys=[])
        try:
            for name, (target, card, profile) in TECHS.items():
                field = Field(free_udp_port())
                try:
                    deb = Debouncer(0.0)   # every bench tap is a new tap (same card, on purpose)

                    def decide(c: ReaderConfig, read: CardRead, deb: Debouncer = deb) -> Any:
                        deb.is_new_tap(read.card, time.monotonic())
                        return decide_gate(read, idlist, c.direction)

                    raw: list[float] = []
                    decision: list[float] = []
                    durable: list[float] = []
                    done = 0
                    while done < args.taps:
                        n = min(BLOCK, args.taps - done)
                        warm = WARMUP if done == 0 else 2   # each block's reader starts afresh
                        raw += run_raw(field, target, card, n, warm)
                        decision += run_reader(field, target, card, profile, n, warm, decide)
                        durable += run_reader(field, target, card, profile, n, warm,
                                              _no_debounce(agent))
                        done += n
                finally:
                    field.close()
                r, d, u = stats(raw), stats(decision), stats(durable)
                report["results"][name] = {
                    "raw_nfcpy": r, "agent_decision": d, "agent_durable_touch": u,
                    "ratio_decision_to_raw_median": round(d["median_ms"] / r["median_ms"], 3),
                    "ratio_decision_to_raw_p99": round(d["p99_ms"] / r["p99_ms"], 3),
                    "ratio_durable_to_raw_median": round(u["median_ms"] / r["median_ms"], 3),
                }
        finally:
            agent.outbox.close()
    report["loadavg_after"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for name, res in report["results"].items():
        print(f"{name:7s} raw {res['raw_nfcpy']['median_ms']:.3f}/{res['raw_nfcpy']['p99_ms']:.3f} ms"
              f"  decision {res['agent_decision']['median_ms']:.3f}/{res['agent_decision']['p99_ms']:.3f}"
              f"  durable {res['agent_durable_touch']['median_ms']:.3f}/"
              f"{res['agent_durable_touch']['p99_ms']:.3f} (median/p99)  ratio decision/raw "
              f"{res['ratio_decision_to_raw_median']:.2f}", file=sys.stderr)
    return 0


def _no_debounce(agent: Agent) -> Any:
    """Agent.handle_read with the re-tap window off for the bench reader (same card each tap)."""
    def handle(c: ReaderConfig, read: CardRead) -> Any:
        agent._debounce[c.name] = Debouncer(0.0)
        return agent.handle_read(c, read)
    return handle


if __name__ == "__main__":
    sys.exit(main())
