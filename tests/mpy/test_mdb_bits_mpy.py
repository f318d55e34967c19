"""The 9-bit MDB adapter helpers (firmware/mdb_bits.py) under the MicroPython unix port (and CPython):
every word through the PIO FIFO packing and a model of the PIO shift registers, every byte and mode
through the ESP32 parity choice, and the gap framer on a VMC exchange.

Run: MICROPYPATH=firmware:.frozen micropython -X heapsize=192K tests/mpy/test_mdb_bits_mpy.py
Prints one "PASS <name>" per test and "ALL OK <n>" at the end; any failure exits 1.
"""

import mdb_bits
from mpy_runner import run


def wire_bits(word):
    """The 9 bits after the start bit, in wire order: data LSB first, the mode bit last."""
    return [(word >> i) & 1 for i in range(9)]


def pio_rx_model(bits):
    """The RX program: `in_(pins, 1)` nine times into a right-shifting 32-bit ISR, then push."""
    isr = 0
    for b in bits:
        isr = ((isr >> 1) | (b << 31)) & 0xFFFFFFFF
    return isr


def pio_tx_model(fifo):
    """The TX program: `out(pins, 1)` nine times from a right-shifting OSR."""
    osr = fifo
    out = []
    for _ in range(9):
        out.append(osr & 1)
        osr >>= 1
    return out


def test_pio_rx_every_word():
    for w in range(512):
        fifo = pio_rx_model(wire_bits(w))
        assert fifo == mdb_bits.pio_rx_fifo(w), w
        assert mdb_bits.pio_rx_word(fifo) == w, w


def test_pio_tx_every_word():
    for w in range(512):
        assert pio_tx_model(mdb_bits.pio_tx_fifo(w)) == wire_bits(w), w


def test_out_of_range_is_refused():
    for w in (-1, 512, 0x1000):
        try:
            mdb_bits.pio_tx_fifo(w)
        except mdb_bits.BitsError:
            continue
        raise AssertionError("accepted " + str(w))


def test_parity_is_the_mode_bit():
    for w in range(512):
        p = mdb_bits.tx_parity(w)
        assert mdb_bits.parity_bit(w & 0xFF, p) == w >> 8, w
        # receiving with a fixed even parity: the error flag says "mode bit differs"
        err = mdb_bits.parity_bit(w & 0xFF, 0) != w >> 8
        assert mdb_bits.rx_mode(w & 0xFF, 0, err) == w >> 8, w


def test_gap_framer_marks_addresses():
    f = mdb_bits.GapFramer(2)
    # POLL (0x12, checksum 0x12) after an idle bus: the address byte gets the mode bit
    assert f.feed(b"\x12\x12", 1000) == [0x112, 0x12]
    f.sent(1001, True)  # we answered with a data block
    assert f.feed(b"\x00", 1003) == [0x00]  # the VMC's ACK: no mode bit
    # an ACK glued to the next command: the command's address starts a block
    f.sent(1010, True)
    assert f.feed(b"\x00\x13\x00", 1011) == [0x00, 0x113, 0x00]
    # a burst split over two reads within the gap stays one block
    assert f.feed(b"\x10", 1100) == [0x110]
    assert f.feed(b"\x10", 1101) == [0x10]


TESTS = [test_pio_rx_every_word, test_pio_tx_every_word, test_out_of_range_is_refused,
         test_parity_is_the_mode_bit, test_gap_framer_marks_addresses]


run(TESTS)
