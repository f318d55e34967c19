"""The PC/SC backend through the real stack: pyscard -> pcscd -> vsmartcard-vpcd -> a virtual card.

The fixture installs Debian's pcscd and vsmartcard-vpcd if they are missing (root, apt-get),
starts `pcscd --foreground` for this module and kills it afterwards. The card side is
sim.vpcd (the vpcd socket protocol on localhost:35963).
"""

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.procs import poll_until, stop_process
from edge.config import ProfileConfig, ReaderConfig
from edge.decision import CardRead
from edge.reader.backend import make_reader
from protocol.reasons import Reason
from protocol.touch import CardTech
from sim.cards import EmulatedCard, felica_card, my_number_card, type4_card
from sim.vpcd import VPCD_PORT, VpcdCard

try:
    import smartcard  # noqa: F401 - pyscard: only its presence is checked here
except ImportError:  # a set-up error, never a skip: ./dev.sh test installs pyscard
    pytest.fail("pyscard is not installed: run ./dev.sh setup", pytrace=False)

TID = "12345678901234"
FELICA = ProfileConfig(kind="felica")
ISO = ProfileConfig(kind="iso_dep", aid="F04343555301", file_id="0001")
IDM = bytes.fromhex("012E4CD300000001")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ensure_packages() -> str:
    pcscd = shutil.which("pcscd") or "/usr/sbin/pcscd"
    if not os.path.exists(pcscd) or not VPCD_DRIVER.exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("pcscd and vsmartcard-vpcd are missing: apt-get install pcscd vsmartcard-vpcd")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "pcscd",
                        "vsmartcard-vpcd"], check=True, env=env, timeout=300)
    return pcscd


class Pcscd:
    def __init__(self, exe: str, log: Path) -> None:
        self.exe, self.log = exe, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if _port_open(VPCD_PORT):
            pytest.fail("another pcscd with vpcd is already running (port 35963 is taken)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "--foreground"], stdout=subprocess.DEVNULL,
                                         stderr=log)
        deadline = time.monotonic() + 10
        while not _port_open(VPCD_PORT):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop_process(self.proc)      # never left behind holding /run/pcscd
                holder = subprocess.run(["ss", "-tanp", f"sport = :{VPCD_PORT}"],
                                        capture_output=True, text=True).stdout.strip()
                pytest.fail(f"pcscd did not start: {self.log.read_text()[-500:]}; "
                            f"port {VPCD_PORT} now: {holder or '(ss unavailable)'}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        deadline = time.monotonic() + 5
        while _port_open(VPCD_PORT) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    d = Pcscd(_ensure_packages(), tmp_path_factory.mktemp("pcscd") / "pcscd.log")
    d.start()
    try:
        yield d
    finally:
        d.stop()


class Reads:
    def __init__(self) -> None:
        self.reads: list[CardRead] = []
        self.cond = threading.Condition()

    def __call__(self, cfg: ReaderConfig, read: CardRead) -> None:
        with self.cond:
            self.reads.append(read)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list[CardRead]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.reads) >= n, timeout)
            return list(self.reads)


def tap(card: EmulatedCard, reads: Reads, n: int, hold_s: float = 0.1) -> list[CardRead]:
    """Insert, wait for the n-th read, hold, remove, and let pcscd see the slot empty."""
    vc = VpcdCard(card)
    vc.insert()
    try:
        got = reads.wait(n, 5.0)
        time.sleep(hold_s)
    finally:
        vc.remove()
    time.sleep(0.6)     # pcscd polls the virtual slot every 400 ms: let it see the removal
    return got


def pcsc_reader(profile: ProfileConfig, reads: Reads, health: list[str] | None = None) -> Any:
    cfg = ReaderConfig("p", "pcsc:Virtual PCD 00 00", backend="pcsc")
    return make_reader(cfg, profile, reads, (lambda n, h: health.append(h)) if health is not None
                       else None)


CASES = [
    ("felica", felica_card(IDM, tid=TID), FELICA, TID, None),
    ("4a", type4_card(CardTech.ISO_A, bytes.fromhex("04A1B2C3D4E5F6"), tid=TID), ISO, TID, None),
    ("4b", type4_card(CardTech.ISO_B, bytes.fromhex("A1B2C3D4"), tid=TID), ISO, TID, None),
    ("uid", felica_card(IDM), ProfileConfig(kind="uid"), None, None),
    ("my-number", my_number_card(), ISO, None, Reason.FOREIGN_APPLICATION),
    ("transit", felica_card(IDM, tid=TID, system_code=3, service_code=0x090F), FELICA, None,
     Reason.WRONG_SERVICE),
    ("felica-on-iso-profile", felica_card(IDM, tid=TID), ISO, None, Reason.WRONG_TECHNOLOGY),
    ("truncated", type4_card(CardTech.ISO_B, bytes.fromhex("A1B2C3D4"), contents=b"1234"), ISO,
     None, Reason.TRUNCATED_READ),
]


