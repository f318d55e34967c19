"""Pure card-data codecs: command frames out, response bytes in, a technician ID or a Reason.

Nothing here does I/O. Every decoder takes arbitrary bytes and returns a value or a Reason;
none raises, whatever the card sent (the hypothesis tests hold them to that).
"""

import re
import struct

from edge.config import ProfileConfig
from protocol.reasons import Reason
from protocol.touch import CardTech

DIGITS = re.compile(rb"[0-9]+\Z")
FELICA_BLOCK = 16
SW_OK = b"\x90\x00"


# -- the technician ID inside the bytes read ----------------------------------------------

def decode_tid(data: bytes, p: ProfileConfig) -> str | Reason:
    """The 14-digit technician ID laid out in `data` as the profile says, or why not.

    ascii: `length` ASCII digits at `offset`; bcd: `length` digits, two a byte, high nibble
    first, at `offset`. Too few bytes is TRUNCATED_READ; anything else BAD_CARD_DATA.
    """
    if p.encoding == "ascii":
        raw = data[p.offset: p.offset + p.length]
        if len(raw) < p.length:
            return Reason.TRUNCATED_READ
        if p.length != 14 or not DIGITS.match(raw):
            return Reason.BAD_CARD_DATA
        return raw.decode("ascii")
    need = (p.length + 1) // 2
    raw = data[p.offset: p.offset + need]
    if len(raw) < need:
        return Reason.TRUNCATED_READ
    digits = "".join(f"{b >> 4:x}{b & 0x0F:x}" for b in raw)[: p.length]
    if p.length != 14 or not digits.isdigit():
        return Reason.BAD_CARD_DATA
    return digits


# -- FeliCa Read Without Encryption --------------------------------------------------------

def felica_read_command(idm: bytes, service_code: int, first_block: int, count: int) -> bytes:
    """The Read Without Encryption frame (length byte first) for `count` blocks of one service."""
    blocks = b""
    for n in range(first_block, first_block + count):
        # 2-byte block list element for block numbers < 256, 3-byte one above
        blocks += bytes([0x80, n]) if n < 256 else b"\x00" + struct.pack("<H", n)
    body = b"\x06" + idm + b"\x01" + struct.pack("<H", service_code) + bytes([count]) + blocks
    return bytes([len(body) + 1]) + body


def decode_felica_read(frame: bytes, idm: bytes, count: int) -> bytes | Reason:
    """A Read Without Encryption response frame -> the block data, or why not.

    Status flag 1 != 0: A1/A6 (no such service / bad service attribute) and B1 (needs
    authentication) are WRONG_SERVICE; other status errors, a wrong IDm or response code are
    BAD_RESPONSE; fewer blocks than asked for is TRUNCATED_READ.
    """
    frame = bytes(frame)
    if not frame or frame[0] > len(frame):
        return Reason.TRUNCATED_READ  # the length byte promises more than arrived
    if frame[0] != len(frame) or len(frame) < 12 or frame[1] != 0x07 or frame[2:10] != idm:
        return Reason.BAD_RESPONSE
    sf1, sf2 = frame[10], frame[11]
    if sf1 != 0:
        return Reason.WRONG_SERVICE if sf2 in (0xA1, 0xA6, 0xB1) else Reason.BAD_RESPONSE
    if len(frame) < 13:
        return Reason.TRUNCATED_READ
    n = frame[12]
    data = frame[13:]
    if n != count:
        return Reason.TRUNCATED_READ if n < count else Reason.BAD_RESPONSE
    if len(data) != FELICA_BLOCK * count:
        return Reason.TRUNCATED_READ if len(data) < FELICA_BLOCK * count else Reason.BAD_RESPONSE
    return data


# -- ISO 7816-4 APDUs (Type 4 over ISO-DEP, and PC/SC) -------------------------------------

def select_aid(aid: bytes) -> bytes:
    return bytes([0x00, 0xA4, 0x04, 0x00, len(aid)]) + aid + b"\x00"


def select_file(fid: bytes) -> bytes:
    return bytes([0x00, 0xA4, 0x02, 0x0C, len(fid)]) + fid


def read_binary(offset: int, length: int) -> bytes:
    return bytes([0x00, 0xB0, offset >> 8 & 0x7F, offset & 0xFF, length & 0xFF])


def sw_reason(sw: bytes, step: str) -> Reason:
    """The reason for a status word other than 9000 at `step`.

    Steps: select_aid, select_file, read (ISO-DEP); select_service (PC/SC FeliCa); get_uid.
    """
    if sw in (b"\x6a\x82", b"\x6a\x83", b"\x6a\x86", b"\x6a\x87"):
        if step == "select_service":
            return Reason.WRONG_SERVICE
        if step == "get_uid":
            return Reason.BAD_RESPONSE
        if step == "select_aid":
            return Reason.FOREIGN_APPLICATION
        if step == "select_file":
            return Reason.FILE_NOT_FOUND
        return Reason.TRUNCATED_READ  # beyond the end of the file
    if sw in (b"\x69\x82", b"\x69\x85", b"\x69\x83", b"\x69\x88"):
        return Reason.ACCESS_DENIED
    if sw[:1] == b"\x6b" or sw == b"\x62\x82":  # offset outside the EF / end of file reached
        return Reason.TRUNCATED_READ
    return Reason.BAD_RESPONSE


def check_apdu(rsp: bytes, step: str) -> bytes | Reason:
    """An APDU response (data + SW1 SW2) -> its data when SW is 9000, else the reason."""
    rsp = bytes(rsp)
    if len(rsp) < 2:
        return Reason.BAD_RESPONSE
    sw = rsp[-2:]
    if sw == SW_OK:
        return rsp[:-2]
    if step == "read" and sw == b"\x62\x82" and len(rsp) > 2:
        return rsp[:-2]  # "end of file reached before Le": the data is short, decode_tid says so
    return sw_reason(sw, step)


# -- PC/SC answer to reset (PC/SC Part 3, contactless cards) -------------------------------

PCSC_STORAGE_RID = bytes.fromhex("A000000306")


def atr_tech(atr: bytes) -> CardTech:
    """The card technology from a contactless reader's ATR.

    Storage cards carry the PC/SC RID and a standard byte (0x11/0x12 FeliCa, 0x03 ISO 14443A
    part 3). ISO-DEP cards carry historical bytes: for Type B they are the ATQB application
    data, protocol info and MBLI (8 bytes, protocol type nibble 1); for Type A the ATS's.
    That Type A/B split is a heuristic: PC/SC has no standard field for it.
    """
    atr = bytes(atr)
    if len(atr) < 4 or atr[0] != 0x3B:
        return CardTech.UNKNOWN
    i = atr.find(PCSC_STORAGE_RID)
    if i >= 0 and len(atr) > i + 5:
        ss = atr[i + 5]
        if ss in (0x11, 0x12):
            return CardTech.FELICA
        if ss in (0x01, 0x02, 0x03):
            return CardTech.ISO_A
        return CardTech.UNKNOWN
    hist_len = atr[1] & 0x0F
    hist = atr[4: 4 + hist_len] if atr[2:4] == b"\x80\x01" else b""
    if hist_len == 8 and len(hist) == 8 and hist[5] & 0x0F == 0x01:
        return CardTech.ISO_B
    return CardTech.ISO_A
