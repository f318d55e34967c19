"""The card side of ISO 14443-4 (Type 4A and 4B) on nfcpy's udp wire: pure frames in and out.

nfcpy's udp driver carries bare frames (no CRC, no framing bits). Type A: SENS_REQ/ALL_REQ,
SDD_REQ and SEL_REQ per cascade level (4, 7 or 10 byte UIDs), RATS -> ATS. Type B:
SENSB_REQ -> SENSB_RES, ATTRIB -> answer. Then ISO-DEP blocks: I-blocks carry APDUs (the
response keeps the block number), R(NAK) is the reader's presence check and gets R(ACK),
S(DESELECT) is echoed. Chaining and WTX are not emulated: the APDUs here are short.
"""

from functools import reduce
from operator import xor

from protocol.touch import CardTech
from sim.cards import EmulatedCard, Iso7816Card

# FWI 7: frame waiting time 4096/13.56 MHz * 2^7 = 38.7 ms. Generous for an emulated card in
# another process, and a removed card is noticed in about that, as with a real one.
FWI = 7
ATS = bytes([0x05, 0x78, 0x80, FWI << 4, 0x02])   # TL, T0 (FSCI 8: 256 bytes), TA, TB, TC


def _bcc(b: bytes) -> int:
    return reduce(xor, b, 0)


class IsoDepCardSide:
    """One emulated Type 4 card in the field: answers reader frames, keeps ISO-DEP state."""

    def __init__(self, card: EmulatedCard) -> None:
        self.card = card
        self.apdu = Iso7816Card(card)

    @staticmethod
    def is_poll(brty: str, frame: bytes) -> bool:
        """A frame with which a reader searches an empty field (nfcpy's sense_tta/ttb)."""
        if brty == "106A":
            return frame in (b"\x26", b"\x52")
        return brty == "106B" and frame[:1] == b"\x05"

    @staticmethod
    def is_presence_check(frame: bytes) -> bool:
        return len(frame) == 1 and frame[0] & 0xFE == 0xB2        # R(NAK)

    def respond(self, brty: str, frame: bytes) -> bytes | None:
        """The card's answer to one frame, or None (silence)."""
        if not frame:
            return None
        tech = self.card.tech
        if brty == "106A" and tech is CardTech.ISO_A:
            answer = self._type_a(frame)
            if answer is not None:
                return answer
        elif brty == "106B" and tech is CardTech.ISO_B:
            if frame[0] == 0x05 and len(frame) >= 3:                  # SENSB_REQ / ALLB_REQ
                return (b"\x50" + self.card.ident + b"\x00\x00\x00\x00"
                        + bytes([0x00, 0x81, FWI << 4 | 0x01]))
            if frame[0] == 0x1D and frame[1:5] == self.card.ident:   # ATTRIB
                self.apdu = Iso7816Card(self.card)
                return b"\x00"
        else:
            return None
        return self._block(frame)

    def _type_a(self, frame: bytes) -> bytes | None:
        uid = self.card.ident
        if frame in (b"\x26", b"\x52"):                               # SENS_REQ / ALL_REQ
            return {4: b"\x04\x00", 7: b"\x44\x00", 10: b"\x84\x00"}[len(uid)]
        levels = {0x93: 0, 0x95: 1, 0x97: 2}
        if len(frame) >= 2 and frame[0] in levels and frame[1] in (0x20, 0x70):
            level = levels[frame[0]]
            last = level == (len(uid) // 3) - 1                      # 4 -> 0, 7 -> 1, 10 -> 2
            part = uid[3 * level: 3 * level + 4] if last else b"\x88" + uid[3 * level: 3 * level + 3]
            if frame[1] == 0x20:                                      # SDD_REQ: UID CLn + BCC
                return part + bytes([_bcc(part)])
            return b"\x20" if last else b"\x04"                       # SEL_RES
        if frame[0] == 0xE0 and len(frame) == 2:                      # RATS
            self.apdu = Iso7816Card(self.card)
            return ATS
        return None                                                   # HLTA and others: silence

    def _block(self, frame: bytes) -> bytes | None:
        pcb = frame[0]
        if pcb & 0xEE == 0x02:                                        # I-block, no CID/NAD
            return bytes([pcb & 0x03 | 0x02]) + self.apdu.respond(frame[1:])
        if pcb & 0xFE == 0xB2:                                        # R(NAK): R(ACK)
            return bytes([0xA2 | pcb & 0x01])
        if pcb == 0xC2:                                               # S(DESELECT)
            return b"\xc2"
        return None
