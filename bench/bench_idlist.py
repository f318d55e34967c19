"""ID-list benchmark: the mapped v1 list beside a plain dict and an indexed SQLite table.

    .venv/bin/python bench/bench_idlist.py [--n 2000000] [--lookups 200000] [--delta 10000]

Each store is loaded in a fresh subprocess that measures its own RSS before and after (so
nothing the generator allocated is counted), then times lookups by technician ID and by card
identifier, then applies the same 10,000-change delta. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.idlist.codec import STATUSES, Row, build_rows, entry_of, load_list  # noqa: E402

NAME = "bench"


def rss() -> dict[str, int]:
    """VmRSS and its anonymous / file-backed parts, bytes (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def rss_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


# -- data ----------------------------------------------------------------------------------

def generate(n: int, seed: int, cards: bool = True) -> list[Row]:
    """n technicians: random 14-digit IDs, 95% active, one 8-byte IDm each, 5% also a 7-byte UID
    (cards=False: no card identifiers, as for the profiles that read the ID off the card)."""
    rnd = random.Random(seed)
    tids = rnd.sample(range(10**13, 10**14), n)
    rows = []
    for t in tids:
        st = 0 if rnd.random() < 0.95 else rnd.choice((1, 2))
        cs = (rnd.randbytes(8),) if rnd.random() < 0.95 else (rnd.randbytes(8), rnd.randbytes(7))
        rows.append((t, st, rnd.randrange(1, 5), cs if cards else ()))
    return rows


def make_delta(rows, k: int, seed: int):
    """k changes: 40% status/level changes, 30% removals, 30% additions."""
    rnd = random.Random(seed + 1)
    picked = rnd.sample(range(len(rows)), int(k * 0.7))
    change, remove = picked[: int(k * 0.4)], picked[int(k * 0.4):]
    upsert = [(rows[i][0], (rows[i][1] + 1) % 3, rows[i][2] % 4 + 1, rows[i][3]) for i in change]
    have = {r[0] for r in rows}
    add = []
    while len(add) < k - len(picked):
        t = rnd.randrange(10**13, 10**14)
        if t not in have:
            have.add(t)
            add.append((t, 0, 1, (rnd.randbytes(8),) if rows[0][3] else ()))
    return upsert + add, [rows[i][0] for i in remove]


def prepare(work: Path, n: int, lookups: int, k: int, seed: int, cards: bool) -> dict:
    t0 = time.perf_counter()
    rows = generate(n, seed, cards)
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    v1 = build_rows(list(rows), name=NAME, version=1, issued_ms=1)
    build_s = time.perf_counter() - t0
    (work / "v1.idl").write_bytes(v1)

    upsert, remove = make_delta(rows, k, seed)
    gone = set(remove) | {r[0] for r in upsert}
    v2 = build_rows([r for r in rows if r[0] not in gone] + upsert, name=NAME, version=2,
                    issued_ms=2)
    from edge.idlist.delta import diff
    from edge.idlist.dist import delta_messages
    from edge.signing import generate_key, public_hex

    key = generate_key()
    t0 = time.perf_counter()
    delta = diff(load_list(v1), load_list(v2))
    diff_s = time.perf_counter() - t0
    assert len(delta) == k, (len(delta), k)
    msgs = delta_messages(delta, key)
    with open(work / "delta.pkl", "wb") as f:
        pickle.dump({"messages": [(m.topic, m.payload) for m in msgs],
                     "public": public_hex(key.public_key()), "upsert": upsert,
                     "remove": remove, "v2_hash": load_list(v2).body_hash}, f)

    # the same IDs for the dict and the SQLite table
    with open(work / "dict.pkl", "wb") as f:
        pickle.dump(({f"{t:014d}": entry_of(r) for r in rows for t in (r[0],)},
                     {c: f"{t:014d}" for t, _, _, cs in rows for c in cs}), f, protocol=5)
    db = sqlite3.connect(work / "list.sqlite")
    db.executescript("""
        PRAGMA journal_mode=WAL;
        CREATE TABLE tech(tid INTEGER PRIMARY KEY, status INTEGER, level INTEGER);
        CREATE TABLE card(card BLOB PRIMARY KEY, tid INTEGER NOT NULL) WITHOUT ROWID;
    """)
    with db:
        db.executemany("INSERT INTO tech VALUES (?,?,?)", ((t, s, lv) for t, s, lv, _ in rows))
        db.executemany("INSERT INTO card VALUES (?,?)",
                       ((c, t) for t, _, _, cs in rows for c in cs))
    db.execute("CREATE INDEX card_tid ON card(tid)")  # so a delta can drop a tech's cards
    db.close()

    rnd = random.Random(seed + 2)
    sample = rnd.sample(rows, lookups)
    # 90% hits, 10% misses: a gate mostly sees registered cards
    tid_probes = [f"{r[0]:014d}" if i % 10 else f"{rnd.randrange(10**13):014d}"
                  for i, r in enumerate(sample)]
    card_probes = [r[3][0] if i % 10 and r[3] else rnd.randbytes(8)
                   for i, r in enumerate(sample)]
    with open(work / "probes.pkl", "wb") as f:
        pickle.dump((tid_probes, card_probes), f)
    return {"generate_s": round(gen_s, 2), "build_s": round(build_s, 2),
            "diff_s": round(diff_s, 2), "file_bytes": len(v1),
            "file_bytes_per_id": round(len(v1) / n, 2),
            "delta_envelope_bytes": sum(len(m.payload) for m in msgs),
            "delta_parts": len(msgs)}


# -- workers (fresh processes) --------------------------------------------------------------

def rate(fn, probes, repeat: int = 1) -> tuple[float, int]:
    """Lookups per second, best of `repeat` passes (the machine is shared: take the least
    disturbed pass), and the number of hits."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        hits = sum(1 for p in probes if fn(p) is not None)
        best = max(best, len(probes) / (time.perf_counter() - t0))
    return best, hits


def worker(kind: str, work: Path) -> dict:
    with open(work / "probes.pkl", "rb") as f:
        tid_probes, card_probes = pickle.load(f)
    with open(work / "delta.pkl", "rb") as f:
        delta = pickle.load(f)
    n_ids = None
    # import everything first: only the list itself may count in the RSS delta
    from edge.idlist.codec import open_list
    from edge.idlist.updater import ListUpdater  # noqa: F401
    from edge.signing import load_public_key  # noqa: F401

    day = tid_probes[:2000], card_probes[:2000]  # a busy gate's day: ~2,000 people
    for f in ("v1.idl", "list.sqlite", "dict.pkl"):  # cold start, as after a reboot
        fd = os.open(work / f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    gc.collect()
    before = rss()
    t0 = time.perf_counter()
    if kind == "mmap":
        lst = open_list(work / "v1.idl", verify=True)
        by_tid, by_card = lst.by_tid, lst.by_card
        n_ids = len(lst)
    elif kind == "mmap_noverify":
        lst = open_list(work / "v1.idl", verify=False)
        by_tid, by_card = lst.by_tid, lst.by_card
        n_ids = len(lst)
    elif kind == "dict":  # what MemoryIdList does: Entry objects in two dicts
        with open(work / "dict.pkl", "rb") as f:
            tids, cards = pickle.load(f)
        by_tid = tids.get

        def by_card(c: bytes):
            t = cards.get(c)
            return None if t is None else tids[t]
        n_ids = len(tids)
    else:  # an SQLite-backed IdList: every lookup returns an Entry, cards included
        from edge.idlist.base import Entry

        db = sqlite3.connect(work / "list.sqlite", isolation_level=None)
        cards_of = "(SELECT group_concat(hex(card), ' ') FROM card WHERE card.tid = t.tid)"
        q_tid = f"SELECT t.status, t.level, {cards_of} FROM tech t WHERE t.tid = ?"
        q_card = (f"SELECT t.tid, t.status, t.level, {cards_of} FROM card c "
                  "JOIN tech t ON t.tid = c.tid WHERE c.card = ?")

        def entry(tid: str, st: int, lv: int, cs: str | None) -> Entry:
            return Entry(tid, STATUSES[st], lv, tuple(map(bytes.fromhex, cs.split()))
                         if cs else ())

        def by_tid(tid: str):
            row = db.execute(q_tid, (int(tid),)).fetchone()
            return None if row is None else entry(tid, *row)

        def by_card(c: bytes):
            row = db.execute(q_card, (c,)).fetchone()
            return None if row is None else entry(f"{row[0]:014d}", *row[1:])
        by_tid("00000000000000")
        n_ids = db.execute("SELECT count(*) FROM tech").fetchone()[0]
    load_s = time.perf_counter() - t0
    loaded = rss()
    for _ in range(3):  # each person taps in and out, and again after lunch
        rate(by_card, day[1])
        rate(by_tid, day[0])
    after_day = rss()
    tid_rate, tid_hits = rate(by_tid, tid_probes, 3)
    card_rate, card_hits = rate(by_card, card_probes, 3)
    after = rss()
    raw = {}
    if kind == "sqlite":  # the bare row fetch, no cards, no Entry: SQLite's floor
        raw_tid = "SELECT status, level FROM tech WHERE tid = ?"
        raw_card = "SELECT tid FROM card WHERE card = ?"
        raw = {"raw_row_lookups_per_s_by_tid": round(rate(
                   lambda t: db.execute(raw_tid, (int(t),)).fetchone(), tid_probes, 3)[0]),
               "raw_row_lookups_per_s_by_card": round(rate(
                   lambda c: db.execute(raw_card, (c,)).fetchone(), card_probes, 3)[0])}
    out = {**raw, "load_s": round(load_s, 4), "ids": n_ids,
           "rss_after_load": rss_delta(before, loaded),
           "rss_after_day_of_2000_people": rss_delta(before, after_day),
           "rss_after_lookups": rss_delta(before, after),
           "rss_bytes_per_id_after_load": round((loaded["VmRSS"] - before["VmRSS"]) / n_ids, 2),
           "rss_bytes_per_id_after_day": round((after_day["VmRSS"] - before["VmRSS"]) / n_ids, 2),
           "rss_bytes_per_id_after_lookups": round((after["VmRSS"] - before["VmRSS"]) / n_ids, 2),
           "anon_rss_bytes_per_id_after_lookups":
               round((after["RssAnon"] - before["RssAnon"]) / n_ids, 2),
           "lookups_per_s_by_tid": round(tid_rate), "lookups_per_s_by_card": round(card_rate),
           "hits": [tid_hits, card_hits]}
    if kind == "mmap":
        out["delta_apply_s"] = apply_mmap(work, delta)
    elif kind == "dict":
        t0 = time.perf_counter()
        for t in delta["remove"]:
            del tids[f"{t:014d}"]
        for t, st, lv, cs in delta["upsert"]:
            tids[f"{t:014d}"] = entry_of((t, st, lv, cs))
            for c in cs:
                cards[c] = f"{t:014d}"
        out["delta_apply_s"] = round(time.perf_counter() - t0, 4)
        out["delta_note"] = "in memory only: nothing durable, nothing verified"
    elif kind == "sqlite":
        t0 = time.perf_counter()
        with db:
            db.execute("BEGIN")
            db.executemany("DELETE FROM card WHERE tid = ?", ((t,) for t in delta["remove"]))
            db.executemany("DELETE FROM tech WHERE tid = ?", ((t,) for t in delta["remove"]))
            db.executemany("INSERT OR REPLACE INTO tech VALUES (?,?,?)",
                           ((t, st, lv) for t, st, lv, _ in delta["upsert"]))
            db.executemany("INSERT OR REPLACE INTO card VALUES (?,?)",
                           ((c, t) for t, _, _, cs in delta["upsert"] for c in cs))
        out["delta_apply_s"] = round(time.perf_counter() - t0, 4)
        out["delta_note"] = "one transaction, WAL; unsigned, unverified"
    return out


def apply_mmap(work: Path, delta: dict) -> float:
    """Device side, all of it: reassemble parts, verify the signature, rebuild the file,
    check its hash, fsync, rename, map the new list."""
    from edge.idlist.updater import ListUpdater
    from edge.signing import load_public_key

    dev = work / "device"
    dev.mkdir(exist_ok=True)
    shutil.copy(work / "v1.idl", dev / f"{NAME}.idl")
    # the bench's lists are issued at 1 and 2 ms: the device clock is just after them
    u = ListUpdater(dev, NAME, [load_public_key(delta["public"])], now_ms=lambda: 10)
    t0 = time.perf_counter()
    outcomes = []
    for topic, payload in delta["messages"]:
        outcomes += u.handle(topic, payload)
    elapsed = time.perf_counter() - t0
    applied = [o for o in outcomes if o.kind == "applied"]
    assert applied and u.applied_version == 2 and u.current.body_hash == delta["v2_hash"], \
        outcomes[-3:]
    return round(elapsed, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--lookups", type=int, default=200_000)
    ap.add_argument("--delta", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-cards", action="store_true",
                    help="technicians without card identifiers (ID read off the card)")
    ap.add_argument("--workdir", help="keep files here (default: a temp dir, removed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.workdir))))
        return
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-idlist-")
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        report: dict = {"n": args.n, "lookups": args.lookups, "delta_changes": args.delta,
                        "python": sys.version.split()[0], "machine": os.uname().machine,
                        "statuses": [s.value for s in STATUSES]}
        report["cards"] = not args.no_cards
        report["prepare"] = prepare(work, args.n, args.lookups, args.delta, args.seed,
                                    not args.no_cards)
        for kind in ("mmap", "mmap_noverify", "dict", "sqlite"):
            res = subprocess.run([sys.executable, __file__, "--worker", kind, "--workdir",
                                  str(work)], capture_output=True, text=True, timeout=1800)
            if res.returncode:
                raise SystemExit(f"{kind} worker failed:\n{res.stderr}")
            report[kind] = json.loads(res.stdout)
        m, d, s = report["mmap"], report["dict"], report["sqlite"]
        report["ratios"] = {
            "dict_rss_over_mmap_rss_after_lookups":
                round(d["rss_after_lookups"]["VmRSS"] / max(1, m["rss_after_lookups"]["VmRSS"]), 1),
            "mmap_over_sqlite_lookups_by_tid":
                round(m["lookups_per_s_by_tid"] / s["lookups_per_s_by_tid"], 2),
            "mmap_over_sqlite_lookups_by_card":
                round(m["lookups_per_s_by_card"] / s["lookups_per_s_by_card"], 2),
            "mmap_over_dict_lookups_by_tid":
                round(m["lookups_per_s_by_tid"] / d["lookups_per_s_by_tid"], 3),
        }
        report["targets"] = {
            "rss_per_id_le_16_after_load": m["rss_bytes_per_id_after_load"] <= 16,
            "rss_per_id_le_16_after_day": m["rss_bytes_per_id_after_day"] <= 16,
            "rss_per_id_le_16_after_lookups": m["rss_bytes_per_id_after_lookups"] <= 16,
            "load_lt_0_5_s": m["load_s"] < 0.5,
            "lookups_faster_than_sqlite": m["lookups_per_s_by_tid"] > s["lookups_per_s_by_tid"]
            and m["lookups_per_s_by_card"] > s["lookups_per_s_by_card"],
        }
        print(json.dumps(report, indent=2))
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
