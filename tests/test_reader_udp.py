"""The nfcpy backend against emulated FeliCa, Type 4A and Type 4B cards over the real udp driver."""

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from edge.config import ProfileConfig, ReaderConfig
from edge.decision import CardRead
from edge.reader.backend import make_reader
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision
from sim.cards import EmulatedCard, felica_card, my_number_card, type4_card
from sim.nfc_card import free_udp_port

TID = "12345678901234"
FELICA = ProfileConfig(kind="felica")
ISO = ProfileConfig(kind="iso_dep", aid="F04343555301", file_id="0001")
IDM = bytes.fromhex("012E4CD300000001")


class Emulator:
    """A card-field process (python -m sim.nfc_card PORT), driven over JSON lines."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "sim.nfc_card", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert "ready" in json.loads(self.proc.stdout.readline() or "{}")

    def tap(self, card: EmulatedCard, hold_ms: int | None = 100) -> bool:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"port": self.port, "tap": card.to_json(),
                                          "hold_ms": hold_ms}) + "\n")
        self.proc.stdin.flush()
        return bool(json.loads(self.proc.stdout.readline() or "{}").get("seen"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Reads:
    def __init__(self, answer: Callable[[CardRead], Any] = lambda r: None) -> None:
        self.reads: list[CardRead] = []
        self.answer = answer
        self.cond = threading.Condition()

    def __call__(self, cfg: ReaderConfig, read: CardRead) -> Any:
        with self.cond:
            self.reads.append(read)
            self.cond.notify_all()
        return self.answer(read)

    def wait(self, n: int, timeout: float = 5.0) -> list[CardRead]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.reads) >= n, timeout)
            return list(self.reads)


@pytest.fixture
def port() -> int:
    return free_udp_port()


@pytest.fixture
def emulator(port: int) -> Iterator[Emulator]:
    em = Emulator(port)
    try:
        yield em
    finally:
        em.close()


def reader(port: int, target: str, profile: ProfileConfig, reads: Reads, **kw: Any) -> Any:
    cfg = ReaderConfig("r", f"udp:127.0.0.1:{port}", targets=[target], **kw)
    r = make_reader(cfg, profile, reads, **{k: v for k, v in kw.items() if k == "feedback"})
    return r


@pytest.mark.parametrize("target,card,profile", [
    ("212F", felica_card(IDM, tid=TID), FELICA),
    ("106A", type4_card(CardTech.ISO_A, bytes.fromhex("04A1B2C3"), tid=TID), ISO),
    ("106A", type4_card(CardTech.ISO_A, bytes.fromhex("04A1B2C3D4E5F6"), tid=TID), ISO),
    ("106A", type4_card(CardTech.ISO_A, bytes.fromhex("04A1B2C3D4E5F6A7B8C9"), tid=TID), ISO),
    ("106B", type4_card(CardTech.ISO_B, bytes.fromhex("A1B2C3D4"), tid=TID), ISO),
    ("106B", type4_card(CardTech.ISO_B, bytes.fromhex("A1B2C3D4"), tid=TID),
     ProfileConfig(kind="uid")),
], ids=["felica", "4a-uid4", "4a-uid7", "4a-uid10", "4b", "4b-uid-profile"])
def test_reads_each_technology(emulator: Emulator, port: int, target: str,
                               card: EmulatedCard, profile: ProfileConfig) -> None:
    reads = Reads()
    r = reader(port, target, profile, reads)
    r.start()
    try:
        assert emulator.tap(card)
        got = reads.wait(1)
    finally:
        r.stop()
    assert len(got) == 1, "a card held 100 ms is one tap"
    assert got[0].card == card.ident and got[0].tech is card.tech and got[0].error is None
    assert got[0].tid == (TID if profile.kind != "uid" else None)
    assert r.health == "ok"


BAD = [
    ("transit card (system 0003)", "212F",
     felica_card(IDM, tid=TID, system_code=0x0003, service_code=0x090F), FELICA, Reason.FOREIGN_CARD),
    ("no such service", "212F", felica_card(IDM, tid=TID, service_code=0x1A8B), FELICA,
     Reason.WRONG_SERVICE),
    ("not digits", "212F", felica_card(IDM, tid="ABCDEFGHIJKLMN"), FELICA, Reason.BAD_CARD_DATA),
    ("My Number card", "106B", my_number_card(), ISO, Reason.FOREIGN_APPLICATION),
    ("no such file", "106A", EmulatedCard(CardTech.ISO_A, b"\x04\x01\x02\x03",
                                          apps={bytes.fromhex("F04343555301"): {}}), ISO,
     Reason.FILE_NOT_FOUND),
    ("truncated file", "106A", type4_card(CardTech.ISO_A, b"\x04\x01\x02\x03",
                                          contents=TID[:9].encode()), ISO, Reason.TRUNCATED_READ),
    ("ISO card on a FeliCa profile", "106B", type4_card(CardTech.ISO_B, b"\x01\x02\x03\x04"),
     FELICA, Reason.WRONG_TECHNOLOGY),
]


@pytest.mark.parametrize("what,target,card,profile,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_cards_are_denials_with_their_reason(emulator: Emulator, port: int, what: str,
                                                 target: str, card: EmulatedCard,
                                                 profile: ProfileConfig, reason: Reason) -> None:
    reads = Reads()
    r = reader(port, target, profile, reads)
    r.start()
    try:
        assert emulator.tap(card)
        got = reads.wait(1)
        if target == "212F":
            good: EmulatedCard | None = felica_card(IDM, tid=TID)
        elif profile.kind == "iso_dep":
            good = type4_card(card.tech, card.ident, tid=TID)
        else:
            good = None                        # no card of this technology fits the profile
        assert emulator.tap(good or card)      # the reader loop goes on after a bad card
        got = reads.wait(2)
    finally:
        r.stop()
    assert got[0].error is reason and got[0].tid is None
    if good is not None:
        assert got[1].error is None and got[1].tid == TID
    else:
        assert got[1].error is reason


def test_held_card_is_one_tap_and_removal_ends_it(emulator: Emulator, port: int) -> None:
    reads = Reads()
    r = reader(port, "106A", ISO, reads)
    r.start()
    card = type4_card(CardTech.ISO_A, bytes.fromhex("04A1B2C3"), tid=TID)
    try:
        assert emulator.tap(card, hold_ms=800)     # ~8 presence checks while held
        assert emulator.tap(card, hold_ms=None)    # removed at the first presence check
        got = reads.wait(2)
        time.sleep(0.2)
    finally:
        r.stop()
    assert len(reads.reads) == 2 and all(g.tid == TID for g in got)


def test_feedback_hook_gets_the_decision(emulator: Emulator, port: int) -> None:
    signals: list[tuple[str, Decision, Reason]] = []
    touch = SimpleNamespace(decision=Decision.DENY, reason=Reason.UNKNOWN_TECHNICIAN)
    reads = Reads(answer=lambda read: touch)
    r = reader(port, "212F", FELICA, reads,
               feedback=lambda name, d, why: signals.append((name, d, why)))
    r.start()
    try:
        assert emulator.tap(felica_card(IDM, tid=TID))
        reads.wait(1)
    finally:
        r.stop()
    # the udp device has no LED or buzzer: the controller board's hook is used
    assert signals == [("r", Decision.DENY, Reason.UNKNOWN_TECHNICIAN)]


def test_field_process_killed_and_back(port: int) -> None:
    reads = Reads()
    r = reader(port, "106B", ISO, reads)
    card = type4_card(CardTech.ISO_B, bytes.fromhex("A1B2C3D4"), tid=TID)
    em = Emulator(port)
    r.start()
    try:
        assert em.tap(card)
        reads.wait(1)
        em.proc.kill()                 # the field vanishes mid-run
        em.proc.wait(5)
        time.sleep(1.5)                # the reader polls into nothing meanwhile
        em = Emulator(port)            # and it comes back on the same port
        assert em.tap(card)
        got = reads.wait(2)
    finally:
        r.stop()
        em.close()
    assert [g.tid for g in got] == [TID, TID]
    assert r._thread.is_alive() is False and r.health == "ok"


def test_reader_that_cannot_open_reports_down_and_retries() -> None:
    reads = Reads()
    healths: list[str] = []
    cfg = ReaderConfig("bad", "tty:ccus-no-such-tty:pn532", targets=["212F"])
    r = make_reader(cfg, FELICA, reads, lambda name, h: healths.append(h))
    r.start()
    try:
        deadline = time.monotonic() + 5
        while r.health != "down" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.health == "down"
        time.sleep(0.8)                 # backoff 0.5 s, then 1 s: it keeps trying
    finally:
        r.stop()
    assert healths[0] == "down" and reads.reads == []


@pytest.mark.parametrize("kind,target,profile,tid,reason", [
    ("4a", "106A", ISO, TID, None),
    ("4b", "106B", ISO, TID, None),
    ("felica", "212F", FELICA, TID, None),
    ("transit", "212F", FELICA, None, Reason.FOREIGN_CARD),
    ("my-number", "106B", ISO, None, Reason.FOREIGN_APPLICATION),
])
def test_ccus_card_emulate(port: int, kind: str, target: str, profile: ProfileConfig,
                           tid: str | None, reason: Reason | None) -> None:
    reads = Reads()
    r = reader(port, target, profile, reads)
    r.start()
    try:
        out = subprocess.run([sys.executable, "-m", "ccus.cli", "card", "emulate", kind,
                              "--port", str(port), "--tid", TID], capture_output=True,
                             text=True, timeout=20)
        got = reads.wait(1)
    finally:
        r.stop()
    assert "tap 1: read by the reader" in out.stdout, out.stderr[-500:]
    assert len(got) == 1 and got[0].tid == tid and got[0].error is reason
