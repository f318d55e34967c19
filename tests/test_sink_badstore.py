"""Bad stores through the real `ccus` command: a typo, a missing folder, a garbage file, an empty
PostgreSQL database. One line on stderr naming the store and what to do, no traceback, exit
non-zero, and nothing created."""

import subprocess
import sys
from pathlib import Path

import pytest
from sink_support import NOW, SITE, touch

from cloud_sink.store import open_store

CCUS = str(Path(sys.executable).parent / "ccus")


def ccus(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CCUS, *args], capture_output=True, text=True, timeout=timeout)


def one_line_no_traceback(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def real_store(tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    with open_store(path) as s:  # type: ignore[attr-defined]
        s.ingest([touch(1), touch(2)], now_ms=NOW)
    return path


@pytest.mark.parametrize("argv", [
    ["report", "work-history", "--site", SITE, "--month", "2026-11"],
    ["report", "days-worked", "--month", "2026-11"],
    ["sink", "work-history"], ["sink", "gaps"], ["sink", "dead-letters"], ["sink", "flagged"],
    ["sink", "courses", "list"], ["sink", "devices", "list"], ["sink", "rederive"],
])
def test_a_typo_of_a_store_path_is_refused_and_nothing_is_created(
        real_store: Path, argv: list[str]) -> None:
    typo = real_store.with_name("stor.sqlite")
    p = ccus(*argv, "--store", str(typo))
    one_line_no_traceback(p, f"no store at {typo}", "ccus sink run", "ccus sink import")
    assert not typo.exists()
    assert p.stdout == ""  # no header-only CSV


def test_the_real_store_still_reports(real_store: Path) -> None:
    p = ccus("report", "work-history", "--site", SITE, "--month", "2026-11", "--store",
             str(real_store))
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 2  # the header and one technician-day


def test_sink_run_does_not_create_a_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "nonexist" / "dir" / "s.sqlite"
    p = ccus("sink", "run", "--db", str(target), "--broker", "127.0.0.1:1")
    one_line_no_traceback(p, str(target.parent), "does not exist")
    assert not target.parent.exists()


@pytest.mark.parametrize("argv", [["report", "days-worked", "--month", "2026-11"],
                                  ["sink", "gaps"], ["sink", "run", "--broker", "127.0.0.1:1"]])
def test_a_corrupt_store_names_the_file_and_what_to_do(tmp_path: Path, argv: list[str]) -> None:
    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(b"this is not a database\n" * 300)
    p = ccus(*argv, "--store", str(bad))
    one_line_no_traceback(p, str(bad), "not a usable SQLite store", "restore it")
    assert bad.read_bytes() == b"this is not a database\n" * 300


def test_an_empty_postgresql_database_is_no_store_for_a_report(pg_url: str) -> None:
    p = ccus("report", "days-worked", "--month", "2026-11", "--store", pg_url)
    one_line_no_traceback(p, "no store in", "ccus sink run")
