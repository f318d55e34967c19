"""Property tests of every card decoder: any bytes in, a technician ID or a reason out, never a raise."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import ProfileConfig
from edge.reader.decode import (
    atr_tech,
    check_apdu,
    decode_felica_read,
    decode_tid,
    felica_read_command,
)
from edge.reader.pcsc_backend import read_pcsc_card
from edge.reader.profiles import apply_iso_dep
from protocol.reasons import Reason
from protocol.touch import TECHNICIAN_ID, CardTech
from sim.cards import EmulatedCard, Iso7816Card, type4_card
from sim.iso_dep import IsoDepCardSide
from sim.nfc_card import felica_response
from sim.vpcd import PcscCardSide, atr_for

IDM = bytes.fromhex("0102030405060708")
ASCII = ProfileConfig(kind="felica")
BCD = ProfileConfig(kind="felica", encoding="bcd")
ISO = ProfileConfig(kind="iso_dep", aid="F04343555301", file_id="0001")
tids = st.integers(0, 10**14 - 1).map(lambda n: f"{n:014d}")


def is_tid_or_reason(x: object) -> bool:
    return isinstance(x, Reason) or (isinstance(x, str) and bool(TECHNICIAN_ID.match(x)))


@given(st.binary(max_size=40), st.sampled_from([ASCII, BCD]), st.integers(0, 20))
def test_decode_tid_any_bytes(data: bytes, p: ProfileConfig, offset: int) -> None:
    p = ProfileConfig(kind="felica", encoding=p.encoding, offset=offset)
    assert is_tid_or_reason(decode_tid(data, p))


@given(tids, st.binary(max_size=8), st.binary(max_size=8))
def test_decode_tid_ascii_roundtrip_and_truncation(tid: str, pre: bytes, post: bytes) -> None:
    p = ProfileConfig(kind="felica", offset=len(pre))
    data = pre + tid.encode() + post
    assert decode_tid(data, p) == tid
    assert decode_tid(data[: len(pre) + 13], p) is Reason.TRUNCATED_READ


@given(tids)
def test_decode_tid_bcd_roundtrip(tid: str) -> None:
    raw = bytes(int(tid[i]) << 4 | int(tid[i + 1]) for i in range(0, 14, 2))
    assert decode_tid(raw + b"\xff" * 9, BCD) == tid
    assert decode_tid(raw[:6], BCD) is Reason.TRUNCATED_READ
    assert decode_tid(b"\xa0" + raw[1:], BCD) is Reason.BAD_CARD_DATA   # a nibble over 9


@given(st.binary(max_size=80), st.integers(1, 15))
def test_decode_felica_read_any_frame(frame: bytes, count: int) -> None:
    out = decode_felica_read(frame, IDM, count)
    assert isinstance(out, Reason) or len(out) == 16 * count


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=4), st.data())
def test_felica_read_through_the_emulated_card(blocks: list[bytes], data: st.DataObject) -> None:
    card = EmulatedCard(CardTech.FELICA, IDM, services={0x100B: tuple(blocks)})
    count = data.draw(st.integers(1, len(blocks)))
    rsp = felica_response(card, felica_read_command(IDM, 0x100B, 0, count))
    assert rsp is not None
    assert decode_felica_read(rsp, IDM, count) == b"".join(blocks[:count])
    cut = data.draw(st.integers(1, len(rsp) - 1))
    assert decode_felica_read(rsp[:cut], IDM, count) is Reason.TRUNCATED_READ
    wrong = felica_response(card, felica_read_command(IDM, 0x090F, 0, count))
    assert wrong is not None and decode_felica_read(wrong, IDM, count) is Reason.WRONG_SERVICE
    assert decode_felica_read(rsp, bytes(8), count) is Reason.BAD_RESPONSE  # another card's IDm


@given(st.binary(max_size=40), st.sampled_from(["select_aid", "select_file", "read",
                                                "select_service", "get_uid"]))
def test_check_apdu_any_response(rsp: bytes, step: str) -> None:
    out = check_apdu(rsp, step)
    if len(rsp) >= 2 and rsp[-2:] == b"\x90\x00":
        assert out == rsp[:-2]
    else:
        assert isinstance(out, Reason) or (step == "read" and rsp[-2:] == b"\x62\x82")


def test_status_words_give_distinct_reasons() -> None:
    assert check_apdu(b"\x6a\x82", "select_aid") is Reason.FOREIGN_APPLICATION
    assert check_apdu(b"\x6a\x82", "select_file") is Reason.FILE_NOT_FOUND
    assert check_apdu(b"\x6a\x82", "select_service") is Reason.WRONG_SERVICE
    assert check_apdu(b"\x69\x82", "read") is Reason.ACCESS_DENIED
    assert check_apdu(b"\x6b\x00", "read") is Reason.TRUNCATED_READ
    assert check_apdu(b"\x12\x34", "read") is Reason.BAD_RESPONSE
    assert check_apdu(b"\x90", "read") is Reason.BAD_RESPONSE


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=24), min_size=3, max_size=3))
def test_iso_dep_profile_with_garbage_responses(responses: list[bytes]) -> None:
    it = iter(responses)
    assert is_tid_or_reason(apply_iso_dep(lambda apdu: next(it), ISO))


@given(tids, st.integers(0, 16))
def test_iso_dep_profile_against_the_emulated_card(tid: str, keep: int) -> None:
    card = Iso7816Card(type4_card(CardTech.ISO_B, b"\x01\x02\x03\x04", tid=tid))
    assert apply_iso_dep(card.respond, ISO) == tid
    short = Iso7816Card(type4_card(CardTech.ISO_A, b"\x01\x02\x03\x04",
                                   contents=tid.encode()[: keep % 14]))
    assert apply_iso_dep(short.respond, ISO) is Reason.TRUNCATED_READ


@given(st.sampled_from(["uid", "felica", "iso_dep"]), st.binary(max_size=24),
       st.lists(st.binary(max_size=24), min_size=4, max_size=4))
def test_pcsc_read_with_garbage(kind: str, atr: bytes, responses: list[bytes]) -> None:
    it = iter(responses)
    p = ProfileConfig(kind=kind, aid="F04343555301", file_id="0001")
    read = read_pcsc_card(lambda apdu: next(it, b""), atr, p)
    assert read.error is not None or read.tid is not None or kind == "uid"


@given(st.binary(max_size=40))
def test_atr_tech_any_bytes(atr: bytes) -> None:
    assert isinstance(atr_tech(atr), CardTech)


def test_atr_tech_of_the_virtual_cards() -> None:
    for tech, ident in ((CardTech.FELICA, IDM), (CardTech.ISO_A, b"\x01\x02\x03\x04"),
                        (CardTech.ISO_B, b"\x01\x02\x03\x04")):
        assert atr_tech(atr_for(EmulatedCard(tech, ident))) is tech
    assert atr_tech(bytes.fromhex("3B8F8001804F0CA0000003060300030000000068")) is CardTech.ISO_A


@given(st.binary(max_size=40), st.sampled_from(["106A", "106B"]))
def test_emulated_card_sides_any_frame(frame: bytes, brty: str) -> None:
    for tech, ident in ((CardTech.ISO_A, b"\x04\x01\x02\x03\x04\x05\x06"),
                        (CardTech.ISO_B, b"\x01\x02\x03\x04")):
        side = IsoDepCardSide(type4_card(tech, ident, tid="12345678901234"))
        out = side.respond(brty, frame)
        assert out is None or isinstance(out, bytes)
    pc = PcscCardSide(EmulatedCard(CardTech.FELICA, IDM, services={0x100B: (bytes(16),)}))
    assert len(pc.respond(frame)) >= 2


def test_felica_read_command_layout() -> None:
    cmd = felica_read_command(IDM, 0x100B, 2, 2)
    assert cmd[0] == len(cmd) and cmd[1] == 0x06 and cmd[2:10] == IDM
    assert cmd[10] == 1 and struct.unpack("<H", cmd[11:13])[0] == 0x100B
    assert cmd[13:] == bytes([2, 0x80, 2, 0x80, 3])
