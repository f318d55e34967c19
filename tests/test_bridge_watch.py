"""The site bridge watchdog's decision (broker/bridge_watch.py), as properties over random event
streams, and its CLI's refusals (broker/watchdog_cli.py)."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.bridge_watch import BridgeWatch, WatchConfig
from broker.bridge_watchdog import parse_hostports, state_topic

ROOT = Path(__file__).resolve().parents[1]
CFG = WatchConfig(limit_s=15.0, backoff_s=30.0, backoff_max_s=300.0)

# one event: (seconds after the previous one, what); "tick" asks for a decision
kinds = st.sampled_from(["up", "down", "touch", "ack", "lost", "tick", "tick", "tick"])
events = st.lists(st.tuples(st.floats(0, 20, allow_nan=False), kinds), max_size=80)


def play(evs: list[tuple[float, str]], reachable: bool = True, cfg: WatchConfig = CFG,
         on_restart: Callable[[BridgeWatch, float], None] | None = None,
         ) -> tuple[BridgeWatch, list[tuple[float, str]]]:
    """Feed the events; restart whenever decide says so (`on_restart(watch, now)` first sees
    the watch as it decided). (watch, [(time, why) of restarts])."""
    w, now, restarts = BridgeWatch(cfg), 0.0, []
    for dt, kind in evs:
        now += dt
        if kind == "tick":
            why = w.due(now)
            if w.decide(now, reachable):
                if on_restart is not None:
                    on_restart(w, now)
                restarts.append((now, why))
                w.restarted(now)
        elif kind in ("up", "down"):
            w.state(kind == "up", now)
        elif kind == "lost":
            w.lost()
        else:
            getattr(w, kind)(now)
    return w, restarts


@given(events)
def test_no_restart_while_no_cloud_node_answers(evs: list[tuple[float, str]]) -> None:
    assert play(evs, reachable=False)[1] == []


@given(events)
def test_restarts_are_at_least_the_backoff_apart(evs: list[tuple[float, str]]) -> None:
    times = [t for t, _ in play(evs)[1]]
    assert all(b - a >= CFG.backoff_s for a, b in zip(times, times[1:], strict=False))


@given(events)
def test_every_restart_names_why_and_comes_after_the_limit(evs: list[tuple[float, str]]) -> None:
    def check(w: BridgeWatch, now: float) -> None:
        assert w.due(now)
        # stuck for longer than the limit: down since, or a touch unanswered since
        since = w.down_since if w.up is False else w.unanswered_since
        assert since is not None and now - since > CFG.limit_s
    play(evs, on_restart=check)


@given(st.lists(st.tuples(st.floats(0, 7, allow_nan=False),
                          st.sampled_from(["touch", "tick", "up"])), max_size=60))
def test_a_bridge_whose_acks_keep_coming_is_never_restarted(evs: list[tuple[float, str]]) -> None:
    # every touch is answered within the limit (an ack right after each event), state up
    flowing = [(0.0, "up")]
    for dt, kind in evs:
        flowing += [(dt, kind), (0.0, "ack")]
    assert play(flowing)[1] == []


@given(st.floats(0, 100, allow_nan=False), st.floats(0.1, 1.0), st.sampled_from(["down", "touch"]))
@settings(max_examples=50)
def test_a_stuck_bridge_is_restarted_soon_after_the_limit(start: float, step: float,
                                                           how: str) -> None:
    evs = [(start, "up")]
    evs.append((0.0, "down") if how == "down" else (0.0, "touch"))
    evs += [(step, "tick")] * int((CFG.limit_s + 2) / step)
    restarts = play(evs)[1]
    assert len(restarts) == 1
    assert CFG.limit_s < restarts[0][0] - start <= CFG.limit_s + step + 1e-6
    assert ("down" in restarts[0][1]) == (how == "down")


def test_nothing_known_is_not_down_and_the_backoff_doubles_until_acks_come_back() -> None:
    w = BridgeWatch(CFG)
    assert w.due(1000.0) == ""                 # no state yet: nothing due
    w.state(False, 0.0)
    w.lost()                                   # the site broker went away: unknown again
    assert w.due(100.0) == ""
    w.state(False, 100.0)
    assert w.due(115.0) == "" and w.due(116.0).startswith("bridge down for 16s")
    gaps = []
    now = 116.0
    for _ in range(6):                         # restarts that never bring the bridge back
        assert w.decide(now, True)
        w.restarted(now)
        gaps.append(w.backoff)
        now += w.backoff
        assert w.due(now)
    assert gaps == [30, 60, 120, 240, 300, 300]
    w.ack(now)                                 # it flows again: the next wait is the base one
    w.restarted(now)
    assert w.backoff == CFG.backoff_s


def test_the_config_and_the_cloud_list_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        WatchConfig(limit_s=0)
    with pytest.raises(ValueError):
        WatchConfig(backoff_s=60, backoff_max_s=30)
    assert parse_hostports("a:1 b:2,c:3") == [("a", 1), ("b", 2), ("c", 3)]
    with pytest.raises(ValueError, match="'b' is not HOST:PORT"):
        parse_hostports("a:1 b")
    assert state_topic("bridge-1") == "$SYS/broker/connection/bridge-1/state"


def _ccus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccus.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_site_watchdog_cli_says_in_one_line_what_is_wrong() -> None:
    r = _ccus("site-watchdog", "--site", "123", "--cloud", "127.0.0.1:1", "--restart", "true")
    assert r.returncode == 2 and "--site" in r.stderr and "Traceback" not in r.stderr
    r = _ccus("site-watchdog", "--site", "13100000000001", "--cloud", "nowhere",
              "--restart", "true")
    assert r.returncode == 2 and "--cloud" in r.stderr and len(r.stderr.splitlines()) == 1
