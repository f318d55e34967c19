"""Live page in a real browser: 1,000 touches/s for --seconds while Debian's headless chromium
shows /sites/SITE/live; tap -> row in the DOM (and -> the next frame) p50/p99/max, what was lost.

    .venv/bin/python bench/bench_console_chromium.py [--rate 1000] [--seconds 20] [--devices 100]

As bench_console_live.py (bench_sink.payloads() published at QoS 1 in 10 ms slices through a
private Mosquitto; the console's Bridge and the app under uvicorn in this process), but the
stream is read by chromium (Playwright, executable_path=/usr/bin/chromium, logged in through
the form) and htmx swaps the rows in as it does for an operator. A MutationObserver on the
table body records, for each row added, the page's wall clock (performance.timeOrigin +
performance.now()) when the swap's mutation is delivered, and the time of the next
requestAnimationFrame callback (the frame that draws it: layout and paint follow it). The
page's clock is calibrated against this process's time.time() by bracketing an evaluate()
(the offset and its uncertainty are printed). Latency = page time - offset - publish call.
The renderer's main-thread seconds (task, script, layout, style) over the run come from the
DevTools Performance domain (the wall time of tasks: inflated when the machine is busy), the
CPU seconds of chromium's processes by kind from SystemInfo.getProcessInfo (not inflated).
A row counts once, when first added (console.js then trims the
table to its newest 500 rows). Lost = published touches never added to the DOM;
'dropped_notice' is what the page says the server skipped for it (a full per-browser queue).
One JSON document; target: p99 < 1 s, none lost.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_console  # noqa: E402
import bench_console_live  # noqa: E402
import bench_sink  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402
from cloud_sink.store import open_store  # noqa: E402
from console import auth, users  # noqa: E402
from console.app import Config, build_app  # noqa: E402
from console.live import Bridge  # noqa: E402
from ops.mqttc import BrokerOpts  # noqa: E402
from protocol.touch import decode  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ROW = re.compile(r'data-seq="(\d+)" data-device="([^"]+)"')
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-renderer-backgrounding", "--disable-background-timer-throttling"]

# installed by evaluate() (DevTools, not a page script: the console's CSP allows none inline)
OBSERVE = """() => {
  const rows = window.__rows = [];
  let pending = [], raf = 0;
  const clock = () => performance.timeOrigin + performance.now();
  new MutationObserver(muts => {
    const t = clock();
    for (const m of muts) for (const n of m.addedNodes) {
      if (n.nodeType === 1 && n.dataset && n.dataset.seq) {
        rows.push([n.dataset.device, +n.dataset.seq, t, 0]);
        pending.push(rows.length - 1);
      }
    }
    if (!raf) raf = requestAnimationFrame(() => {
      const f = clock();
      for (const i of pending) rows[i][3] = f;
      pending = []; raf = 0;
    });
  }).observe(document.getElementById("touches"), {childList: true});
}"""


def pct(xs: list[float], p: float) -> float:
    return round(sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000, 1) if xs else -1.0


def figures(xs: list[float]) -> dict[str, float]:
    return {"p50": pct(xs, 0.5), "p99": pct(xs, 0.99),
            "max": round(max(xs) * 1000, 1) if xs else -1.0,
            "mean": round(statistics.fmean(xs) * 1000, 1) if xs else -1.0}


KEPT = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration",
        "LayoutCount", "RecalcStyleCount", "JSHeapUsedSize")


def metrics(cdp: object) -> dict[str, float]:
    got = cdp.send("Performance.getMetrics")["metrics"]  # type: ignore[attr-defined]
    return {m["name"]: m["value"] for m in got if m["name"] in KEPT}


def cpu_by_kind(session: object) -> dict[str, float]:
    """CPU seconds used so far by chromium's processes, per kind (browser, renderer, gpu...):
    unlike the Performance durations (wall time of tasks) they do not grow when the machine is
    busy with other work."""
    info = session.send("SystemInfo.getProcessInfo")["processInfo"]  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for p in info:
        out[p["type"]] = out.get(p["type"], 0.0) + float(p["cpuTime"])
    return out


def top_self_times(profile: dict, k: int = 12) -> list[tuple[str, float]]:  # type: ignore[type-arg]
    """The profile's k largest self times (ms) by function and script, from its samples."""
    nodes = {nd["id"]: nd for nd in profile["nodes"]}
    deltas = profile.get("timeDeltas", [])
    by: dict[str, float] = {}
    for sid, dt_us in zip(profile.get("samples", []), deltas[1:] + [0], strict=False):
        cf = nodes[sid]["callFrame"]
        where = f'{cf.get("functionName") or "(anonymous)"} {cf.get("url", "").rsplit("/", 1)[-1]}'
        by[where.strip()] = by.get(where.strip(), 0.0) + dt_us / 1000
    return [(w, round(ms, 1)) for w, ms in sorted(by.items(), key=lambda kv: -kv[1])[:k]]


