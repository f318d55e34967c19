"""A tiny run of bench/bench_sink.py's pieces, so the benchmark script cannot rot unnoticed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_sink  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402


def test_drain_rate_bare_and_sqlite_sink(tmp_path: Path, broker: PrivateBroker) -> None:
    n = 300
    bare = bench_sink.drain_rate(broker, lambda g: bench_sink.Bare(broker.port, g, n), n,
                                 "smoke-bare", 0)
    sink = bench_sink.drain_rate(
        broker, lambda g: bench_sink.SinkConsumer(broker.port, g, n, str(tmp_path / "s.sqlite")),
        n, "smoke-sink", n)
    assert bare["touches"] == n and bare["per_s"] > 0
    assert (sink["stored"], sink["repeated"]) == (n, 0)


def test_big_store_generator_at_small_scale(tmp_path: Path) -> None:
    built = bench_sink.build_big_store(tmp_path / "big.sqlite", 200_000)
    from cloud_sink.store import open_store

    s = open_store(tmp_path / "big.sqlite")
    assert s.counts()["touches"] == built["touches"] > 150_000
    site = f"{13100000000000:014d}"
    rows = s.work_history(site, bench_sink.MONTHS[0])
    assert len(rows) == bench_sink.TECHS * bench_sink.DAYS_PER_MONTH
    assert all(r.taps == 2 and not r.exit_missing for r in rows)
    generated = s.table("work_history")
    s.rederive()  # the generator's work history is what the sink would derive
    assert s.table("work_history") == generated
    s.close()


def test_store_batch_profile_runs_and_accounts_for_every_phase() -> None:
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "profile_store_batch.py"
    out = subprocess.run([sys.executable, str(script), "--touches", "3000", "--batch", "500",
                          "--last", "2"], capture_output=True, text=True, check=True, timeout=120)
    prof = json.loads(out.stdout)
    assert prof["touches_before"] == 2000 and prof["batch"] == 500
    assert set(prof["ms_per_batch"]) == {"begin", "cut", "stage", "drop_stored", "insert",
                                         "fold_work_history", "training_monthly",
                                         "training_course", "vending_ledger", "commit"}
    assert prof["wal_frames_next_batch"] > 0
