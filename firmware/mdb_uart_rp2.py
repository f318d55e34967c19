"""RP2040 9-bit UART for the MDB vend channel: two PIO state machines (RX and TX, 9 data bits,
8 PIO cycles per bit) behind the word interface of vend_mdb.py (any / read_words / write_words).

Pins (board_config RP2): mdb_rx (GPIO 15) is the RX state machine's in/jmp pin (pulled up; the
MDB interface's receive optocoupler drives it), mdb_tx (GPIO 14) is the TX state machine's
out/side-set pin (idle high). mdb_uart is the first of two state machine ids: n receives, n + 1
sends (both on PIO block n // 4, so n is 0..2 or 4..6).
Unproven without hardware: timing at the real bus, a framing error is dropped silently.
"""

# The PIO programs use the assembler's names (label, wait, pin, x, ...), which rp2.asm_pio puts
# into the module's globals while it assembles them: they are undefined to linters.
# ruff: noqa: F821

import mdb_bits
import rp2
from machine import Pin

BAUD = 9600


@rp2.asm_pio(in_shiftdir=rp2.PIO.SHIFT_RIGHT, fifo_join=rp2.PIO.JOIN_RX)
def mdb_rx():
    # wait for the start bit, then sample mid-bit: 8 + 4 cycles after its falling edge
    label("start")
    wait(0, pin, 0)
    set(x, 8)[10]  # 9 bits: 8 data bits and the mode bit
    label("bitloop")
    in_(pins, 1)
    jmp(x_dec, "bitloop")[6]
    jmp(pin, "good_stop")
    wait(1, pin, 0)  # framing error (no stop bit): drop the word, wait for the line to idle
    jmp("start")
    label("good_stop")
    push(block)


@rp2.asm_pio(sideset_init=rp2.PIO.OUT_HIGH, out_init=rp2.PIO.OUT_HIGH,
             out_shiftdir=rp2.PIO.SHIFT_RIGHT, fifo_join=rp2.PIO.JOIN_TX)
def mdb_tx():
    pull()
    set(x, 8).side(0)[7]  # start bit; 9 bits follow
    label("bitloop")
    out(pins, 1)[6]
    jmp(x_dec, "bitloop")
    nop().side(1)[6]  # stop bit


class Rp2Words:
    """9-bit words to and from the MDB bus through PIO."""

    def __init__(self, cfg):
        sm = cfg["mdb_uart"]
        rx = Pin(cfg["mdb_rx"], Pin.IN, Pin.PULL_UP)
        tx = Pin(cfg["mdb_tx"], Pin.OUT, value=1)
        self.rx = rp2.StateMachine(sm, mdb_rx, freq=8 * BAUD, in_base=rx, jmp_pin=rx)
        self.tx = rp2.StateMachine(sm + 1, mdb_tx, freq=8 * BAUD, sideset_base=tx, out_base=tx)
        self.rx.active(1)
        self.tx.active(1)

    def any(self):
        return self.rx.rx_fifo()

    def read_words(self, now):
        out = []
        while self.rx.rx_fifo():
            out.append(mdb_bits.pio_rx_word(self.rx.get()))
        return out

    def write_words(self, words, now):
        for w in words:
            self.tx.put(mdb_bits.pio_tx_fifo(w))  # blocks while the 8-deep FIFO is full
