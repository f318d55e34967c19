"""`ccus sink import` (JSON Lines, CBOR sequence, CBOR array), courses and devices CSV, dead letters."""

from pathlib import Path

import cbor2
import pytest
from sink_support import CENTER, NOW, SITE, tid, touch

from ccus.cli import main
from cloud_sink.courses import CsvError, parse_courses
from cloud_sink.importer import import_file, touch_json
from cloud_sink.store import open_store
from protocol.touch import encode, to_map


def good(n: int) -> list:  # type: ignore[type-arg]
    return [touch(i, who=1 + i % 3, dir="in" if i % 2 else "out") for i in range(1, n + 1)]


def test_jsonl_replay_with_bad_lines_in_between(tmp_path: Path) -> None:
    lines = [touch_json(t) for t in good(10)]
    lines.insert(3, "{not json")
    lines.insert(6, '{"v": 1, "dev": "gate-01"}')
    lines.insert(8, "")
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    s = open_store(tmp_path / "s.sqlite")
    res = import_file(s, f, progress=False, now_ms=NOW, batch=4)
    assert (res.stored, res.dead) == (10, 2)
    assert sorted(d[3] for d in s.dead_letters()) == ["malformed_json", "missing_field"]
    assert {d[2] for d in s.dead_letters()} == {"import:t.jsonl:4", "import:t.jsonl:7"}
    again = import_file(s, f, progress=False, now_ms=NOW)
    assert (again.stored, again.repeated) == (0, 10)
    assert len(s.work_history()) == 3
    s.close()


def test_cbor_sequence_and_cbor_array_give_the_same_store(tmp_path: Path) -> None:
    ts = good(12)
    seq = tmp_path / "seq.cbor"
    seq.write_bytes(b"".join(encode(t) for t in ts) + cbor2.dumps({"v": 7}))
    arr = tmp_path / "arr.cbor"
    arr.write_bytes(cbor2.dumps([to_map(t) for t in ts] + ["junk"]))
    tables = []
    for f in (seq, arr):
        s = open_store(tmp_path / f"{f.stem}.sqlite")
        res = import_file(s, f, progress=False, now_ms=NOW)
        assert (res.stored, res.dead) == (12, 1)
        tables.append([(r.tid, r.first_in_ms, r.last_out_ms, r.taps) for r in s.work_history()])
        s.close()
    assert tables[0] == tables[1] and len(tables[0]) == 3


def test_truncated_cbor_keeps_what_came_before(tmp_path: Path) -> None:
    f = tmp_path / "cut.cbor"
    f.write_bytes(b"".join(encode(t) for t in good(5)) + encode(touch(6))[:-7])
    s = open_store(tmp_path / "s.sqlite")
    res = import_file(s, f, progress=False, now_ms=NOW)
    assert (res.stored, res.dead) == (5, 1)
    assert s.dead_letters()[0][3] == "malformed_cbor"
    s.close()


def test_import_cli_into_postgres_prints_totals(tmp_path: Path, pg_url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(touch_json(t) for t in good(7)) + "\n[1]\n")
    assert main(["sink", "import", "--store", pg_url, str(f), "--no-progress",
                 "--max-past-days", "100000"]) == 0
    assert "7 stored, 0 already stored, 0 flagged (clock), 1 dead letters" in capsys.readouterr().out
    assert main(["sink", "dead-letters", "--db", pg_url]) == 0
    assert "not_a_map" in capsys.readouterr().out


def test_courses_csv_import_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "s.sqlite")
    f = tmp_path / "courses.csv"
    f.write_text("\ufeffcourse,name,starts,ends,enrolled,center\n"
                 f"C-01,足場の組立て等作業主任者,2026-11-01,2026-11-03,20,{CENTER}\n"
                 "C-02,玉掛け技能講習,2026-11-10,2026-11-12,15,\n", encoding="utf-8")
    assert main(["sink", "courses", "import", "--db", db, str(f)]) == 0
    assert "2 courses imported" in capsys.readouterr().out
    assert main(["sink", "courses", "list", "--db", db]) == 0
    assert "玉掛け技能講習" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("course,name,starts,ends,enrolled\nC-3,x,2026-11-05,2026-11-01,3\n")
    assert main(["sink", "courses", "import", "--db", db, str(bad)]) == 2
    assert "line 2: ends before starts" in capsys.readouterr().err
    with pytest.raises(CsvError, match="header lacks enrolled"):
        parse_courses("course,name,starts,ends\n")
    with pytest.raises(CsvError, match="appears twice"):
        parse_courses("course,name,starts,ends,enrolled\nA,a,2026-01-01,2026-01-02,1\n"
                      "A,b,2026-01-01,2026-01-02,1\n")


def test_registry_cli_and_registered_only_import(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "s.sqlite")
    reg = tmp_path / "devices.csv"
    reg.write_text(f"device,site,role\ngate-01,{SITE},gate\n")
    assert main(["sink", "devices", "import", "--db", db, str(reg)]) == 0
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(touch_json(t) for t in [touch(1), touch(1, device="gate-66")]) + "\n")
    assert main(["sink", "import", "--db", db, str(f), "--no-progress", "--registered-only",
                 "--max-past-days", "100000"]) == 0
    assert "1 stored, 0 already stored, 0 flagged (clock), 1 dead letters" in capsys.readouterr().out
    assert main(["sink", "work-history", "--db", db]) == 0
    assert tid(1) in capsys.readouterr().out


def test_sink_gaps_lists_open_gaps_of_a_store_it_opens_and_closes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ccus sink gaps` opens the store, reads seq_gaps (cloud_sink.acks.gap_report) and
    closes it; an open gap shows with its range, `--all` adds the closed ones."""
    db = str(tmp_path / "s.sqlite")
    assert main(["sink", "gaps", "--db", db]) == 2  # no store there: none is created
    assert "no store at" in capsys.readouterr().err
    open_store(db).close()
    assert main(["sink", "gaps", "--db", db]) == 0
    assert "no open gaps" in capsys.readouterr().out
    store = open_store(db)
    store.ingest([touch(s) for s in (1, 2, 5, 6, 7, 8, 10)], now_ms=NOW)
    store.sync_gaps("gate-01", SITE, [(3, 4), (9, 9)], NOW)  # type: ignore[attr-defined]
    store.ingest([touch(9)], now_ms=NOW)
    store.sync_gaps("gate-01", SITE, [(3, 4)], NOW)  # type: ignore[attr-defined]
    store.close()
    assert main(["sink", "gaps", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "3..4" in out and "open" in out and "9..9" not in out
    assert main(["sink", "gaps", "--db", db, "--all"]) == 0
    assert "9..9" in capsys.readouterr().out
