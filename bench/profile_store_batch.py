"""Where a SQLite store's write transaction spends its time, phase by phase, as the store grows.

    .venv/bin/python bench/profile_store_batch.py [--touches 300000] [--batch 1000] [--last 10]

Fills a fresh store with bench_sink.payloads(touches) (no broker: rows straight into
ingest_rows), then replays the store's own steps for the last `--last` batches one by one with
a clock around each: stage load, removing stored rows, insert, each derivation statement,
commit. Prints JSON: milliseconds per batch for each phase and the WAL frames one more batch
writes. A profile for finding the next cost, not a benchmark: see bench_sink.py for rates.
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sink  # noqa: E402

from cloud_sink.derive.rows import Row, touch_row  # noqa: E402
from cloud_sink.model import Policy  # noqa: E402
from cloud_sink.stores import base  # noqa: E402
from cloud_sink.stores.sqlite import SqliteStore  # noqa: E402
from protocol.touch import decode  # noqa: E402

DERIVE_STEPS = ("fold_work_history", "training_monthly", "training_course", "vending_ledger")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--touches", type=int, default=300_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--last", type=int, default=10, help="batches profiled at the end")
    args = ap.parse_args()
    n, b = args.touches, args.batch
    now = int(time.time() * 1000)
    rows = [touch_row(decode(p), now, Policy()) for _, p in bench_sink.payloads(n + b)]
    cut = n - args.last * b
    spent: dict[str, float] = {}

    def clock(name: str, step: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        step()
        spent[name] = spent.get(name, 0.0) + (time.perf_counter() - t0) * 1000

    with tempfile.TemporaryDirectory() as tmp:
        s = SqliteStore(Path(tmp) / "s.sqlite")

        def stage(batch: list[Row]) -> None:
            s._x("DELETE FROM stage")
            s._load_stage(batch)

        for i in range(0, cut, b):
            s.ingest_rows(rows[i:i + b], [], now)
        cut_rows: list[list[Row]] = [[]]
        for i in range(cut, n, b):
            batch = base.first_of_each(rows[i:i + b])
            clock("begin", lambda: s._x("BEGIN IMMEDIATE"))
            # the site registry's rules (SqlStore._cut_rows): the cut goes on each row
            clock("cut", lambda: cut_rows.__setitem__(0, s._cut_rows(batch, now)))  # noqa: B023
            clock("stage", lambda: stage(cut_rows[0]))
            clock("drop_stored", lambda: s._x(base.DROP_STORED_FROM_STAGE))
            clock("insert", lambda: s._x(base.INSERT_FROM_STAGE))
            for name, sql in zip(DERIVE_STEPS, base.INCREMENTAL, strict=True):
                clock(name, lambda: s._x(sql))  # noqa: B023
            clock("commit", lambda: s._x("COMMIT"))
        s._x("PRAGMA wal_checkpoint(TRUNCATE)")
        s.ingest_rows(rows[n:n + b], [], now)
        frames = s._x("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        s.close()
    per = {k: round(v / args.last, 2) for k, v in spent.items()}
    print(json.dumps({"touches_before": cut, "batch": b, "ms_per_batch": per,
                      "total_ms": round(sum(per.values()), 2), "wal_frames_next_batch": frames},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
