"""A vending machine controller (VMC) simulator: the MDB master side that drives a cashless
reader (firmware/mdb.py) over the documented 9-bit word encoding, on a real pty or in process.

What it does: the setup sequence (RESET, POLL for JUST RESET, SETUP config data, SETUP
max/min price, EXPANSION request id, READER ENABLE), polling, selections (VEND REQUEST),
VEND SUCCESS / FAILURE, VEND CANCEL, SESSION COMPLETE, RESET mid-vend, out-of-sequence
commands; RET when a reply's checksum is bad, a resend when the reader NAKs or is silent.
Profiles (PROFILES): `standard`, `setup_twice` (a VMC that sends SETUP config data twice, as
MateDealer notes for a Sanden VDI 100-5), `slow` (long gaps between polls, bytes of a command
0.9 ms apart: just inside MDB's 1 ms inter-byte maximum), `fast` (the shortest timing MDB 4.2
section 3 allows: the next command right after the reply and its ACK, no pause between polls,
a command's bytes back to back, VEND REQUEST immediately after BEGIN SESSION; how long it keeps
polling for a decision is the reader's announced max response time, not a poll count).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware import mdb

# poll_gap: s between POLLs while waiting (None: 5 ms); byte_gap: s between the words of one
# command; fast: poll back to back for up to the reader's max response time.
PROFILES: dict[str, dict[str, object]] = {
    "standard": {"setup_twice": False, "poll_gap": None, "byte_gap": 0.0, "fast": False},
    "setup_twice": {"setup_twice": True, "poll_gap": None, "byte_gap": 0.0, "fast": False},
    "slow": {"setup_twice": False, "poll_gap": 0.2, "byte_gap": 0.0009, "fast": False},
    "fast": {"setup_twice": False, "poll_gap": 0.0, "byte_gap": 0.0, "fast": True},
}


class VmcError(Exception):
    """The reader did not answer as MDB requires (no reply after retries, a bad block)."""


def _block_ok(r: list[int]) -> bool:
    """A lone ACK, or data whose last word (mode bit set) is their checksum."""
    if not r or not r[-1] & mdb.MODE:
        return False
    return len(r) == 1 or mdb.checksum(bytes(w & 0xFF for w in r[:-1])) == r[-1] & 0xFF


@dataclass
class Reply:
    words: list[int]

    @property
    def ack(self) -> bool:
        return self.words == [mdb.MODE | mdb.ACK]

    @property
    def data(self) -> bytes:
        return bytes(w & 0xFF for w in self.words[:-1])

    @property
    def code(self) -> int | None:
        return None if self.ack or not self.words else self.words[0] & 0xFF


class InProcess:
    """A transport straight into a Reader (no pty): for property tests and quick runs."""

    def __init__(self, reader: mdb.Reader, clock: Callable[[], int] | None = None) -> None:
        self.reader = reader
        self.clock = clock or (lambda: int(time.monotonic() * 1000))
        self._pending: list[int] = []

    def write(self, words: list[int]) -> None:
        now = self.clock()
        for w in words:
            self._pending.extend(self.reader.word(w, now))

    def read(self, timeout: float) -> list[int]:
        out, self._pending = self._pending, []
        return out


class PtyWire:
    """The VMC end of a pty: words in the two-byte encoding (flag, data)."""

    def __init__(self, fd: int, byte_gap: float = 0.0) -> None:
        self.fd = fd
        self.dec = mdb.WordDecoder()
        self.byte_gap = byte_gap  # set from the VMC's profile

    def write(self, words: list[int]) -> None:
        if not self.byte_gap or len(words) == 1:
            os.write(self.fd, mdb.encode_words(words))
            return
        for i, w in enumerate(words):  # one word at a time, as a UART with gaps would
            if i:
                time.sleep(self.byte_gap)
            os.write(self.fd, mdb.encode_words([w]))

    def read(self, timeout: float) -> list[int]:
        """Words until one with the mode bit (end of a reply) or the timeout."""
        out: list[int] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return out
            out.extend(self.dec.feed(os.read(self.fd, 64)))
            if out and out[-1] & mdb.MODE:
                return out

    def drain(self) -> None:
        while select.select([self.fd], [], [], 0.0)[0]:
            os.read(self.fd, 4096)


@dataclass
class Vmc:
    wire: InProcess | PtyWire
    profile: str = "standard"
    reply_timeout: float = 0.05  # MDB: 5 ms; the unix port on a loaded pty needs slack
    retries: int = 3
    log: list[str] = field(default_factory=list)
    funds: int | None = None  # from BEGIN SESSION
    rets: int = 0
    resends: int = 0
    polls: int = 0
    max_response_s: float = 5.0  # from READER CONFIG DATA: how long a decision may take

    def __post_init__(self) -> None:
        if isinstance(self.wire, PtyWire):
            self.wire.byte_gap = float(PROFILES[self.profile]["byte_gap"])  # type: ignore[arg-type]

    # ------------------------------------------------------------ one exchange

    def send(self, data: bytes | list[int], ack_data: bool = True) -> Reply:
        """One command; retransmits on NAK / silence, RET on a bad checksum; ACKs data."""
        words = mdb.command_words(list(data))
        for _ in range(self.retries + 1):
            self.wire.write(words)
            r = self.wire.read(self.reply_timeout)
            if not r or r == [mdb.NAK]:
                self.resends += 1
                continue
            for _ in range(self.retries):
                if _block_ok(r):
                    break
                self.rets += 1
                self.wire.write([mdb.RET])
                r = self.wire.read(self.reply_timeout)
            else:
                raise VmcError(f"bad reply block {r!r} after {self.retries} RETs")
            rep = Reply(r)
            if not rep.ack and ack_data:
                self.wire.write([mdb.ACK])
            self.log.append(f"{bytes(data).hex()} -> {bytes(w & 0xFF for w in r).hex()}")
            return rep
        raise VmcError(f"no reply to {bytes(data).hex()} after {self.retries + 1} tries")

    # ------------------------------------------------------------ commands

    def reset(self) -> Reply:
        return self.send([0x10])

    def poll(self) -> Reply:
        self.polls += 1
        r = self.send([0x12])
        if r.code == mdb.P_BEGIN_SESSION:
            self.funds = (r.data[1] << 8) | r.data[2]
        elif r.code in (mdb.P_SESSION_CANCEL, mdb.P_END_SESSION):
            self.funds = None
        return r

    def setup(self, max_price: int = 1000, min_price: int = 0) -> Reply:
        """RESET, JUST RESET, config data (twice in the setup_twice profile), prices, id, enable."""
        self.reset()
        for _ in range(10):
            if self.poll().code == mdb.P_JUST_RESET:
                break
        twice = bool(PROFILES[self.profile]["setup_twice"])
        cfg = self.send([0x11, 0x00, 0x01, 0x00, 0x00, 0x00])
        if twice:
            cfg = self.send([0x11, 0x00, 0x01, 0x00, 0x00, 0x00])
        if cfg.code == mdb.P_CONFIG and len(cfg.data) >= 7 and cfg.data[6]:
            self.max_response_s = float(cfg.data[6])
        self.send([0x11, 0x01, *mdb.u16(max_price), *mdb.u16(min_price)])
        self.send([0x17, 0x00, *b"VMC", *b"000000000001", *b"CCUS-VMC-SIM", 0, 1])
        self.send([0x14, 0x01])
        return cfg

    def poll_until(self, codes: tuple[int, ...], polls: int = 200) -> Reply:
        prof = PROFILES[self.profile]
        gap = 0.005 if prof["poll_gap"] is None else float(prof["poll_gap"])  # type: ignore[arg-type]
        if prof["fast"]:  # back to back, for as long as the slower profiles would wait at least
            deadline = time.monotonic() + max(polls * 0.005, self.max_response_s)
            while time.monotonic() < deadline:
                r = self.poll()
                if r.code in codes:
                    return r
            raise VmcError(f"no poll reply in {[hex(c) for c in codes]} within "
                           f"{max(polls * 0.005, self.max_response_s):.1f} s of back-to-back polls")
        for _ in range(polls):
            r = self.poll()
            if r.code in codes:
                return r
            time.sleep(gap)
        raise VmcError(f"no poll reply in {[hex(c) for c in codes]} after {polls} polls")

    def vend_request(self, item: int, price: int) -> Reply:
        return self.send([0x13, 0x00, *mdb.u16(price), *mdb.u16(item)])

    def vend_success(self, item: int) -> Reply:
        return self.send([0x13, 0x02, *mdb.u16(item)])

    def vend_failure(self) -> Reply:
        return self.send([0x13, 0x03])

    def vend_cancel(self) -> Reply:
        return self.send([0x13, 0x01])

    def session_complete(self) -> Reply:
        return self.send([0x13, 0x04])

    def reader_disable(self) -> Reply:
        return self.send([0x14, 0x00])

    # ------------------------------------------------------------ a whole selection

    def select(self, item: int, price: int, dispense: bool = True) -> str:
        """After BEGIN SESSION: choose item; vend if approved; report; complete the session.
        Returns "dispensed", "failed" or "denied"."""
        self.vend_request(item, price)
        r = self.poll_until((mdb.P_VEND_APPROVED, mdb.P_VEND_DENIED))
        if r.code == mdb.P_VEND_DENIED:
            outcome = "denied"
        elif dispense:
            self.vend_success(item)
            outcome = "dispensed"
        else:
            self.vend_failure()
            outcome = "failed"
        self.session_complete()
        return outcome
