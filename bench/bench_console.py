"""Console benchmark: the work-history page of a site-month and the fleet page of 1,000 devices,
beside the `ccus report` / `ccus ops devices` path for the same figures, in the same run.

    .venv/bin/python bench/bench_console.py [--touches 1000000] [--samples 30] [--devices 1000]

The store is bench_sink's big store (SITES x 40 technicians x 12 months x 21 days, an entry and
an exit each; cached under $TMPDIR/ccus-bench/, built once: 10,080,000 touches with
--touches 10000000). The report path is what `ccus report work-history` does after opening
the store: query + shape + CSV. The page is an HTTP GET on loopback to a console served by
uvicorn in this process (a logged-in session): the whole round trip, so an upper bound of the
server time. The fleet: 1,000 retained state messages fed to the console's bridge; the
`ccus ops devices` path is ops.fleet.fleet() + render() over the same messages. On site now:
the page of a site-day, beside the store's on_site() (one primary-key range of work_history)
and the month's work history filtered in Python (what the page read before the store kept
each day's last entry); in the big store everyone has tapped out, so the list is empty and
the figures are the lookup's cost. Medians of
--samples random site-months (the first sample of each warms up and is dropped). One JSON
document; ratio = page / report; targets: ratio <= 1.5 and page < 200 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sink  # noqa: E402
import cbor2  # noqa: E402
import uvicorn  # noqa: E402

from broker.launcher import free_port  # noqa: E402
from cloud_sink.reports import output, shape  # noqa: E402
from cloud_sink.store import open_store  # noqa: E402
from console import auth, users  # noqa: E402
from console.app import Config, build_app  # noqa: E402
from console.live import Bridge  # noqa: E402
from ops import fleet  # noqa: E402


def serve(app: object) -> tuple[uvicorn.Server, threading.Thread, str]:
    """The console under uvicorn on a free loopback port, in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    return server, th, f"http://127.0.0.1:{port}"


def login(base: str, user: str, password: str) -> urllib.request.OpenerDirector:
    """A urllib opener holding a logged-in session (the login form's CSRF token included)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    token = re.search(r'name="csrf" value="([^"]+)"', opener.open(base + "/").read().decode())
    assert token, "no CSRF token on the login page"
    opener.open(base + "/login", urllib.parse.urlencode(
        {"csrf": token.group(1), "user": user, "password": password}).encode()).read()
    return opener


def median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--touches", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--devices", type=int, default=1000)
    a = ap.parse_args()
    path, built = bench_sink.cached_big_store(a.touches)
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    password = "bench-password-1"
    users.save(tmp / "users.toml", {"op": users.User("op", "operator",
                                                     auth.hash_password(password))})
    bridge = Bridge()
    now = int(time.time() * 1000)
    states = {}
    for i in range(a.devices):
        site = f"{13100000000000 + i // 10:014d}"
        msg = {"online": i % 17 != 0, "ts": now - (i % 400) * 1000, "role": "gate", "sw": "0.1.0",
               "lv": 3, "cv": 1, "backlog": i % 150, "oldest_ms": now - (i % 700) * 1000,
               "readers": {"entry": "ok" if i % 23 else "lost", "exit": "ok"},
               "tq": "synced" if i % 31 else "drifting", "disk": "ok" if i % 29 else "low"}
        topic = f"ccus/v1/{site}/gate-{i:04d}/state"
        states[topic] = cbor2.dumps(msg)
        bridge.feed(topic, states[topic], retain=True)
    app = build_app(Config(str(path), tmp / "users.toml", "bench-secret", secure_cookies=False),
                    bridge)
    server, th, base = serve(app)
    opener = login(base, "op", password)

    store = open_store(path)
    sites = sorted({d.site for d in store.work_history(None, bench_sink.MONTHS[-1])})[:50]
    rng = random.Random(7)
    rep, page, csv_t, rows = [], [], [], 0
    for i in range(a.samples + 1):
        site, month = rng.choice(sites), rng.choice(bench_sink.MONTHS)
        t0 = time.perf_counter()
        table = shape.work_history(store.work_history(site, month))
        text = output.to_csv(table)
        t1 = time.perf_counter()
        html = opener.open(f"{base}/sites/{site}/work-history?month={month}").read().decode()
        t2 = time.perf_counter()
        body = opener.open(f"{base}/sites/{site}/work-history.csv?month={month}").read()
        t3 = time.perf_counter()
        # the same figures: every report row is one filled cell of the page's grid
        assert html.count('data-date="') - len(shape.month_days(month)) == len(table)
        assert body.decode("utf-8-sig").count("\n") == len({r["technician"] for r in table}) + 1
        assert text.count("\n") == len(table) + 1
        if i:
            rep.append(t1 - t0)
            page.append(t2 - t1)
            csv_t.append(t3 - t2)
            rows = len(table)
    on_q, on_old, on_page = [], [], []
    for i in range(a.samples + 1):
        site, month = rng.choice(sites), rng.choice(bench_sink.MONTHS)
        day = rng.choice(bench_sink._days(month))
        t0 = time.perf_counter()
        now_in = store.on_site(site, day)
        t1 = time.perf_counter()
        old = [d for d in store.work_history(site, month) if d.work_day == day
               and d.first_in_ms is not None and (d.last_out_ms or -1) < d.first_in_ms]
        t2 = time.perf_counter()
        html = opener.open(f"{base}/sites/{site}/onsite?day={day}").read().decode()
        t3 = time.perf_counter()
        assert now_in == [] and old == [] and 'id="count">0<' in html
        if i:
            on_q.append(t1 - t0)
            on_old.append(t2 - t1)
            on_page.append(t3 - t2)
    fl_cli, fl_page = [], []
    for i in range(a.samples + 1):
        t0 = time.perf_counter()
        text = fleet.render(fleet.fleet(states, now), now)
        t1 = time.perf_counter()
        html = opener.open(base + "/fleet").read().decode()
        t2 = time.perf_counter()
        assert html.count("data-device=") == a.devices and text.count("\n") == a.devices
        if i:
            fl_cli.append(t1 - t0)
            fl_page.append(t2 - t1)
    store.close()
    server.should_exit = True
    th.join(5)
    wh_ratio = statistics.median(page) / statistics.median(rep)
    print(json.dumps({
        "store": str(path), "store_touches": a.touches, "built": built, "samples": a.samples,
        "work_history": {"rows_per_site_month": rows, "report_ms": median_ms(rep),
                         "page_ms": median_ms(page), "page_ms_max": round(max(page) * 1000, 2),
                         "csv_ms": median_ms(csv_t), "ratio": round(wh_ratio, 2)},
        "fleet": {"devices": a.devices, "ops_devices_ms": median_ms(fl_cli),
                  "page_ms": median_ms(fl_page),
                  "ratio": round(statistics.median(fl_page) / statistics.median(fl_cli), 2)},
        "on_site": {"store_on_site_ms": median_ms(on_q), "month_filtered_ms": median_ms(on_old),
                    "page_ms": median_ms(on_page)},
        "targets": {"ratio": 1.5, "page_ms": 200}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
