"""Flash journal of the last vend: one 16-byte record, written tmp-then-rename, CRC-checked."""

import os

from frame import J_DONE, J_IN_PROGRESS, J_NONE, R_NONE, crc16, get_u16, get_u32, u16, u32

MAGIC = b"VJ"
RECORD_LEN = 16


class JournalError(Exception):
    pass


class Journal:
    """What the board remembers across resets: boot count and the last vend.

    Record: 'VJ' | ver | boot_count u16 | vend_id u32 | slot | state | result | pad | crc16
    state is J_NONE, J_IN_PROGRESS (written before the vend line is driven) or J_DONE.
    """

    def __init__(self, path):
        self.path = path
        self.boot_count = 0
        self.vend_id = 0
        self.slot = 0
        self.state = J_NONE
        self.result = R_NONE
        self.corrupt = False
        self._rec = bytearray(RECORD_LEN)

    def load(self):
        """Read the record; a missing file is a fresh board, a bad one sets .corrupt."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(RECORD_LEN + 1)
        except OSError:
            return
        if (
            len(data) != RECORD_LEN
            or data[0:2] != MAGIC
            or data[2] != 1
            or crc16(data, 0xFFFF, 0, RECORD_LEN - 2) != get_u16(data, RECORD_LEN - 2)
        ):
            self.corrupt = True
            return
        self.boot_count = get_u16(data, 3)
        self.vend_id = get_u32(data, 5)
        self.slot = data[9]
        self.state = data[10]
        self.result = data[11]

    def _write(self):
        r = self._rec
        r[0:2] = MAGIC
        r[2] = 1
        r[3:5] = u16(self.boot_count & 0xFFFF)
        r[5:9] = u32(self.vend_id)
        r[9] = self.slot
        r[10] = self.state
        r[11] = self.result
        r[12] = 0
        r[13] = 0
        r[14:16] = u16(crc16(r, 0xFFFF, 0, RECORD_LEN - 2))
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(r)
            os.rename(tmp, self.path)
        except OSError as e:
            raise JournalError(f"journal write failed: {e}") from e
        self.corrupt = False

    def booted(self):
        self.boot_count = (self.boot_count + 1) & 0xFFFF
        self._write()

    def start(self, vend_id, slot):
        """Record a vend as in progress. Must succeed before the vend line is driven."""
        self.vend_id = vend_id
        self.slot = slot
        self.state = J_IN_PROGRESS
        self.result = R_NONE
        self._write()

    def finish(self, result):
        self.state = J_DONE
        self.result = result
        self._write()
