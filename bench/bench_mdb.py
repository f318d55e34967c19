"""Benchmark the MDB POLL path of the firmware under the MicroPython unix port, as evidence for
the 5 ms reply budget (not a proof: see docs/vending.md, "What is not proven without hardware").

1. in process under the unix port: mdb.Reader.word() for a whole POLL (address + checksum
   words), idle (ACK) and with a reply queued, against a trivial echo function in the same run;
2. over a real pty: POLL -> reply round trip to the whole firmware (app.run with the MDB
   channel, the frame link and the watchdog in the same loop) against a MicroPython echo loop
   on another pty in the same run.

.venv/bin/python bench/bench_mdb.py [--n 20000] [--rounds 300]   prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware import mdb  # noqa: E402
from sim.board import BoardProcess  # noqa: E402
from sim.vmc import PtyWire, Vmc  # noqa: E402

MPY = Path(sys.executable).parent / "micropython"

IN_PROCESS = """
import time, mdb
n = {n}
def echo(w, now):
    return [w]
r = mdb.Reader()
for c in ([0x110, 0, 1, 0, 0, 0, 0x11], [0x114, 1, 0x15]):
    for w in c:
        r.word(w, 0)
r.word(mdb.ACK, 0)
def run(f):
    t = time.ticks_us()
    for i in range(n):
        f(0x112, 0)
        f(0x12, 0)
    return time.ticks_diff(time.ticks_us(), t) / n
def poll_reply(w, now):
    out = r.word(w, now)
    if out and len(out) > 1:
        r.word(mdb.ACK, now)
        r.queue.append(out)  # keep a reply queued: every POLL answers with data
    return out
r.queue.append(mdb.block((mdb.P_BEGIN_SESSION, 0, 150)))
print(run(echo), 0, run(poll_reply))
r2 = mdb.Reader()
for c in ([0x110, 0, 1, 0, 0, 0, 0x11], [0x114, 1, 0x15]):
    for w in c:
        r2.word(w, 0)
r2.word(mdb.ACK, 0)
print(run(r2.word))
"""

ECHO = """
import select, sys
f = open(int(sys.argv[1]), "r+b")
p = select.poll()
p.register(f, select.POLLIN)
one = bytearray(1)
n = 0
print("ECHO START")
while True:
    if not p.poll(0):
        continue
    f.readinto(one)
    n += 1
    if n == 4:  # a whole POLL (2 words, 4 bytes): answer ACK with the mode bit, as the reader
        n = 0
        f.write(b"\\x01\\x00")
"""


def in_process(n: int) -> dict[str, float]:
    env = {"MICROPYPATH": f"{ROOT / 'firmware'}:.frozen", "PATH": os.environ.get("PATH", "")}
    p = subprocess.run([str(MPY), "-X", "heapsize=192K", "-c", IN_PROCESS.format(n=n)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    l1, l2 = p.stdout.split("\n")[:2]
    echo_us, _, reply_us = (float(x) for x in l1.split())
    idle_us = float(l2)
    return {"echo_us": echo_us, "poll_idle_us": idle_us, "poll_reply_us": reply_us,
            "ratio_idle": idle_us / echo_us, "ratio_reply": reply_us / echo_us}


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": statistics.median(xs), "p95_ms": xs[int(len(xs) * 0.95) - 1],
            "max_ms": xs[-1], "n": len(xs)}


def _rtt(fd: int, rounds: int) -> list[float]:
    cmd = mdb.encode_words(mdb.command_words([0x12]))
    dec = mdb.WordDecoder()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        os.write(fd, cmd)
        got: list[int] = []
        while not got or not got[-1] & mdb.MODE:
            if not select.select([fd], [], [], 1.0)[0]:
                raise SystemExit("bench_mdb: no reply within 1 s")
            got.extend(dec.feed(os.read(fd, 64)))
        out.append((time.perf_counter() - t) * 1000)
        if len(got) > 1:
            os.write(fd, mdb.encode_words([mdb.ACK]))
        time.sleep(0.002)
    return out


def over_pty(rounds: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-mdb-"))
    vm, vs = os.openpty()
    tty.setraw(vm)
    tty.setraw(vs)
    board = BoardProcess(work, uarts={"1": os.ttyname(vs)}, mdb_uart=1, wdt_ms=3000)
    em, es = os.openpty()
    tty.setraw(em)
    tty.setraw(es)
    echo = subprocess.Popen([str(MPY), "-c", ECHO, str(es)], pass_fds=[es],
                            stdout=subprocess.PIPE, text=True)
    try:
        board.start()
        Vmc(PtyWire(vm), reply_timeout=0.5).setup()
        assert echo.stdout is not None and "ECHO START" in echo.stdout.readline()
        base = _rtt(em, rounds)
        fw = _rtt(vm, rounds)
    finally:
        board.close()
        echo.kill()
        echo.wait()
        for fd in (vm, vs, em, es):
            os.close(fd)
    b, f = _stats(base), _stats(fw)
    return {"echo": b, "firmware": f, "ratio_median": f["median_ms"] / b["median_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=300)
    a = ap.parse_args()
    print(json.dumps({"in_process_unix_port": in_process(a.n), "poll_over_pty": over_pty(a.rounds)},
                     indent=1))


if __name__ == "__main__":
    main()
