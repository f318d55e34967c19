"""Benchmark the serial codec (CPython and MicroPython unix port) and round trips over a pty.

.venv/bin/python bench/bench_serial.py [--n 20000] [--rounds 50]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "mpy"))

from firmware import frame  # noqa: E402

MPY_BENCH = """
import time, frame
n = {n}
p = frame.vend_req(123456, 2, 200, 5000)
t = time.ticks_ms()
w = b''
for i in range(n):
    w = frame.encode(frame.VEND_REQ, i & 255, 7, p)
t1 = time.ticks_ms()
d = frame.Decoder()
got = 0
for i in range(n):
    got += len(d.feed(w))
t2 = time.ticks_ms()
print(time.ticks_diff(t1, t), time.ticks_diff(t2, t1), got)
"""


def codec_cpython(n: int) -> tuple[float, float]:
    p = frame.vend_req(123456, 2, 200, 5000)
    t = time.perf_counter()
    w = b""
    for i in range(n):
        w = frame.encode(frame.VEND_REQ, i & 255, 7, p)
    t1 = time.perf_counter()
    d = frame.Decoder()
    got = sum(len(d.feed(w)) for _ in range(n))
    t2 = time.perf_counter()
    assert got == n
    return n / (t1 - t), n / (t2 - t1)


def codec_micropython(n: int) -> tuple[float, float]:
    mpy = Path(sys.executable).parent / "micropython"
    out = subprocess.run(
        [str(mpy), "-X", "heapsize=192K", "-c", MPY_BENCH.format(n=n)],
        env={"MICROPYPATH": f"{ROOT / 'firmware'}:.frozen"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    enc_ms, dec_ms, got = (int(x) for x in out.stdout.split())
    assert got == n, out.stdout
    return n / (enc_ms / 1000), n / (dec_ms / 1000)


def round_trips(rounds: int) -> dict[str, list[float]]:
    from edge.board import BoardLink
    from sim.board import DROP, VEND_PIN, BoardProcess

    res: dict[str, list[float]] = {"status": [], "vend": []}
    with tempfile.TemporaryDirectory() as d:
        board = BoardProcess(
            Path(d),
            links=[{"out": VEND_PIN[1], "in": DROP, "delay_ms": 0, "hold_ms": 20, "level": 0}],
        )
        try:
            board.start()
            with BoardLink(board.port) as link:
                assert link.wait_boot(5)
                for i in range(rounds):
                    t = time.perf_counter()
                    link.status()
                    res["status"].append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    r = link.vend(i + 1, 1, pulse_ms=10, timeout_ms=1000)
                    res["vend"].append((time.perf_counter() - t) * 1000)
                    assert r.result == frame.R_DISPENSED, r
                    time.sleep(0.03)  # let the drop sensor clear
        finally:
            board.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=50)
    a = ap.parse_args()
    e, dd = codec_cpython(a.n)
    print(f"CPython     encode {e:10.0f} frames/s   decode {dd:10.0f} frames/s")
    e, dd = codec_micropython(a.n)
    print(f"MicroPython encode {e:10.0f} frames/s   decode {dd:10.0f} frames/s  (unix port)")
    rt = round_trips(a.rounds)
    for k, v in rt.items():
        q = statistics.quantiles(v, n=20)
        print(
            f"pty round trip {k:6s} median {statistics.median(v):6.1f} ms  p95 {q[18]:6.1f} ms  (n={len(v)})"
        )


if __name__ == "__main__":
    main()
