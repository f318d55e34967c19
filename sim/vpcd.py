"""A virtual PC/SC card: the card side of vsmartcard's vpcd socket protocol, for tests and the demo.

pcscd with Debian's vsmartcard-vpcd driver shows a reader "Virtual PCD 00 00" and listens on
localhost:35963 for the card. A card connected there is in the reader; disconnecting removes
it. Every message is a 2-byte big-endian length and a payload; a 1-byte payload from vpcd is
control (0 power off, 1 power on, 2 reset, 4 send the ATR), anything else an APDU to answer.

Behind a contactless PC/SC reader the reader itself answers some pseudo-APDUs (class FF); the
virtual card plays reader and card together: GET DATA UID (FF CA 00 00 00), the PC/SC Part 3
FeliCa storage-card commands (SELECT FILE FF A4 00 01 02 <service, little-endian>, READ BINARY
FF B0 00 <block> 10), and records ACR122U LED/buzzer commands (FF 00 40 ...).
"""

import contextlib
import socket
import struct
import threading
import time

from protocol.touch import CardTech
from sim.cards import FELICA_BLOCK, EmulatedCard, Iso7816Card

VPCD_PORT = 35963


def _atr(hist: bytes) -> bytes:
    """3B 8n 80 01 <historical bytes> TCK (PC/SC Part 3 contactless ATR)."""
    body = bytes([0x80 | len(hist), 0x80, 0x01]) + hist
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3b" + body + bytes([tck])


def atr_for(card: EmulatedCard) -> bytes:
    if card.tech is CardTech.FELICA:   # storage card: RID A000000306, SS 11 (FeliCa), NN 003B
        return _atr(bytes.fromhex("804F0CA0000003061100" "3B00000000"))
    if card.tech is CardTech.ISO_B:    # ATQB application data, protocol info, MBLI
        return _atr(b"\x00\x00\x00\x00" + bytes([0x00, 0x81, 0x71]) + b"\x00")
    return _atr(bytes.fromhex("80318065"))  # ATS historical bytes of a Type 4A card


class PcscCardSide:
    """What the reader+card pair answers to one APDU (pure, no I/O)."""

    def __init__(self, card: EmulatedCard) -> None:
        self.card = card
        self.iso = Iso7816Card(card)
        self.service: tuple[bytes, ...] | None = None
        self.signals: list[bytes] = []     # ACR122U-style LED/buzzer commands received

    def respond(self, apdu: bytes) -> bytes:
        if apdu[:2] == b"\xff\xca":                              # GET DATA: UID / IDm
            if len(apdu) < 4:
                return b"\x67\x00"                               # wrong length
            return self.card.ident + b"\x90\x00" if apdu[2] == 0 else b"\x6a\x81"
        if apdu[:3] == b"\xff\x00\x40":                          # ACR122U LED and buzzer
            self.signals.append(bytes(apdu))
            return b"\x90\x00"
        if self.card.tech is CardTech.FELICA:
            return self._felica(apdu)
        return self.iso.respond(apdu)

    def _felica(self, apdu: bytes) -> bytes:
        if apdu[:4] == b"\xff\xa4\x00\x01" and len(apdu) >= 7:   # SELECT FILE: service code
            code = struct.unpack("<H", apdu[5:7])[0]
            self.service = self.card.services.get(code)
            return b"\x90\x00" if self.service is not None else b"\x6a\x82"
        if apdu[:2] == b"\xff\xb0" and len(apdu) == 5:            # READ BINARY one block
            if self.service is None:
                return b"\x69\x86"
            block = apdu[2] << 8 | apdu[3]
            if block >= len(self.service):
                return b"\x6a\x82"
            return self.service[block][: apdu[4] or FELICA_BLOCK] + b"\x90\x00"
        return b"\x6d\x00"


class VpcdCard:
    """A card in the virtual reader while `insert()`ed; `remove()` takes it out."""

    def __init__(self, card: EmulatedCard, host: str = "127.0.0.1", port: int = VPCD_PORT) -> None:
        self.side = PcscCardSide(card)
        self.addr = (host, port)
        self.apdus: list[bytes] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def insert(self, timeout_s: float = 5.0) -> None:
        """Connect to vpcd (pcscd must be running); raises OSError if it is not there."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock = socket.create_connection(self.addr, timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._thread = threading.Thread(target=self._serve, args=(self._sock,), daemon=True,
                                        name="vpcd-card")
        self._thread.start()

    def remove(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None

    def wait_apdus(self, n: int, timeout_s: float) -> bool:
        """Until the reader has sent at least n APDUs to this card."""
        deadline = time.monotonic() + timeout_s
        while len(self.apdus) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.apdus) >= n

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        try:
            while True:
                head = _recv_exact(sock, 2)
                if head is None:
                    return
                msg = _recv_exact(sock, struct.unpack(">H", head)[0])
                if msg is None:
                    return
                if len(msg) == 1:
                    if msg[0] == 4:                               # ATR request
                        _send(sock, atr_for(self.side.card))
                    elif msg[0] in (0, 1, 2):                     # power off / on / reset
                        self.side = PcscCardSide(self.side.card) if msg[0] == 2 else self.side
                    continue
                self.apdus.append(msg)
                _send(sock, self.side.respond(msg))
        except OSError:
            return


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack(">H", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
