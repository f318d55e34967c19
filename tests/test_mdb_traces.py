"""Byte-exact replays of public MDB transcripts against our reader (firmware/mdb.py): the VMC's
bytes in order into mdb.Reader, our replies compared with the transcript's peripheral's.

- tests/data/mdb/qibixx_level3_setup_sniff.txt: a real sniff (Qibixx docs) of a level 3 VMC
  setting up a level 3 Qibixx reader. Not the same level as ours (1): the replies that do not
  depend on the level are compared byte for byte, the two that do are compared field by field.
- tests/data/mdb/vmflow_vmc_and_slave.txt: VMflow's VMC command bytes and its level 1 slave's
  answers, derived from their source (no recorded VMflow trace is published). Same level:
  compared byte for byte.
(The Necta Kikko Max + Pax D200 trace is replayed in tests/test_mdb.py.)
"""

from __future__ import annotations

from pathlib import Path

from firmware import mdb

DATA = Path(__file__).parent / "data" / "mdb"


def _lines(name: str) -> list[tuple[str, bytes | None]]:
    """(who, bytes) per line; a Qibixx "ACK" is None."""
    out: list[tuple[str, bytes | None]] = []
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            who, *rest = line.split()
            out.append((who, None if rest == ["ACK"] else bytes(int(h, 16) for h in rest)))
    return out


def _feed(r: mdb.Reader, cmd: bytes) -> list[int]:
    """One VMC block (address byte first, checksum last) into the reader; ACK its data reply."""
    reply: list[int] = []
    for i, b in enumerate(cmd):
        reply = r.word((mdb.MODE | b) if i == 0 else b, 0)
    if len(reply) > 1:
        r.word(mdb.ACK, 0)
    return reply


def _data(reply: list[int]) -> bytes | None:
    """Our reply as the transcripts show it: None for a lone ACK, else the data bytes."""
    if reply == [mdb.MODE | mdb.ACK]:
        return None
    assert reply and reply[-1] & mdb.MODE and reply != [mdb.NAK], reply
    assert mdb.checksum(bytes(w & 0xFF for w in reply[:-1])) == reply[-1] & 0xFF
    return bytes(w & 0xFF for w in reply[:-1])


# ---------------------------------------------------------------- Qibixx (real sniff, level 3)


def test_qibixx_sniff_vmc_bytes_drive_our_reader_to_the_same_replies():
    """The level 3 VMC's setup, byte for byte into our reader configured with the Qibixx
    reader's own values (CHF 0x1756, scale 1, 2 decimals, 30 s, its id bytes). Byte exact: the
    RESET and price ACKs, JUST RESET, and EXPANSION optional-feature-enable ACKed (our reader
    NAKed it before: a level 3 VMC sends it). Level-dependent, compared field by field: READER
    CONFIG DATA (we say level 1 and no option bits, the Qibixx level 3 and option bit 3) and
    PERIPHERAL ID (a level 3 reader adds 4 bytes of optional feature bits; ours is the first
    30 bytes, the same as theirs)."""
    lines = _lines("qibixx_level3_setup_sniff.txt")
    their_id = next(b for w, b in lines if w == "S" and b and b[0] == mdb.P_PERIPHERAL_ID)
    r = mdb.Reader(country=0x1756, scale=1, decimals=2, max_response_s=30, ident=their_id[1:30])
    pairs = [(lines[i][1], lines[i + 1][1]) for i in range(0, len(lines), 2)]
    assert [lines[i][0] + lines[i + 1][0] for i in range(0, len(lines), 2)] == ["MS"] * len(pairs)
    for cmd, theirs in pairs:
        assert cmd is not None
        ours = _data(_feed(r, cmd + bytes((mdb.checksum(cmd),))))  # the sniffer hides checksums
        if cmd[:2] == bytes((0x11, 0x00)):  # READER CONFIG DATA
            assert theirs is not None and ours is not None and len(ours) == len(theirs) == 8
            assert (ours[0], ours[2:7]) == (theirs[0], theirs[2:7])  # code, country .. max resp
            assert (ours[1], theirs[1]) == (1, 3)  # feature level: ours 1, the Qibixx 3
            assert (ours[7], theirs[7]) == (0, 0x08)  # options: we announce none
        elif cmd[:2] == bytes((0x17, 0x00)):  # PERIPHERAL ID
            assert theirs is not None and len(theirs) == 34 and ours == theirs[:30]
        else:
            assert ours == theirs, (cmd.hex(), ours, theirs)
    assert r.state == mdb.DISABLED and r.vmc_level == 3 and r.max_price == 0xFFFF
    assert r.bad_checksums == 0 and r.out_of_sequence == 0


# ---------------------------------------------------------------- VMflow (from source, level 1)


def test_vmflow_checksums_are_ours():
    for who, b in _lines("vmflow_vmc_and_slave.txt"):
        assert b is not None
        if len(b) > 1:
            assert mdb.checksum(b[:-1]) == b[-1], (who, b.hex())


def test_vmflow_vmc_bytes_drive_our_reader_to_the_slaves_replies():
    """VMflow's VMC commands into our reader, configured with the VMflow slave's values (currency
    0xFFFF, 2 decimals, 3 s max response, its id bytes); the host credits 150 where the slave
    began its session and approves the request. Every data reply is byte for byte the slave's,
    checksum included, except one config byte: the slave announces options 0x09 (refunds, cash
    sale), we announce none. VMflow answers SESSION COMPLETE with ACK and END SESSION at the next
    POLL; we answer END SESSION at once (both MDB 4.2), so the data replies are compared in
    order and the extra ACK is the only other difference."""
    lines = _lines("vmflow_vmc_and_slave.txt")
    ident = b"VMF" + b" " * 24 + b"\x00\x03"
    r = mdb.Reader(country=0xFFFF, decimals=2, max_response_s=3, decision_timeout_ms=2000,
                   ident=ident)
    ours: list[bytes] = []
    theirs: list[bytes] = []
    for i in range(0, len(lines), 2):
        (mw, cmd), (sw, rep) = lines[i], lines[i + 1]
        assert (mw, sw) == ("M", "S") and cmd is not None and rep is not None
        if rep[0] == mdb.P_BEGIN_SESSION and len(rep) > 1:
            assert r.credit(1, (rep[1] << 8) | rep[2], 0)  # the credit VMflow got by BLE / MQTT
        words = _feed(r, cmd)
        if cmd[:2] == bytes((0x13, 0x00)):
            assert r.take_events()[-1] == (mdb.EV_VEND_REQUEST, 1, 7, 120)
            assert r.approve(1, 0)
        if len(rep) > 1:
            theirs.append(rep)
        if len(words) > 1:
            ours.append(bytes(w & 0xFF for w in words))
    cfg_ours, cfg_theirs = ours[1], theirs[1]
    assert cfg_ours[0] == cfg_theirs[0] == mdb.P_CONFIG
    assert cfg_ours[:7] == cfg_theirs[:7] and (cfg_ours[7], cfg_theirs[7]) == (0x00, 0x09)
    assert [o for i, o in enumerate(ours) if i != 1] == [t for i, t in enumerate(theirs) if i != 1]
    assert [e[0] for e in r.take_events()] == [mdb.EV_VEND_SUCCESS, mdb.EV_SESSION_END]
    assert r.bad_checksums == 0 and r.out_of_sequence == 0 and r.state == mdb.ENABLED
