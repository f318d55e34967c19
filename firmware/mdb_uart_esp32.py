"""ESP32 MDB vend channel UART: 8 data bits plus a parity bit used as the 9th (mode) bit, behind
the word interface of vend_mdb.py (any / read_words / write_words).

Send: per byte, machine.UART.init(parity=0 or 1) so that the parity bit equals the mode bit
(mdb_bits.tx_parity); the port has only even/odd, no mark/space, and the parity may only change
once the previous byte has left the shift register (flush()).
Receive: MicroPython's ESP32 port does not expose a per-byte parity error (the ESP-IDF driver
reports UART_PARITY_ERR only as a driver event, which the port does not read, and the flag is not
tied to a byte), so the 9th bit cannot be read. Workaround: mdb_bits.GapFramer infers it from
timing (the first byte after an idle gap is the VMC's address byte). docs/vending.md.
"""

import machine
import mdb_bits

BAUD = 9600


class Esp32Words:
    """9-bit words to and from the MDB bus through one hardware UART and the parity trick."""

    def __init__(self, cfg):
        self.uart = machine.UART(cfg["mdb_uart"], baudrate=BAUD, bits=8, parity=0, stop=1,
                                 tx=cfg.get("mdb_tx"), rx=cfg.get("mdb_rx"))
        self.parity = 0
        self.framer = mdb_bits.GapFramer(cfg.get("mdb_gap_ms", 2))

    def any(self):
        return self.uart.any()

    def read_words(self, now):
        n = self.uart.any()
        data = self.uart.read(n) if n else None
        if not data:
            return []
        return self.framer.feed(data, now)

    def write_words(self, words, now):
        for w in words:
            p = mdb_bits.tx_parity(w)
            if p != self.parity:
                self.uart.flush()  # the byte before must be out before the parity changes
                self.uart.init(baudrate=BAUD, bits=8, parity=p, stop=1)
                self.parity = p
            self.uart.write(bytes((w & 0xFF,)))
        self.uart.flush()
        # a reply of more than one word is a data block: the VMC answers it with ACK/RET/NAK
        self.framer.sent(now, len(words) > 1)
