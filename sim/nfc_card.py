"""The card side of nfcpy's `udp` driver: emulated cards a real nfcpy reader reads.

A CardField owns one UDP port (the reader's device path is `udp:127.0.0.1:PORT`). A card
is presented, read by the reader through nfcpy's own code path, and removed. FeliCa
(Type 3) cards answer polling, Read Without Encryption, Request Response and Request
System Code; Type 4A/4B cards are activated and answer APDUs (emulator_iso).

The udp driver waits 1 s for a poll answer (SENSF_RES, SENS_RES, SENSB_RES) before it polls
again; a card presented in that second answers the poll already pending, as a real card
entering the field answers the next one. A tap with `hold_s=None` leaves the field at the
reader's first presence check after the read: the fastest realistic tap (the benchmark's).
Run fields in their own process (EmulatorProcess) so the reader's millisecond
timeouts are not at the mercy of another process's GIL.
"""

import json
import socket
import struct
import sys
import threading
import time
from binascii import hexlify, unhexlify

from protocol.touch import CardTech
from sim.cards import FELICA_BLOCK, EmulatedCard
from sim.iso_dep import IsoDepCardSide

PENDING_POLL_S = 0.9
DYNAMIC_PORTS = range(49152, 65536)  # a SENSF_REQ younger than this is still being waited for by the reader


class CardField:
    """One emulated RF field on a UDP port; present() a card, it is read, remove() it."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self._card: EmulatedCard | None = None
        self._iso: IsoDepCardSide | None = None
        self._lock = threading.Lock()
        self._pending: tuple[str, bytes, tuple[str, int], float] | None = None
        self._leave_on_presence = False
        self.polls_answered = 0
        self.commands = 0
        self._searching = threading.Event()  # set when the reader polls an empty field
        self._left = threading.Event()       # set when a leave-on-presence card has left
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"field-{self.port}", daemon=True)
        self._thread.start()

    # -- control ------------------------------------------------------------------------
    def present(self, card: EmulatedCard, *, leave_on_presence: bool = False) -> None:
        with self._lock:
            self._card = card
            self._iso = IsoDepCardSide(card) if card.tech is not CardTech.FELICA else None
            self._leave_on_presence = leave_on_presence
            self._left.clear()
            pending, self._pending = self._pending, None
        if pending and time.monotonic() - pending[3] < PENDING_POLL_S:
            self._handle(pending[0], pending[1], pending[2])

    def remove(self) -> None:
        with self._lock:
            self._card = None
            self._iso = None

    def tap(self, card: EmulatedCard, hold_s: float | None = 0.15, timeout_s: float = 5.0) -> bool:
        """Present a card until the reader has polled it, hold it `hold_s`, remove it.

        `hold_s=None`: the card leaves at the reader's first presence check. Returns False if
        no reader polled the card within `timeout_s`.
        """
        before = self.polls_answered
        self._searching.clear()
        self.present(card, leave_on_presence=hold_s is None)
        deadline = time.monotonic() + timeout_s
        while self.polls_answered == before and time.monotonic() < deadline:
            time.sleep(0.0005)
        seen = self.polls_answered > before
        if seen and hold_s is None:
            self._left.wait(max(0.0, deadline - time.monotonic()))
        elif seen:
            time.sleep(hold_s)
        self._searching.clear()
        self.remove()
        if seen:  # the tap ends when the reader has seen the card go and searches again
            self._searching.wait(max(0.0, deadline - time.monotonic()))
        return seen

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    # -- the wire -----------------------------------------------------------------------
    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                raw, addr = self.sock.recvfrom(1024)
            except TimeoutError:
                continue
            except OSError:
                return
            if raw.startswith(b"RFOFF"):
                continue
            try:
                brty, hexdata = raw.split()
                data = unhexlify(hexdata)
            except ValueError:
                continue
            kind = brty.decode("ascii", "replace")
            if kind in ("212F", "424F", "106A", "106B"):
                self._handle(kind, data, addr)

    def _send(self, brty: str, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(brty.encode() + b" " + hexlify(data), addr)

    def _handle(self, brty: str, data: bytes, addr: tuple[str, int]) -> None:
        if brty.endswith("F"):
            self._handle_felica(brty, data, addr)
        else:
            self._handle_iso(brty, data, addr)

    def _leave(self) -> None:
        """A leave-on-presence card goes: it keeps silent from the presence check on."""
        self._card, self._iso = None, None
        self._left.set()

    def _handle_iso(self, brty: str, data: bytes, addr: tuple[str, int]) -> None:
        with self._lock:
            iso = self._iso
            if iso is None:
                if IsoDepCardSide.is_poll(brty, data):
                    self._pending = (brty, data, addr, time.monotonic())
                    self._searching.set()
                return
            if self._leave_on_presence and iso.is_presence_check(data):
                self._leave()
                return
            rsp = iso.respond(brty, data)
            if rsp is None:
                return
            if IsoDepCardSide.is_poll(brty, data):
                self.polls_answered += 1
            self.commands += 1
        self._send(brty, rsp, addr)

    def _handle_felica(self, brty: str, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 2 or data[0] != len(data):
            return
        with self._lock:
            card = self._card
            if card is None or card.tech is not CardTech.FELICA:
                # A wildcard poll is the reader searching (nfcpy's SENSF_REQ); a poll for one
                # system code is its presence check of the card just removed: not a search.
                if data[1] == 0x00 and data[2:4] == b"\xff\xff":
                    self._pending = (brty, data, addr, time.monotonic())
                    self._searching.set()
                return
            # presence checks: Request Response (FeliCa Standard), polling for one system code
            if self._leave_on_presence and (data[1] == 0x04 or (
                    data[1] == 0x00 and data[2:4] != b"\xff\xff")):
                self._leave()
                return
            rsp = felica_response(card, data)
            if rsp is None:
                return
            if data[1] == 0x00:
                self.polls_answered += 1
            self.commands += 1
        self._send(brty, rsp, addr)


def felica_response(card: EmulatedCard, cmd: bytes) -> bytes | None:
    """A FeliCa card's answer to one command frame (length byte first), or None (silence)."""
    code = cmd[1]
    if code == 0x00 and len(cmd) == 6:  # polling: system code (big-endian), request code
        sc, rc = struct.unpack(">H", cmd[2:4])[0], cmd[4]
        if sc != 0xFFFF and sc != card.system_code:
            return None
        body = b"\x01" + card.ident + card.pmm
        if rc == 1:
            body += struct.pack(">H", card.system_code)
        return bytes([len(body) + 1]) + body
    if len(cmd) < 10 or cmd[2:10] != card.ident:
        return None
    args = cmd[10:]
    if code == 0x04:  # request response: mode 0
        body = b"\x05" + card.ident + b"\x00"
    elif code == 0x0C:  # request system code
        body = b"\x0d" + card.ident + b"\x01" + struct.pack(">H", card.system_code)
    elif code == 0x06:
        body = b"\x07" + card.ident + _read_without_encryption(card, args)
    else:
        return None
    return bytes([len(body) + 1]) + body


