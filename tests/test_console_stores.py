"""The console reads SQLite and PostgreSQL through the same store interface as `ccus report`:
the same touches in both give the same work-history grid CSV and days-worked CSV, equal to the
report's own rows. The app is served by uvicorn on loopback; requests are plain HTTP."""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
import uvicorn
from sink_support import SITE, fresh_store, touch

from broker.launcher import free_port
from cloud_sink import report_cli
from cloud_sink.registry import Technician
from cloud_sink.report_cli import COLUMNS
from cloud_sink.reports import output, shape
from cloud_sink.workday import jst_ms
from console import auth, users
from console.app import Config, build_app
from console.live import Bridge

PASSWORD = "store-test-password"


CENTER = "27200000000001"


def day_touches() -> list:
    out, seq = [], 0
    for who in range(1, 4):   # a training center: three persons, two courses
        out.append(touch(100 + who, device="train-01", site=CENTER, role="training", who=who,
                         ts=jst_ms(2026, 11, 20, 9, who), facts={"course": f"C{who % 2}"}))
    for who in range(1, 6):
        for day in (24, 25, 26):
            seq += 1
            out.append(touch(seq, who=who, dir="in", ts=jst_ms(2026, 11, day, 7, who)))
            if who != 3 or day != 26:   # technician 3 forgot to tap out on the 26th
                seq += 1
                out.append(touch(seq, who=who, dir="out", ts=jst_ms(2026, 11, day, 17, who)))
    return out


@contextmanager
def serving(store_url: str, tmp: Path,
            bridge: Bridge | None = None) -> Iterator[urllib.request.OpenerDirector]:
    users.save(tmp / "users.toml", {"op": users.User("op", "operator",
                                                     auth.hash_password(PASSWORD))})
    app = build_app(Config(store_url, tmp / "users.toml", "test-secret", secure_cookies=False),
                    bridge or Bridge())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    m = re.search(r'name="csrf" value="([^"]+)"', opener.open(base + "/").read().decode())
    assert m
    opener.open(base + "/login", urllib.parse.urlencode(
        {"csrf": m.group(1), "user": "op", "password": PASSWORD}).encode()).read()
    opener.base = base  # type: ignore[attr-defined]
    try:
        yield opener
    finally:
        server.should_exit = True
        th.join(10)


@pytest.fixture(scope="module")
def pg(pg_url: str) -> str:
    return pg_url


def test_sqlite_and_postgresql_pages_agree_with_the_report(tmp_path: Path, pg: str) -> None:
    got = {}
    for kind in ("sqlite", "postgresql"):
        with fresh_store(kind, tmp_path, pg) as store:
            store.ingest(day_touches(), now_ms=jst_ms(2026, 11, 30, 12))
            store.import_technicians([Technician("10000000000003", "20000000000009", "山田 太郎")])
            # technician 5 tapped out at 17:05 on the 26th and came back in at 18:00: on site
            store.ingest([touch(99, who=5, dir="in", ts=jst_ms(2026, 11, 26, 18))],
                         now_ms=jst_ms(2026, 11, 30, 12))
            url = store.url
            want_days = output.to_csv(shape.days_worked(store.days_worked(SITE, "2026-11")),
                                      COLUMNS["days-worked"])
            rows = shape.work_history(store.work_history(SITE, "2026-11"))
        (tmp_path / kind).mkdir()
        with serving(url, tmp_path / kind) as web:
            b = web.base  # type: ignore[attr-defined]
            grid = web.open(f"{b}/sites/{SITE}/work-history.csv?month=2026-11").read()
            days = web.open(f"{b}/days-worked.csv?month=2026-11&site={SITE}").read()
            # on site at the end of the 26th: technician 3 (no exit), by name and employer, and
            # technician 5, back in since 18:00 (the store's last passage, not the work history)
            onsite = web.open(f"{b}/sites/{SITE}/onsite?day=2026-11-26").read().decode()
            assert 'id="count">2<' in onsite and "山田 太郎" in onsite and "20000000000009" in onsite
            assert re.findall(r"<td>(\d{14})</td>.*?<td>(\d\d:\d\d)</td>", onsite) == [
                ("10000000000003", "07:03"), ("10000000000005", "18:00")]
            for page, argv in ((f"/training.csv?month=2026-11&center={CENTER}",
                                ["training-monthly", "--month", "2026-11", "--site", CENTER]),
                               ("/training-courses.csv", ["training-courses"])):
                out = tmp_path / f"{kind}-{argv[0]}.csv"
                assert report_cli.main(["report", *argv[:1], "--store", url, *argv[1:], "--out",
                                        str(out)]) == 0
                want = out.read_text(encoding="utf-8")
                assert "C1" in want or "27200000000001" in want
                assert web.open(b + page).read().decode("utf-8-sig") == want
        assert days.decode("utf-8-sig") == want_days
        text = grid.decode("utf-8-sig")
        assert len(rows) == 15 and text.count("-?") == 1          # the one missing exit
        for r in rows:
            assert f"{r['entry'] or '?'}-{r['exit'] or '?'}" in text
        got[kind] = (grid, days)
    assert got["sqlite"] == got["postgresql"]
