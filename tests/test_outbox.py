"""The outbox: durable before the answer, seq never reused, forgotten only by delete_upto, and
the disk-full policy (reserve, emergency ring, lost count) on a real, small, full filesystem."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.outbox import Outbox

ROOT = Path(__file__).resolve().parents[1]


def payload(i: int) -> bytes:
    return f"touch-{i:08d}|".encode() + bytes(180)


def test_append_is_committed_and_synchronous_full(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", reserve_bytes=0)
    assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    seq = ob.append(lambda s: payload(s), created_ms=5)
    # another connection sees it at once: committed, not merely inside a transaction
    other = sqlite3.connect(tmp_path / "o.sqlite")
    assert other.execute("SELECT seq, payload FROM outbox").fetchall() == [(1, payload(1))]
    assert seq == 1
    other.close()
    ob.close()


def test_seq_never_reused_after_delete_and_reopen(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", reserve_bytes=0)
    seqs = [ob.append(payload, created_ms=i) for i in range(10)]
    assert seqs == list(range(1, 11))
    assert ob.delete_upto(10) == 10
    assert ob.depth() == 0
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", reserve_bytes=0)
    assert ob.next_seq() == 11
    assert ob.append(payload, created_ms=0) == 11
    ob.close()


def test_delete_upto_forgets_only_the_covered_prefix(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", reserve_bytes=0)
    for i in range(20):
        ob.append(payload, created_ms=1000 + i)
    assert ob.delete_upto(7) == 7
    assert [s for s, _ in ob.pending(0, 100)] == list(range(8, 21))
    assert ob.oldest_ms() == 1007
    assert [s for s, _ in ob.pending(15, 3)] == [16, 17, 18]
    ob.close()


CHILD = """
import sys
sys.path.insert(0, {root!r})
from edge.outbox import Outbox
ob = Outbox({path!r}, reserve_bytes=0)
while True:
    seq = ob.append(lambda s: b"x" * 150, created_ms=0)
    print(seq, flush=True)  # "the person is answered" only after append returned
"""


def test_kill_9_loses_no_answered_touch(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite")
    answered = 0
    for round_ in range(3):
        p = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), path=path)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout
        time.sleep(0.3 + 0.2 * round_)
        p.kill()
        out = p.communicate()[0].split()
        if out:
            answered = max(answered, int(out[-1]))
        db = sqlite3.connect(path)
        try:
            stored = [r[0] for r in db.execute("SELECT seq FROM outbox ORDER BY seq")]
        except sqlite3.OperationalError:  # killed before its schema was committed (slow start)
            stored = []
        db.close()
        assert stored == list(range(1, len(stored) + 1))  # no hole, no reuse
        assert len(stored) >= answered
    assert answered > 0, "no round answered a touch before its kill"


# -- disk full --------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the filesystem is full."""
    filler = folder / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        while True:
            f.write(b"\xff" * 4096)
    return filler


def test_disk_full_on_a_real_small_filesystem(small_fs: Path) -> None:
    ob = Outbox(small_fs / "o.sqlite", reserve_bytes=512 * 1024, low_water_bytes=1600 * 1024,
                ring_max=50)
    assert ob.reserve_path.exists()
    made = 0
    for _ in range(20):
        assert ob.append(lambda s: payload(s), created_ms=made) is not None
        made += 1
    assert ob.disk_state() == "low"  # 2 MiB in all, the reserve taken: under 1.9 MiB free
    filler = fill(small_fs)
    # the disk is full: the reserve is given up and touches stay durable for a while
    states = []
    results = []
    for _ in range(20_000):
        r = ob.append(lambda s: payload(s), created_ms=made)
        made += 1
        results.append(r)
        states.append(ob.disk_state())
        if r is None and ob.ring_depth >= 10:
            break
    assert ob.reserve_released and not ob.reserve_path.exists()
    assert "reserve" in states
    durable = [r for r in results if r is not None]
    assert len(durable) > 100, "the reserve should hold many touches"
    assert ob.disk_state() == "full" and ob.ring_depth == 10
    assert ob.full_events >= 1 and ob.lost == 0
    on_disk = ob.next_seq() - 1
    assert ob.depth() == on_disk + ob.ring_depth
    # room again: the ring is written oldest first, before anything newer, seqs contiguous
    filler.unlink()
    assert ob.maintain() == 10
    assert ob.ring_depth == 0 and ob.disk_state() != "full"
    nxt = ob.append(lambda s: payload(s), created_ms=made)
    made += 1
    assert nxt == on_disk + 11
    rows = ob.pending(0, 100_000)
    assert [s for s, _ in rows] == list(range(1, made + 1))
    # payload(s) was built with the seq it got: order kept, nothing lost, nothing doubled
    assert all(p == payload(s) for s, p in rows)
    ob.close()