def _read_without_encryption(card: EmulatedCard, args: bytes) -> bytes:
    """Status flags (and blocks): 0xA1 unknown service, 0xA2 bad block count, 0xA8 bad block."""
    try:
        n_svc = args[0]
        services = [struct.unpack("<H", args[1 + 2 * i: 3 + 2 * i])[0] for i in range(n_svc)]
        pos = 1 + 2 * n_svc
        n_blk = args[pos]
        pos += 1
        if not 1 <= n_blk <= 15:
            return b"\xff\xa2"
        out = bytearray()
        for _ in range(n_blk):
            head = args[pos]
            if head & 0x80:
                number, pos = args[pos + 1], pos + 2
            else:
                number, pos = struct.unpack("<H", args[pos + 1: pos + 3])[0], pos + 3
            sc = services[head & 0x0F]
            blocks = card.services.get(sc)
            if blocks is None:
                return b"\xff\xa1"
            if number >= len(blocks):
                return b"\xff\xa8"
            out += blocks[number]
        assert all(len(out[i:i + FELICA_BLOCK]) == FELICA_BLOCK for i in range(0, len(out), 16))
        return b"\x00\x00" + bytes([n_blk]) + bytes(out)
    except (IndexError, struct.error):
        return b"\xff\xa1"


def free_udp_port() -> int:
    """A free UDP port >= 49152 with no name in /etc/services (nfcpy's udp driver crashes on
    ports that resolve to a service name)."""
    import random

    for _ in range(200):
        port = random.choice(DYNAMIC_PORTS)
        try:
            socket.getservbyport(port, "udp")
            continue  # has a name: nfcpy would choke on it
        except OSError:
            pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free UDP port in 49152..65535")


# -- a process of fields, driven over stdin/stdout (JSON lines) ------------------------------

def serve_stdio(ports: list[int]) -> None:
    """`{"tap": {...card...}, "port": P, "hold_ms": 150}` -> `{"port": P, "seen": true}`.

    `"hold_ms": null`: the card leaves at the reader's first presence check.
    """
    fields = {p: CardField(p) for p in ports}
    print(json.dumps({"ready": [f.port for f in fields.values()]}), flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            field = fields[int(req["port"])]
            card = EmulatedCard.from_json(req["tap"])
            hold = req.get("hold_ms", 150)
            seen = field.tap(card, hold_s=None if hold is None else hold / 1000)
            print(json.dumps({"port": field.port, "seen": seen}), flush=True)
        except (ValueError, KeyError, TypeError) as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
    for f in fields.values():
        f.close()


if __name__ == "__main__":
    serve_stdio([int(p) for p in sys.argv[1:]])
