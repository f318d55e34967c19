"""A batch the store refuses for its own data: the refused touches become dead letters, the rest
are stored (real PostgreSQL and SQLite), and the halving finds exactly the refused ones (property)."""

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sink_support import NOW, fresh_store, touch

from cloud_sink.derive.rows import COLUMNS, Row, touch_row
from cloud_sink.isolate import REFUSED, write_isolating
from cloud_sink.model import DeadLetter, IngestResult, Policy
from protocol import topics
from protocol.touch import Touch


def _rows(touches: list[Touch]) -> tuple[list[Row], list[tuple[str, bytes]]]:
    # the sources stand for the received bytes: any bytes do, the dead letter keeps them as is
    return ([touch_row(t, NOW, Policy()) for t in touches],
            [(topics.touch(t.site, t.device), f"payload-{t.seq}".encode()) for t in touches])


def test_postgres_refusing_one_touch_stores_the_rest_and_keeps_it_as_a_dead_letter(
        tmp_path: Path, pg_url: str) -> None:
    touches = [touch(seq) for seq in range(1, 13)]
    # built past the codec (which refuses NUL now) to stand for any value the server refuses
    touches[4] = dataclasses.replace(touch(5, role="training"), facts={"course": "K\x00101"})
    rows, sources = _rows(touches)
    with fresh_store("postgres", tmp_path, pg_url) as s:
        res, kept, refused = write_isolating(lambda r, d: s.ingest_rows(r, d, NOW), rows, sources, [])
        assert (res.stored, res.dead) == (11, 1)
        assert [r[1] for r in kept] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
        assert [d.payload for d in refused] == [b"payload-5"]
        [(_, _, topic, reason, detail, payload)] = s.dead_letters()
        assert (topic, reason, payload) == (sources[4][0], "store_refused", b"payload-5")
        assert "DataError" in detail and "NUL" in detail
        assert s.counts()["touches"] == 11


def test_sqlite_refusing_one_touch_stores_the_rest_and_keeps_it_as_a_dead_letter(
        tmp_path: Path) -> None:
    rows, sources = _rows([touch(seq) for seq in range(1, 9)])
    broken = list(rows[6])
    broken[COLUMNS.index("tq")] = None   # NOT NULL: an IntegrityError
    rows[6] = tuple(broken)
    with fresh_store("sqlite", tmp_path, None) as s:
        res, kept, refused = write_isolating(lambda r, d: s.ingest_rows(r, d, NOW), rows, sources, [])
        assert (res.stored, res.dead) == (7, 1)
        assert [r[1] for r in kept] == [1, 2, 3, 4, 5, 6, 8]
        assert [d.reason for d in refused] == ["store_refused"]
        assert [(r[3], r[5]) for r in s.dead_letters()] == [("store_refused", b"payload-7")]


def test_a_store_that_is_down_is_not_split_the_batch_goes_back_whole(tmp_path: Path) -> None:
    rows, sources = _rows([touch(seq) for seq in range(1, 5)])
    with fresh_store("sqlite", tmp_path, None) as s:
        s.close()
        with pytest.raises(sqlite3.ProgrammingError):  # closed: retried later, not dead-lettered
            write_isolating(lambda r, d: s.ingest_rows(r, d, NOW), rows, sources, [])


@given(st.lists(st.booleans(), max_size=60), st.integers(0, 3))
def test_halving_sets_apart_exactly_the_refused_items_and_writes_each_other_once(
        bad: list[bool], letters: int) -> None:
    written: list[int] = []
    dead_written: list[DeadLetter] = []

    def write(items: list[int], dead: list[DeadLetter]) -> IngestResult:
        if any(bad[i] for i in items):
            raise REFUSED[0]("refused")
        written.extend(items)
        dead_written.extend(dead)
        return IngestResult(stored=len(items), dead=len(dead))

    items = list(range(len(bad)))
    sources = [("t", bytes([i])) for i in items]
    given_dead = [DeadLetter("t", b"x", "bad_field", "") for _ in range(letters)]
    res, kept, refused = write_isolating(write, items, sources, given_dead)
    goods = [i for i in items if not bad[i]]
    assert kept == goods and sorted(written) == goods
    written_refused = [d for d in dead_written if d.reason == "store_refused"]
    assert written_refused == refused
    assert [d.payload for d in refused] == [bytes([i]) for i in items if bad[i]]
    assert sum(d.reason == "bad_field" for d in dead_written) == letters   # once each
    assert (res.stored, res.dead) == (len(goods), letters + sum(bad))