def calibrate(page: object, rounds: int = 20) -> tuple[float, float]:
    """(page clock - time.time() in s, half the tightest round trip in s)."""
    best = (0.0, 1e9)
    for _ in range(rounds):
        a = time.time()
        js = page.evaluate("() => performance.timeOrigin + performance.now()") / 1000  # type: ignore[attr-defined]
        b = time.time()
        if (b - a) / 2 < best[1]:
            best = (js - (a + b) / 2, (b - a) / 2)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--profile", action="store_true",
                    help="sample the page's JavaScript (DevTools Profiler) and print the top self times")
    ap.add_argument("--no-baseline", action="store_true",
                    help="no plain-HTTP reader of the same stream beside the browser")
    a = ap.parse_args()
    n = int(a.rate * a.seconds)
    msgs = bench_sink.payloads(n, a.devices)
    keys = [(t.device, t.seq) for t in (decode(p) for _, p in msgs)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-chromium-"))
    open_store(tmp / "store.sqlite").close()          # the console reads a store; empty here
    password = "bench-password-1"
    users.save(tmp / "users.toml", {"op": users.User("op", "operator",
                                                     auth.hash_password(password))})
    with PrivateBroker(tmp / "broker") as broker, sync_playwright() as pw:
        bridge = Bridge()
        bridge.start(BrokerOpts(port=broker.port), f"console-bench-{uuid.uuid4().hex[:6]}")
        app = build_app(Config(str(tmp / "store.sqlite"), tmp / "users.toml", "bench-secret",
                               secure_cookies=False), bridge)
        server, th, base = bench_console.serve(app)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/")
        page.fill("input[name=user]", "op")
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        with page.expect_response(lambda r: "/live/events" in r.url):
            page.goto(f"{base}/sites/{bench_sink.SITE}/live")
        page.evaluate(OBSERVE)
        offset, uncertainty = calibrate(page)
        # the baseline in the same run: the same stream read by a plain HTTP client (as
        # bench_console_live.py does), so the browser's share of the latency shows
        arrived: dict[tuple[str, int], float] = {}
        if not a.no_baseline:
            stream = bench_console.login(base, "op", password).open(
                f"{base}/sites/{bench_sink.SITE}/live/events", timeout=60)

            def read() -> None:
                for raw in stream:
                    now = time.time()
                    for m in ROW.finditer(raw.decode()):
                        arrived.setdefault((m.group(2), int(m.group(1))), now)
            threading.Thread(target=read, daemon=True).start()
        time.sleep(0.5)                                 # the stream's listener is registered
        # the renderer's main-thread time by kind (DevTools Performance domain), over the run
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        m0 = metrics(cdp)
        if a.profile:
            cdp.send("Profiler.enable")
            cdp.send("Profiler.setSamplingInterval", {"interval": 500})
            cdp.send("Profiler.start")
        sysinfo = browser.new_browser_cdp_session()
        c0, py0 = cpu_by_kind(sysinfo), time.process_time()
        # wall clock: compared with the page's (calibrated) clock
        t0 = time.monotonic()
        pub, sent, pub_s = bench_console_live.paced_publish(broker.port, msgs, keys, a.rate,
                                                            time.time)
        # until every row is in, or nothing new came for 10 s (a busy machine delays, not loses)
        last, still = -1, time.monotonic()
        while (got := page.evaluate("() => window.__rows.length")) < n \
                and time.monotonic() - still < 10:
            if got != last:
                last, still = got, time.monotonic()
            time.sleep(0.2)
        time.sleep(0.3)                                 # the last frame's callback
        m1 = metrics(cdp)
        c1, py1 = cpu_by_kind(sysinfo), time.process_time()
        hot = top_self_times(cdp.send("Profiler.stop")["profile"]) if a.profile else None
        run_s = time.monotonic() - t0
        rows = page.evaluate("() => window.__rows")
        kept = page.locator("#touches tr").count()
        notice = page.locator("#dropped").inner_text()
        offset2, _ = calibrate(page, 5)
        pub.loop_stop()
        pub.disconnect()
        browser.close()
        server.should_exit = True
        bridge.stop()
        th.join(5)
    seen: dict[tuple[str, int], tuple[float, float]] = {}
    for dev, seq, t_dom, t_frame in rows:
        seen.setdefault((dev, seq), (t_dom / 1000 - offset, t_frame / 1000 - offset if t_frame else 0.0))
    dom = [seen[k][0] - sent[k] for k in sent if k in seen]
    frame = [seen[k][1] - sent[k] for k in sent if k in seen and seen[k][1]]
    http = [arrived[k] - sent[k] for k in sent if k in arrived]
    # p50 of tap -> DOM per second of publishing: growing means the page falls behind
    t_first = min(sent.values())
    per_s: dict[int, list[float]] = {}
    for k, ts in sent.items():
        if k in seen:
            per_s.setdefault(int(ts - t_first), []).append(seen[k][0] - ts)
    print(json.dumps({
        "rate": a.rate, "seconds": a.seconds, "published": n,
        "publish_s": round(pub_s, 2), "achieved_rate": round(n / pub_s),
        "bridge_seen": bridge.touches_seen, "in_dom": len(dom), "lost": n - len(dom),
        "rows_added": len(rows), "rows_kept": kept, "dropped_notice": notice,
        "tap_to_dom_ms": figures(dom), "tap_to_next_frame_ms": figures(frame),
        "dom_p50_ms_per_second": [pct(per_s[i], 0.5) for i in sorted(per_s)],
        "baseline_http_client": {"on_stream": len(http), "lost": n - len(http),
                                 "tap_to_stream_ms": figures(http)} if not a.no_baseline else None,
        "renderer": {"wall_s": round(run_s, 2),
                     **{k: round(m1.get(k, 0) - m0.get(k, 0), 2) for k in KEPT[:-1]},
                     "busy_fraction": round((m1.get("TaskDuration", 0) - m0.get("TaskDuration", 0))
                                            / run_s, 2),
                     "js_heap_mb": round(m1.get("JSHeapUsedSize", 0) / 1e6, 1)},
        "cpu_s": {**{f"chromium_{k}": round(c1.get(k, 0) - c0.get(k, 0), 2) for k in sorted(c1)},
                  "this_process": round(py1 - py0, 2),
                  "note": "server, bridge, publisher and Playwright's client in this process"},
        "profile_top_self_ms": hot,
        "clock": {"offset_ms": round(offset * 1000, 3), "uncertainty_ms": round(uncertainty * 1000, 3),
                  "drift_ms": round((offset2 - offset) * 1000, 3)},
        "browser": CHROMIUM, "target": {"p99_ms": 1000, "lost": 0}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
