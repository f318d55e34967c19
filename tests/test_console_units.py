"""The console's pure parts: users file, scope table, rate limiter, page models, i18n, the
MQTT bridge's input, SSE framing. Hypothesis for the file format and the rate limiter."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sink_support import SITE, touch

from cloud_sink.model import WorkDay
from cloud_sink.reports import shape
from cloud_sink.workday import jst_ms
from console import ConsoleError, auth, i18n, scope, users, views
from console.app import sse
from console.live import Bridge
from protocol import topics
from protocol.touch import encode

ids = st.integers(10**13, 10**14 - 1).map(str)
names = st.from_regex(r"[A-Za-z0-9._@-]{1,64}", fullmatch=True)


@st.composite
def a_user(draw: st.DrawFn) -> users.User:
    role = draw(st.sampled_from(users.ROLES))
    sites = tuple(draw(st.lists(ids, min_size=1, max_size=3, unique=True)))
    return users.User(draw(names), role, "$argon2id$v=19$" + draw(st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)),
        sites, tuple(draw(st.lists(ids, min_size=1, max_size=2, unique=True))),
        tuple(draw(st.lists(ids, min_size=1, max_size=2, unique=True))))


@settings(max_examples=60, deadline=None)
@given(st.lists(a_user(), max_size=5, unique_by=lambda u: u.name))
def test_users_file_round_trips(tmp_path_factory: pytest.TempPathFactory,
                                people: list[users.User]) -> None:
    path = tmp_path_factory.mktemp("u") / "users.toml"
    users.save(path, {u.name: u for u in people})
    assert path.stat().st_mode & 0o777 == 0o600
    assert users.load(path) == {u.name: u for u in people}


def test_a_role_needs_its_scope_and_bad_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConsoleError, match="needs --scope site"):
        users.check(users.User("a", "site_manager", "h"))
    with pytest.raises(ConsoleError, match="contractor:ID"):
        users.check(users.User("a", "contractor", "h", sites=(SITE,)))
    with pytest.raises(ConsoleError, match="role"):
        users.check(users.User("a", "admin", "h"))
    with pytest.raises(ConsoleError, match="14-digit"):
        users.parse_scope(["site:123"])
    assert users.parse_scope([f"site:{SITE},center:{SITE}", f"site:{SITE}"]) == {
        "site": (SITE,), "contractor": (), "center": (SITE,)}
    bad = tmp_path / "u.toml"
    bad.write_text("[users.x]\nrole = 'operator'\n")
    with pytest.raises(ConsoleError, match="lacks"):
        users.load(bad)
    with pytest.raises(ConsoleError, match="no users file"):
        users.load(tmp_path / "none.toml")


def test_scope_table() -> None:
    op = users.User("op", "operator", "h")
    sm = users.User("sm", "site_manager", "h", sites=(SITE,))
    ct = users.User("ct", "contractor", "h", sites=(SITE,), contractors=("20000000000001",))
    tr = users.User("tr", "training", "h", centers=("27200000000001",))
    assert all(scope.may_open(op, p) for p in scope.PAGES)
    assert [p for p in scope.PAGES if scope.may_open(sm, p)] == [
        "fleet", "sites", "live", "onsite", "work_history", "days_worked", "technician"]
    assert scope.may_open(ct, "vending") and not scope.may_open(sm, "vending")
    assert scope.may_open(tr, "training") and not scope.may_open(tr, "work_history")
    assert not scope.may_open(op, "no-such-page")
    assert scope.may_site(sm, SITE) and not scope.may_site(sm, "13100000000002")
    assert scope.may_site(tr, "27200000000001") and not scope.may_site(tr, SITE)
    assert scope.may_contractor(ct, "20000000000001") and not scope.may_contractor(ct, "2" * 14)
    assert not scope.may_contractor(sm, "20000000000001")
    assert scope.may_center(tr, "27200000000001") and not scope.may_center(ct, "27200000000001")
    assert scope.visible_sites(sm, ["x", SITE]) == [SITE]
    assert scope.visible_sites(op, ["b", "a"]) == ["a", "b"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["fail", "clear", "check"]), st.sampled_from("ab"),
                          st.floats(0, 400)), max_size=40))
def test_rate_limiter_matches_a_model(ops: list[tuple[str, str, float]]) -> None:
    """The limiter against the plainest model: a key is locked when `limit` of its failures
    since its last clear lie within the window before now."""
    lim = auth.RateLimiter(limit=3, window_s=60.0)
    fails: dict[str, list[float]] = {"a": [], "b": []}
    now = 0.0
    for op, key, dt in ops:
        now += dt / 10
        if op == "fail":
            lim.fail(key, now)
            fails[key].append(now)
        elif op == "clear":
            lim.clear(key)
            fails[key] = []
        recent = [t for t in fails[key] if now - t < 60.0]
        assert lim.locked(key, now) == (len(recent) >= 3)
        if len(recent) >= 3:
            assert 0 < lim.retry_after(key, now) <= 60.0
            assert lim.retry_after(key, now) == pytest.approx(60.0 - (now - recent[-3]))


def test_passwords_and_tokens() -> None:
    h = auth.hash_password("correct horse battery")
    assert h.startswith("$argon2id$")
    assert auth.verify_password(h, "correct horse battery")
    assert not auth.verify_password(h, "wrong")
    assert not auth.verify_password(None, "anything")       # an unknown user
    assert not auth.verify_password("not-a-hash", "x")
    tok = auth.new_token()
    assert auth.token_ok(tok, tok) and not auth.token_ok(tok, tok[:-1] + "x")
    assert not auth.token_ok(None, None) and not auth.token_ok("", "")


def wd(tid: str, day: str, first: int | None, last: int | None, taps: int = 2) -> WorkDay:
    return WorkDay(tid, SITE, day, first, last, taps)


def test_the_grid_is_the_report_and_its_csv_the_grid() -> None:
    days = [wd("10000000000001", "2026-11-26", jst_ms(2026, 11, 26, 7, 32), jst_ms(2026, 11, 26, 17, 8)),
            wd("10000000000002", "2026-11-26", jst_ms(2026, 11, 26, 7, 34), None, 1),
            wd("10000000000002", "2026-11-27", None, jst_ms(2026, 11, 27, 17), 1),
            WorkDay("10000000000003", "13100000000002", "2026-11-26", 1, 2, 2)]  # another site
    g = views.grid(SITE, "2026-11", days)
    assert g.technicians == ["10000000000001", "10000000000002"]
    assert len(g.dates) == 30 and g.dates[25] == "2026-11-26"
    c = g.cells[1][25]
    assert c is not None and c.text == "07:34-?" and c.missing and c.exit_missing
    assert g.cells[1][26] is not None and g.cells[1][26].text == "?-17:00"
    assert g.cells[0][25] is not None and g.cells[0][25].text == "07:32-17:08"
    assert not g.cells[0][25].missing
    assert [g.days(0), g.days(1)] == [1, 2]
    rows = list(csv.reader(io.StringIO(g.csv())))
    assert rows[0] == ["technician", *g.dates, "days"]
    assert rows[2][26] == "07:34-?" and rows[2][-1] == "2"
    # the same figures as the report rows
    rep = shape.work_history([d for d in days if d.site == SITE])
    assert {(r["technician"], r["work_day"]) for r in rep} == {
        (t, g.dates[j]) for i, t in enumerate(g.technicians) for j, x in enumerate(g.cells[i]) if x}
    # the page's rows (built in Python, not Jinja2): one dated cell per report row, in its column
    html = views.grid_rows_html(g, "ja")
    import re
    assert re.findall(r'data-technician="(\d+)"', html) == g.technicians
    assert sorted(re.findall(r'data-date="([\d-]+)"[^>]*>([^<]+)</td>', html)) == sorted(
        (r["work_day"], f"{r['entry'] or '?'}-{r['exit'] or '?'}") for r in rep)
    assert 'class="miss" data-date="2026-11-27" title="入場 打刻なし / 退場 17:00"' in html
    assert html.count('<td class="num">2</td>') == 1 and html.count("<td></td>") == 60 - 3


def test_grid_rows_escape() -> None:
    g = views.Grid(SITE, "2026-11", ["2026-11-01"], ['<b>"x'], [[views.Cell("<i>", "", False, True)]])
    html = views.grid_rows_html(g, "en")
    assert "<b>" not in html and "<i>" not in html and "&lt;b&gt;&#34;x" in html
    assert "&lt;i&gt;-?" in html


def test_on_site_now() -> None:
    # the store's rows (technician, entry of the current stay), in any order: earliest first
    rows = [("4", jst_ms(2026, 11, 26, 13)), ("1", jst_ms(2026, 11, 26, 8)),
            ("2", jst_ms(2026, 11, 26, 8))]
    got = views.on_site(rows)
    assert [(r["technician"], r["entry"]) for r in got] == [("1", "08:00"), ("2", "08:00"),
                                                            ("4", "13:00")]


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000)),
                min_size=1, max_size=12), st.booleans())
def test_bars_fit_the_chart(vals: list[tuple[int, int, int]], stacked: bool) -> None:
    series = [[float(v[k]) for v in vals] for k in range(3)]
    c = views.bars([str(i) for i in range(len(vals))], series, stacked=stacked)
    for b in c["bars"]:
        assert b.h >= 0 and b.y >= -1e-9 and b.y + b.h <= c["height"] + 1e-9
        assert b.x >= 0 and b.x + b.w <= c["width"] + 1e-9
    tallest = max(sum(v) if stacked else max(v) for v in vals)
    if tallest:
        assert c["top"] == tallest
        assert min(b.y for b in c["bars"]) == pytest.approx(0.0)


def test_i18n() -> None:
    assert i18n.fmt_date("2026-11-26", "ja") == "2026年11月26日"
    assert i18n.fmt_date("2026-11-26", "en") == "2026-11-26"
    assert i18n.fmt_month("2026-11", "ja") == "2026年11月"
    assert i18n.fmt_day_short("2026-11-06", "ja") == "6日"
    assert i18n.fmt_date("garbage", "ja") == "garbage"
    assert i18n.reason("unknown_card", "ja") == "未登録のカード"
    assert i18n.reason("no_such", "ja") == "no_such"
    assert i18n.passage("passed", "ja") == "通過" and i18n.passage("x", "en") == "x"
    row = views.touch_row(touch(5, facts={"passage": "passed", "tap": 4}))
    assert (row["passage"], row["tap"], row["direction"]) == ("passed", 4, "in")
    assert i18n.t("fleet", "en") == "Fleet" and i18n.t("fleet", "ja") == "端末一覧"


def test_every_reason_code_has_words() -> None:
    from protocol.reasons import Reason

    assert {r.value for r in Reason} <= set(i18n.REASONS)


def test_sse_framing() -> None:
    assert sse("touch", "<tr>\n<td>1</td>\n</tr>\n") == \
        "event: touch\ndata: <tr>\ndata: <td>1</td>\ndata: </tr>\n\n"
    assert sse("x", "") == "event: x\ndata: \n\n"


def test_the_bridge_keeps_state_and_routes_touches_by_site() -> None:
    async def main() -> None:
        b = Bridge()
        fleet_l, here, there = b.listen(None), b.listen(SITE), b.listen("13100000000002")
        st_topic = topics.state(SITE, "gate-01")
        b.feed(st_topic, cbor2.dumps({"online": True}), retain=True)
        b.feed(topics.touch(SITE, "gate-01"), encode(touch(1)))
        b.feed(topics.touch(SITE, "gate-01"), encode(touch(1)))                 # sent again: once
        b.feed(topics.touch(SITE, "gate-01"), encode(touch(2)), retain=True)   # ignored
        b.feed(topics.touch(SITE, "gate-01"), b"\xff garbage")                  # ignored
        b.feed(topics.touch("13100000000002", "gate-01"), encode(touch(3)))    # site mismatch
        b.feed(st_topic, b"")                                                   # cleared
        await asyncio.sleep(0.01)
        assert b.snapshot() == {}
        assert [fleet_l.queue.get_nowait()[0] for _ in range(2)] == ["fleet", "fleet"]
        kind, t = here.queue.get_nowait()
        assert (kind, t.seq) == ("touch", 1) and here.queue.empty() and there.queue.empty()
        b.unlisten(here)
        b.feed(topics.touch(SITE, "gate-01"), encode(touch(4)))
        await asyncio.sleep(0.01)
        assert here.queue.empty()
    asyncio.run(main())


def test_a_full_queue_counts_what_it_drops_and_drain_batches() -> None:
    from console import live

    async def main() -> None:
        b = Bridge()
        here = b.listen(SITE)
        for seq in range(1, live.QUEUE_MAX + 6):
            b.feed(topics.touch(SITE, "gate-01"), encode(touch(seq)))
        await asyncio.sleep(0.05)
        assert here.queue.full() and here.dropped == 5
        first = here.queue.get_nowait()
        batch = live.drain(here.queue, first, 300)
        assert [t.seq for _k, t in batch] == list(range(1, 301))      # oldest first, capped
        rest = live.drain(here.queue, here.queue.get_nowait(), 10_000)
        assert len(rest) == live.QUEUE_MAX - 300 and here.queue.empty()
    asyncio.run(main())


def test_the_bridge_keeps_retained_config_pushes_and_acks() -> None:
    b = Bridge()
    push, ack = topics.site_config(SITE), topics.config_ack(SITE, "gate-01")
    b.feed(push, b"envelope", retain=True)
    b.feed(ack, cbor2.dumps({"version": 1}), retain=True)
    b.feed(topics.config(SITE, "gate-02"), b"e2", retain=True)
    assert b.config_snapshot() == ({push: b"envelope", topics.config(SITE, "gate-02"): b"e2"},
                                   {ack: cbor2.dumps({"version": 1})})
    assert b.snapshot() == {}                        # not taken for a device state
    b.feed(push, b"", retain=True)
    b.feed(ack, b"", retain=True)
    assert b.config_snapshot() == ({topics.config(SITE, "gate-02"): b"e2"}, {})


def test_config_rows_pair_each_device_with_its_push_and_ack() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge import config_apply

    key = Ed25519PrivateKey.generate()
    issued = jst_ms(2026, 11, 26, 9)

    def env(dev: str, version: int) -> bytes:
        return config_apply.encode(key, version=version, site=SITE, dev=dev, body={},
                                   issued_ms=issued)

    def ack(version: int | None, result: str = "applied", **kw: object) -> bytes:
        return cbor2.dumps({"v": 1, "site": SITE, "dev": "x", "version": version,
                            "result": result, "reason": kw.get("reason", ""), "cv": 1,
                            "ts": kw.get("ts", issued + 5000)})
    configs = {topics.site_config(SITE): env(config_apply.SITE_LEVEL, 20),
               topics.config(SITE, "gate-01"): env("gate-01", 30),     # newer than the site's
               topics.config(SITE, "gate-02"): env("gate-02", 10),     # older: the site's applies
               topics.config(SITE, "gate-05"): env("gate-05", 40),
               topics.config(SITE, "gate-06"): env("gate-06", 40)}
    acks = {topics.config_ack(SITE, "gate-01"): ack(30),
            topics.config_ack(SITE, "gate-02"): ack(20, "refused", reason="protected"),
            topics.config_ack(SITE, "gate-03"): ack(10),              # an older version
            topics.config_ack(SITE, "gate-09"): b"\xff",             # unreadable
            # a bad signature: the ack names no version; after the push it answers it
            topics.config_ack(SITE, "gate-05"): ack(None, "refused", reason="bad_signature"),
            topics.config_ack(SITE, "gate-06"): ack(None, "refused", ts=issued - 1)}
    rows = views.config_rows(configs, acks, [(SITE, "gate-04"), ("13100000000002", "gate-05")])
    by = {r["device"]: r for r in rows}
    assert set(by) == {"gate-01", "gate-02", "gate-03", "gate-04", "gate-05", "gate-06",
                       "gate-09"}
    assert (by["gate-05"]["status"], by["gate-05"]["reason"]) == ("refused", "bad_signature")
    assert by["gate-06"]["status"] == "waiting"                      # an older answer
    assert (by["gate-01"]["scope"], by["gate-01"]["version"], by["gate-01"]["status"]) == (
        "device", 30, "applied")
    assert (by["gate-02"]["scope"], by["gate-02"]["version"], by["gate-02"]["status"],
            by["gate-02"]["reason"]) == ("site", 20, "refused", "protected")
    assert (by["gate-03"]["acked"], by["gate-03"]["status"]) == (10, "waiting")
    assert (by["gate-04"]["acked"], by["gate-04"]["status"]) == ("-", "waiting")  # the fleet's
    assert by["gate-09"]["status"] == "waiting" and by["gate-01"]["issued"] == "09:00"
    assert [r["status"] for r in rows][0] == "refused"               # problems first


def test_fleet_rows_escape_and_show_problems() -> None:
    from ops import fleet

    now = jst_ms(2026, 11, 26, 12)
    msgs = {topics.state(SITE, "gate-01"): cbor2.dumps(
        {"online": True, "ts": now, "sw": "<script>", "lv": 1, "cv": 2, "backlog": 500,
         "readers": {"entry": "lost", "<b>": "ok"}, "tq": "synced",
         "gate": {"board": "lost"}, "disk": "low"}),
        topics.state(SITE, "gate-02"): cbor2.dumps({"online": False, "ts": now - 60_000})}
    html = views.fleet_rows_html(fleet.fleet(msgs, now), now, "ja")
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;:ok" in html
    assert html.count("<tr ") == 2 and "backlog 500" in html and "reader entry lost" in html
    assert "オフライン" in html and "badc" in html
    assert "<td>lost</td>" in html and "gate board lost" in html   # the board's health
    assert "<td>low</td>" in html and "disk low" in html            # the outbox's disk


def test_manifest_rows_read_the_signed_envelope_or_say_what_they_cannot() -> None:
    body = cbor2.dumps({"kind": "snapshot", "name": "ccus-demo", "version": 3,
                        "issued_ms": jst_ms(2026, 11, 26, 6), "records": 12})
    env = cbor2.dumps({"v": 1, "kid": b"k", "sig": b"s", "body": body})
    row = views.manifest_row("ccus/v1/list/ccus-demo/snapshot/manifest", env)
    assert (row["name"], row["version"], row["records"], row["issued"]) == (
        "ccus-demo", 3, 12, "2026-11-26 06:00")
    bad = views.manifest_row("t", b"\xff\x00")
    assert (bad["name"], bad["version"], bad["issued"]) == ("?", "?", "?")


def test_ago_in_words() -> None:
    now = 10_000_000
    assert views.ago(None, now) == "-"
    assert views.ago(now - 45_000, now) == "45秒" and views.ago(now - 45_000, now, "en") == "45s"
    assert views.ago(now - 180_000, now) == "3分" and views.ago(now - 7_300_000, now) == "2時間"
    assert views.ago(now + 5_000, now) == "0秒"     # a device clock ahead: not negative


def test_console_refuses_a_missing_store_or_users_file_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cloud_sink.store import open_store

    users.save(tmp_path / "u.toml", {"op": users.User("op", "operator", "h")})
    open_store(tmp_path / "real.sqlite").close()
    for store, extra, says in (
            ("typo.sqlite", ["--users", str(tmp_path / "u.toml")], "no store at"),
            ("real.sqlite", ["--users", str(tmp_path / "none.toml")], "no users file"),
            ("real.sqlite", ["--users", str(tmp_path / "u.toml")], "connection refused")):
        out = subprocess.run([sys.executable, "-m", "ccus.cli", "console", "--store",
                              str(tmp_path / store), *extra, "--broker", "127.0.0.1:1"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "typo.sqlite").exists()    # a typo never becomes an empty store
