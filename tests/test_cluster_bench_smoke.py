"""Tiny runs of the national benchmarks (bench_freshness, bench_replication, bench_national), so
the scripts cannot rot unnoticed: real NATS nodes, a real Mosquitto, real PostgreSQL."""

import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_freshness  # noqa: E402
import bench_national  # noqa: E402
import bench_replication  # noqa: E402

from cloud_sink.store import open_store  # noqa: E402


@pytest.mark.parametrize("path", ["cluster", "mosquitto"])
def test_freshness_path_stores_every_touch_once_and_times_each(tmp_path: Path, path: str) -> None:
    res = bench_freshness.one_path(path, devices=6, rate=20, seconds=3, procs=2, warmup=0.5,
                                   tmp=tmp_path)
    assert res["sent"] == 60 and res["unacked_at_end"] == 0
    assert res["all_stored_once"] and res["store"]["work_history"] > 0  # type: ignore[index]
    lat = res["latency"]
    # the warm-up's touches are sent but not timed
    assert 0 < lat["n"] < 60 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]  # type: ignore[index, operator]


@pytest.mark.parametrize("path", ["cluster", "mosquitto"])
def test_replication_path_splits_the_touches_between_two_sinks(tmp_path: Path, path: str) -> None:
    res = bench_replication.one_path(path, 400, tmp_path, 0)
    assert res["lost"] == 0 and res["store"]["touches"] == 400  # type: ignore[index]
    split = res["per_sink"]
    assert sum(s["stored"] for s in split) == 400  # type: ignore[attr-defined, misc]
    # (400 touches may be one batch: one receive stamp, no store-side span)
    assert res["publish_per_s"] > 0 and res["drain_wall_per_s"] > 0  # type: ignore[operator]


def test_months_ending_crosses_the_year() -> None:
    assert bench_national.months_ending("2027-02", 4) == ["2026-11", "2026-12", "2027-01",
                                                         "2027-02"]
    assert bench_national.months_ending("2026-10", 1) == ["2026-10"]


@pytest.mark.parametrize("months", [1, 3])
def test_national_generator_and_its_exports_at_small_scale(months: int) -> None:
    sites, month = 30, "2026-09"
    url, built = bench_national.cached_national(sites, month, rebuild=True, months=months)
    try:
        assert built is not None and built["build_s"] > 0
        out = bench_national.bench(url, month, repeat=1, samples=2, months=months)
        techs = sites * bench_national.TECHS
        per_month = techs * bench_national.DAYS * 2
        assert out["store"]["touches"] == per_month * months  # type: ignore[index]
        with psycopg.connect(url) as db:   # each device's seqs go on, month after month
            seqs = db.execute("SELECT device, array_agg(seq ORDER BY seq) FROM touches"
                              " GROUP BY device").fetchall()
            parts = db.execute("SELECT count(*) FROM pg_inherits WHERE inhparent ="
                               " 'touches'::regclass").fetchone()[0]
        assert len(seqs) == sites
        assert all(s == list(range(1, per_month // sites * months + 1)) for _, s in seqs)
        assert parts >= months
        assert out["naive_group_by"]["rows"] == techs  # type: ignore[index]
        for k in ("export_per_site", "export_per_site_named", "export_per_main_contractor"):
            assert out[k]["rows"] == techs  # type: ignore[index]
        assert out["site_month_report"]["rows"] == bench_national.TECHS * bench_national.DAYS  # type: ignore[index]
        # the generator's work history is what the sink derives from its touches
        s = open_store(url, create=False)
        generated = s.table("work_history")
        s.rederive()
        assert s.table("work_history") == generated
        # and a second call finds the complete build in the cache
        assert bench_national.cached_national(sites, month, months=months) == (url, None)
        s.close()
    finally:
        with psycopg.connect(bench_national.PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