def test_ring_full_counts_lost_touches_loudly(small_fs: Path) -> None:
    ob = Outbox(small_fs / "o.sqlite", reserve_bytes=0, ring_max=3)
    ob.append(payload, created_ms=0)
    fill(small_fs)
    results = [ob.append(payload, created_ms=i) for i in range(3000)]
    assert ob.ring_depth == 3
    first_none = results.index(None)
    assert ob.lost == len(results) - first_none - 3
    assert ob.disk_state() == "full"
    ob.close()


def test_disk_full_simulated_with_max_page_count(tmp_path: Path) -> None:
    """The same policy where mounting is impossible: SQLite's max_page_count gives SQLITE_FULL."""
    ob = Outbox(tmp_path / "o.sqlite", reserve_bytes=0, ring_max=500)
    for _ in range(5):
        ob.append(payload, created_ms=0)
    pages = ob._db.execute("PRAGMA page_count").fetchone()[0]
    ob._db.execute(f"PRAGMA max_page_count={pages}")
    results = [ob.append(payload, created_ms=0) for _ in range(200)]
    assert None in results and ob.ring_depth > 0 and ob.disk_state() == "full"
    assert ob.lost == 0
    ob._db.execute("PRAGMA max_page_count=1000000")
    held = ob.ring_depth
    assert ob.maintain() == held
    assert [s for s, _ in ob.pending(0, 1000)] == list(range(1, 206))
    ob.close()


def test_agent_keeps_serving_when_the_disk_is_full(small_fs: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import fault_agent as fa

    from edge.agent import Agent
    from edge.clock import ManualClock
    from edge.config import from_dict
    from edge.decision import CardRead
    from protocol.touch import CardTech

    cfg = from_dict(fa.config(small_fs / "agent", 1))
    agent = Agent(cfg, clock=ManualClock(fa.DAY0_MS), idlist=fa.idlist(), config_keys=[])
    entry = cfg.readers[0]
    try:
        t = agent.handle_read(entry, CardRead(card=fa.card(1), tech=CardTech.FELICA))
        assert t is not None and t.seq == 1 and t.decision.value == "allow"
        fill(small_fs)
        os.unlink(agent.outbox.reserve_path) if agent.outbox.reserve_path.exists() else None
        agent.outbox.reserve_path.touch()  # a reserve of nothing: the disk stays full
        seqs = []
        for i in range(400):
            agent.clock.advance(1000)  # type: ignore[attr-defined]
            t = agent.handle_read(entry, CardRead(card=fa.card(i % 150), tech=CardTech.FELICA))
            assert t is not None and t.decision.value == "allow"  # the gate still opens
            seqs.append(t.seq)
        assert 0 in seqs  # some were held in memory (seq 0: not yet durable)
        st = agent.state()
        assert st["disk"] == "full" and st["ring"] > 0 and st["lost"] == 0
        assert agent.counts["disk_full"] == seqs.count(0)
    finally:
        agent.outbox.close()
