"""Pure helpers of the board 9-bit MDB UART adapters (mdb_uart_rp2.py, mdb_uart_esp32.py): what the
RP2040 PIO FIFOs hold for a word, the ESP32 per-byte parity choice, and the ESP32 receive-side
mode-bit inference. No hardware imports: tested under CPython (hypothesis) and the unix port.

A word is data | mode << 8 (0..0x1FF), as in mdb.py. On the wire: start bit, 8 data bits LSB
first, the mode bit as the 9th bit, stop bit.
"""

try:  # MicroPython: tick counters wrap, so differences go through ticks_diff.
    from time import ticks_diff  # type: ignore[attr-defined]
except ImportError:  # CPython: callers pass monotonic milliseconds.

    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b


MODE = 0x100
BITS = 9
# The PIO RX program shifts 9 bits RIGHT into the 32-bit ISR and pushes: the first bit on the wire
# (data bit 0) travels down to bit 32 - 9 = 23, the mode bit ends at bit 31.
PIO_RX_SHIFT = 32 - BITS

# machine.UART(parity=...) values (MicroPython: 0 even, 1 odd)
PARITY_EVEN = 0
PARITY_ODD = 1

# VMC -> peripheral answers to a data reply (sent without the mode bit)
ACK = 0x00
RET = 0xAA
NAK = 0xFF


class BitsError(ValueError):
    pass


def _check(word):
    if not 0 <= word <= 0x1FF:
        raise BitsError("word out of range: " + str(word))


def pio_rx_word(fifo):
    """One RX FIFO entry of the 9-bit PIO program -> the word."""
    return (fifo >> PIO_RX_SHIFT) & 0x1FF


def pio_rx_fifo(word):
    """What the RX FIFO holds after the program shifted `word` in (the inverse of pio_rx_word)."""
    _check(word)
    return word << PIO_RX_SHIFT


def pio_tx_fifo(word):
    """The TX FIFO entry for a word: the program shifts the OSR right, 9 bits, LSB first."""
    _check(word)
    return word


def ones(b):
    n = 0
    while b:
        n += b & 1
        b >>= 1
    return n


def parity_bit(byte, parity):
    """The parity bit a UART sends after `byte` with machine.UART parity 0 (even) / 1 (odd)."""
    p = ones(byte & 0xFF) & 1
    return p if parity == PARITY_EVEN else p ^ 1


def tx_parity(word):
    """The machine.UART parity to send word's data byte with, so the parity bit is its mode bit."""
    _check(word)
    mode = word >> 8
    return PARITY_EVEN if ones(word & 0xFF) & 1 == mode else PARITY_ODD


def rx_mode(byte, parity, parity_error):
    """The mode bit of a byte received with a fixed parity, given the UART's parity-error flag
    for that byte (a flag MicroPython's ESP32 port does not expose: docs/vending.md)."""
    return parity_bit(byte, parity) ^ (1 if parity_error else 0)


class GapFramer:
    """Received bytes without their 9th bit -> words, the mode bit inferred (the ESP32 workaround).

    Rules: the first byte after an idle gap of at least gap_ms starts a block (its mode bit is
    1: the VMC's address byte); the rest of a burst are data bytes (mode 0). After we sent a data
    reply (sent()), a lone ACK/RET/NAK that follows is the VMC's answer (mode 0), not an address.
    """

    def __init__(self, gap_ms=2):
        self.gap_ms = gap_ms
        self.last = None  # ticks_ms of the last byte seen or sent
        self.answer = False  # we sent a data reply: the next byte may answer it

    def sent(self, now, data_reply):
        self.last = now
        self.answer = data_reply

    def feed(self, data, now):
        out = []
        first = self.last is None or ticks_diff(now, self.last) >= self.gap_ms
        for i in range(len(data)):
            b = data[i]
            if i == 0 and self.answer and b in (ACK, RET, NAK):
                out.append(b)  # the VMC's answer to our reply; whatever follows starts a block
                first = True
            else:
                out.append((MODE | b) if first else b)
                first = False
            self.answer = False
        if data:
            self.last = now
        return out