@pytest.mark.parametrize("what,card,profile,tid,reason", CASES, ids=[c[0] for c in CASES])
def test_pcsc_reads(pcscd: Pcscd, what: str, card: EmulatedCard, profile: ProfileConfig,
                    tid: str | None, reason: Reason | None) -> None:
    reads = Reads()
    r = pcsc_reader(profile, reads)
    r.start()
    try:
        got = tap(card, reads, 1)
    finally:
        r.stop()
    assert len(got) == 1
    assert got[0].card == card.ident and got[0].tech is card.tech
    assert got[0].tid == tid and got[0].error is reason


def test_pcsc_held_card_is_one_tap(pcscd: Pcscd) -> None:
    reads = Reads()
    r = pcsc_reader(FELICA, reads)
    r.start()
    card = felica_card(IDM, tid=TID)
    try:
        tap(card, reads, 1, hold_s=1.5)     # held over several pcscd polls
        got = tap(card, reads, 2)           # removed and tapped again: a second tap
    finally:
        r.stop()
    assert len(got) == 2 and [g.tid for g in got] == [TID, TID]


def test_pcscd_restart_is_reported_and_recovered(pcscd: Pcscd) -> None:
    reads, health = Reads(), []
    r = pcsc_reader(FELICA, reads, health)
    r.start()
    card = felica_card(IDM, tid=TID)
    try:
        assert poll_until(lambda: r.health == "ok", 5)
        tap(card, reads, 1)
        pcscd.stop()
        assert poll_until(lambda: r.health == "down", 5), "pcscd stopped: the reader is down"
        pcscd.start()
        assert poll_until(lambda: r.health == "ok", 15), "pcscd back: the reader recovers"
        got = tap(card, reads, 2)
    finally:
        r.stop()
    assert [g.tid for g in got] == [TID, TID]
    assert health[:3] == ["ok", "down", "ok"]
    assert not r._thread.is_alive()


def test_pcsc_feedback_hook_and_acr122_signals(pcscd: Pcscd) -> None:
    from types import SimpleNamespace

    from edge.reader.pcsc_backend import ACR122_ALLOW, ACR122_DENY
    from protocol.touch import Decision
    from sim.vpcd import PcscCardSide

    signals: list[tuple[str, Decision, Reason]] = []
    deny = SimpleNamespace(decision=Decision.DENY, reason=Reason.UNKNOWN_CARD)
    cfg = ReaderConfig("p", "pcsc:Virtual PCD 00 00", backend="pcsc")
    reads = Reads()

    def answer(c: ReaderConfig, read: CardRead) -> SimpleNamespace:
        reads(c, read)
        return deny

    r = make_reader(cfg, ProfileConfig(kind="uid"), answer,
                    feedback=lambda name, d, why: signals.append((name, d, why)))
    r.start()
    try:
        tap(felica_card(IDM), reads, 1)
    finally:
        r.stop()
    # the virtual reader is no ACR122: the controller board's hook signals
    assert signals == [("p", Decision.DENY, Reason.UNKNOWN_CARD)]
    # an ACR122U gets its LED/buzzer pseudo-APDU instead, through the card connection
    side = PcscCardSide(felica_card(IDM))
    r.reader_name = "ACS ACR122U PICC Interface 00 00"
    r._feedback(deny, side.respond)
    r._feedback(SimpleNamespace(decision=Decision.ALLOW, reason=Reason.OK), side.respond)
    assert side.signals == [ACR122_DENY, ACR122_ALLOW] and len(signals) == 1


def test_ccus_card_emulate_pcsc(pcscd: Pcscd) -> None:
    import subprocess as sp
    import sys

    reads = Reads()
    r = pcsc_reader(ISO, reads)
    r.start()
    try:
        out = sp.run([sys.executable, "-m", "ccus.cli", "card", "emulate", "4b", "--pcsc",
                      "--tid", TID, "--hold", "1.0"], capture_output=True, text=True, timeout=30)
        got = reads.wait(1)
    finally:
        r.stop()
    time.sleep(0.6)    # let pcscd see the slot empty before the next test
    assert "tap 1: read by the reader" in out.stdout, out.stderr[-500:]
    assert len(got) == 1 and got[0].tid == TID and got[0].tech is CardTech.ISO_B
