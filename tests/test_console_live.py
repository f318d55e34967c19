"""The live page's SSE stream under a burst: every touch arrives once, batched into few events
(newest first within one), over a real uvicorn on loopback with the bridge fed directly."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from sink_support import SITE, touch
from test_console_stores import serving

from cloud_sink.store import open_store
from console.live import Bridge
from protocol import topics
from protocol.touch import encode

BURST = 300
ROW = re.compile(r'data-seq="(\d+)"')


def test_a_burst_arrives_whole_in_few_events(tmp_path: Path) -> None:
    open_store(tmp_path / "s.sqlite").close()
    bridge = Bridge()
    with serving(str(tmp_path / "s.sqlite"), tmp_path, bridge) as web:
        stream = web.open(f"{web.base}/sites/{SITE}/live/events", timeout=20)  # type: ignore[attr-defined]
        assert stream.readline() == b": connected\n"
        events: list[list[int]] = []
        done = threading.Event()

        def read() -> None:
            current: list[int] = []
            for raw in stream:
                line = raw.decode()
                if line == "\n":
                    if current:
                        events.append(current)
                    current = []
                    if sum(map(len, events)) >= BURST:
                        done.set()
                        return
                current += [int(m) for m in ROW.findall(line)]
        threading.Thread(target=read, daemon=True).start()
        payloads = [encode(touch(seq)) for seq in range(1, BURST + 1)]
        for p in payloads:                       # as paho's thread does: as fast as it can
            bridge.feed(topics.touch(SITE, "gate-01"), p)
        assert done.wait(10), f"only {sum(map(len, events))} of {BURST} rows arrived"
        stream.close()
    seqs = [s for e in events for s in e]
    assert sorted(seqs) == list(range(1, BURST + 1))          # each once, none lost
    assert len(events) < BURST / 3, f"{len(events)} events for {BURST} touches: not batched"
    assert all(e == sorted(e, reverse=True) for e in events)  # newest first: prepended
