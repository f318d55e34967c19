"""Serial frame codec and link state machine shared by the Pi (CPython) and the board (MicroPython).

Rules of this file:
- it runs unchanged on CPython 3.11+ and MicroPython 1.2x: no typing, dataclasses,
  enum, __future__ or struct; only bytes/bytearray operations;
- it is sans-IO: nothing here reads or writes a port or looks at a clock; callers
  pass bytes and a millisecond tick in, and take bytes and events out;
- the decoder never raises on line noise: it counts what it skips.

Wire format (docs/serial-protocol.md has the full story):

    0x00  COBS( ver | type | seq | epoch | len | payload[len] | crc16_hi | crc16_lo )  0x00

CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over ver..payload.
"""

try:  # MicroPython: tick counters wrap, so differences go through ticks_diff.
    from time import ticks_diff  # type: ignore[attr-defined]
except ImportError:  # CPython: callers pass monotonic milliseconds.

    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b


VERSION = 1
HEADER_LEN = 5
MAX_PAYLOAD = 32
MAX_RAW = HEADER_LEN + MAX_PAYLOAD + 2
MAX_ENCODED = MAX_RAW + 2  # COBS adds one byte per 254, plus slack

# Message types: (code, payload length). Every type has a fixed payload length.
BOOT = 0x01  # board -> host: boot notice, with what the flash journal says
ACK = 0x02  # both: header seq/epoch name the frame acknowledged
NAK = 0x03  # both: header seq/epoch name the frame refused; payload = reason
STATUS_REQ = 0x10  # host -> board
STATUS = 0x11  # board -> host: status report
VEND_REQ = 0x20  # host -> board: pulse a vend line and watch the drop sensor
VEND_RESULT = 0x21  # board -> host
GATE_PULSE = 0x30  # host -> board: pulse the gate relay
SENSOR = 0x40  # board -> host: a debounced sensor edge (door, drop outside a vend)
FEEDBACK = 0x50  # host -> board: LED colour and buzzer pattern
MDB_HOST = 0x60  # host -> board: the agent's decision for the MDB reader (firmware/mdb.py)
MDB_EVENT = 0x61  # board -> host: what the VMC did (vend request, success, failure, ...)
ERROR = 0x7E  # both: an error report (code, argument)

# What each side accepts (Link(accept=...)).
HOST_ACCEPTS = (BOOT, STATUS, VEND_RESULT, SENSOR, MDB_EVENT, ERROR)
BOARD_ACCEPTS = (STATUS_REQ, VEND_REQ, GATE_PULSE, FEEDBACK, MDB_HOST, ERROR)

PAYLOAD_LEN = {
    BOOT: 11,
    ACK: 0,
    NAK: 1,
    STATUS_REQ: 0,
    STATUS: 14,
    VEND_REQ: 9,
    VEND_RESULT: 8,
    GATE_PULSE: 3,
    SENSOR: 6,
    FEEDBACK: 4,
    MDB_HOST: 7,
    MDB_EVENT: 10,
    ERROR: 5,
}

TYPE_NAMES = {
    BOOT: "BOOT",
    ACK: "ACK",
    NAK: "NAK",
    STATUS_REQ: "STATUS_REQ",
    STATUS: "STATUS",
    VEND_REQ: "VEND_REQ",
    VEND_RESULT: "VEND_RESULT",
    GATE_PULSE: "GATE_PULSE",
    SENSOR: "SENSOR",
    FEEDBACK: "FEEDBACK",
    MDB_HOST: "MDB_HOST",
    MDB_EVENT: "MDB_EVENT",
    ERROR: "ERROR",
}

# VEND_RESULT.result and BOOT.last_result
R_DISPENSED = 0
R_NO_DROP = 1  # the drop sensor did not fire before the timeout
R_BUSY = 2  # another vend is in progress
R_BAD_SLOT = 3
R_SENSOR_FAULT = 4  # drop sensor already active before the pulse (jammed or wired wrong)
R_INTERRUPTED = 5  # the board reset while this vend was in progress
R_NOT_STARTED = 6  # query answer: newer than any vend this board started (never vended)
R_FORGOTTEN = 7  # query answer: older than the one vend the board's journal remembers
R_NONE = 255  # no vend recorded

# BOOT.last_state
J_NONE = 0
J_IN_PROGRESS = 1  # journal says the vend was running when the board reset
J_DONE = 2

# NAK reasons
NAK_VERSION = 1
NAK_TYPE = 2
NAK_PAYLOAD = 3
NAK_BUSY = 4

# Link failure reasons (EV_FAILED)
FAIL_NO_ACK = 0x100  # retries exhausted; NAK reasons are passed through below 0x100

# ERROR codes
E_WATCHDOG_RESET = 1
E_JOURNAL = 2
E_UNEXPECTED = 3
E_SENSOR = 4
E_RELAY = 5  # GATE_PULSE named a relay this board does not have (arg: the relay)

# Sensors (SENSOR.sensor)
S_DROP = 1
S_DOOR = 2
S_EMERGENCY = 3  # emergency release input (fire-alarm contact): 1 active, the gate held open

# SENSOR.state bits: bit 0 the level (1 open / active); bit 1 set: a level report sent after
# BOOT (what the input is now), not an edge
ST_LEVEL = 1
ST_AT_BOOT = 2


class FrameError(ValueError):
    pass


# ---------------------------------------------------------------- CRC-16/CCITT-FALSE

_NIB = (
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50A5, 0x60C6, 0x70E7,
    0x8108, 0x9129, 0xA14A, 0xB16B, 0xC18C, 0xD1AD, 0xE1CE, 0xF1EF,
)  # fmt: skip


def crc16(data, crc=0xFFFF, start=0, end=-1):
    """CRC-16/CCITT-FALSE of data[start:end] (end=-1: to the end); check('123456789') == 0x29B1."""
    if end < 0:
        end = len(data)
    i = start
    while i < end:
        b = data[i]
        crc = ((crc << 4) & 0xFFFF) ^ _NIB[(crc >> 12) ^ (b >> 4)]
        crc = ((crc << 4) & 0xFFFF) ^ _NIB[(crc >> 12) ^ (b & 0x0F)]
        i += 1
    return crc


# ---------------------------------------------------------------- integers


def u16(v):
    return bytes(((v >> 8) & 0xFF, v & 0xFF))


def u32(v):
    return bytes(((v >> 24) & 0xFF, (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF))


def get_u16(b, i):
    return (b[i] << 8) | b[i + 1]


def get_u32(b, i):
    return (b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]


# ---------------------------------------------------------------- frames


class Frame:
    """One decoded frame: version, type, seq, epoch and payload bytes."""

    def __init__(self, mtype, seq, epoch, payload=b"", ver=VERSION):
        self.ver = ver
        self.type = mtype
        self.seq = seq
        self.epoch = epoch
        self.payload = bytes(payload)

    def __eq__(self, other):
        return (
            isinstance(other, Frame)
            and self.ver == other.ver
            and self.type == other.type
            and self.seq == other.seq
            and self.epoch == other.epoch
            and self.payload == other.payload
        )

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        name = TYPE_NAMES.get(self.type, hex(self.type))
        return f"Frame({name} seq={self.seq} epoch={self.epoch} payload={repr(self.payload)} ver={self.ver})"


def _cobs_encode(raw, out):
    """Append COBS(raw) to bytearray out."""
    code_at = len(out)
    out.append(0)
    code = 1
    for b in raw:
        if b == 0:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
        else:
            out.append(b)
            code += 1
            if code == 0xFF:
                out[code_at] = code
                code_at = len(out)
                out.append(0)
                code = 1
    out[code_at] = code


def encode(mtype, seq, epoch, payload=b"", ver=VERSION):
    """Return the wire bytes of one frame (delimiters included). Raises FrameError on bad input."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise FrameError(f"payload too long: {n} > {MAX_PAYLOAD}")
    if ver == VERSION:
        want = PAYLOAD_LEN.get(mtype)
        if want is None:
            raise FrameError(f"unknown message type 0x{mtype:02x}")
        if n != want:
            raise FrameError(f"{TYPE_NAMES[mtype]} payload must be {want} bytes, got {n}")
    for name, v in (("ver", ver), ("type", mtype), ("seq", seq), ("epoch", epoch)):
        if not 0 <= v <= 255:
            raise FrameError(f"{name} out of range: {v!r}")
    raw = bytearray(HEADER_LEN + n + 2)
    raw[0] = ver
    raw[1] = mtype
    raw[2] = seq
    raw[3] = epoch
    raw[4] = n
    raw[HEADER_LEN : HEADER_LEN + n] = payload
    c = crc16(raw, 0xFFFF, 0, HEADER_LEN + n)
    raw[HEADER_LEN + n] = c >> 8
    raw[HEADER_LEN + n + 1] = c & 0xFF
    out = bytearray(b"\x00")
    _cobs_encode(raw, out)
    out.append(0)
    return bytes(out)


def encode_frame(frame):
    return encode(frame.type, frame.seq, frame.epoch, frame.payload, frame.ver)


class Decoder:
    """Incremental decoder: feed(bytes) -> list of Frames. Never raises on noise.

    Counters: skipped (bytes thrown away: noise, overlong runs, bad frames),
    crc_errors, bad_frames (COBS, length, type or payload-length errors),
    bad_version (good CRC, version this code does not speak: still returned),
    frames (good frames returned).
    """

    def __init__(self):
        self._buf = bytearray(MAX_ENCODED)
        self._raw = bytearray(MAX_ENCODED)
        self._n = 0
        self._overflow = False
        self.skipped = 0
        self.crc_errors = 0
        self.bad_frames = 0
        self.bad_version = 0
        self.frames = 0

    def pending(self):
        """Bytes held waiting for a delimiter."""
        return self._n

    def feed(self, data):
        out = []
        buf = self._buf
        for b in data:
            if b == 0:
                if self._overflow:
                    self._overflow = False
                elif self._n:
                    f = self._finish(self._n)
                    if f is not None:
                        out.append(f)
                    else:
                        self.skipped += self._n
                self._n = 0
            elif self._overflow:
                self.skipped += 1
            elif self._n >= MAX_ENCODED:
                self.skipped += self._n + 1
                self._n = 0
                self._overflow = True
            else:
                buf[self._n] = b
                self._n += 1
        return out

    def _finish(self, n):
        buf = self._buf
        raw = self._raw
        # COBS decode buf[:n] into raw
        i = 0
        m = 0
        while i < n:
            code = buf[i]
            i += 1
            end = i + code - 1
            if end > n:
                self.bad_frames += 1
                return None
            while i < end:
                raw[m] = buf[i]
                m += 1
                i += 1
            if code != 0xFF and i < n:
                raw[m] = 0
                m += 1
        if m < HEADER_LEN + 2:
            self.bad_frames += 1
            return None
        plen = raw[4]
        if plen > MAX_PAYLOAD or m != HEADER_LEN + plen + 2:
            self.bad_frames += 1
            return None
        c = crc16(raw, 0xFFFF, 0, HEADER_LEN + plen)
        if c != ((raw[HEADER_LEN + plen] << 8) | raw[HEADER_LEN + plen + 1]):
            self.crc_errors += 1
            return None
        ver = raw[0]
        mtype = raw[1]
        if ver == VERSION:
            if PAYLOAD_LEN.get(mtype, -1) != plen:
                self.bad_frames += 1
                return None
        else:
            self.bad_version += 1
        self.frames += 1
        return Frame(mtype, raw[2], raw[3], bytes(raw[HEADER_LEN : HEADER_LEN + plen]), ver)


# ---------------------------------------------------------------- link

EV_MESSAGE = 1  # (EV_MESSAGE, frame): a new reliable message from the peer (already ACKed)
EV_ACKED = 2  # (EV_ACKED, mtype, seq): our message was acknowledged
EV_FAILED = 3  # (EV_FAILED, mtype, seq, payload, reason): retries exhausted or NAKed
EV_ERROR = 4  # (EV_ERROR, nak_reason, frame): we NAKed a frame (version or type we do not take)


class LinkError(Exception):
    pass


class Link:
    """Stop-and-wait reliable delivery over the frame codec (sans-IO).

    send() queues a message; the first queued message is transmitted, then
    retransmitted every ack_timeout_ms until an ACK with its (seq, epoch)
    arrives, at most `retries` times after the first; then EV_FAILED with
    FAIL_NO_ACK. Received messages are ACKed; a repeat of the last delivered
    (epoch, seq) is ACKed again but not delivered twice. The epoch names the
    sender's boot/session, so a restarted peer is never taken for a duplicate.
    """

    def __init__(self, epoch, retries=3, ack_timeout_ms=250, max_queue=8, accept=None, first_seq=1):
        if not 1 <= epoch <= 255:
            raise LinkError("epoch must be 1..255")
        self.epoch = epoch
        self.retries = retries
        self.ack_timeout_ms = ack_timeout_ms
        self.max_queue = max_queue
        self.accept = accept  # message types this side takes (others get NAK_TYPE); None = all
        self._seq = (first_seq - 1) & 0xFF  # a random start makes session clashes rarer
        self._queue = []  # [mtype, seq, payload]
        self._wire = None  # encoded bytes of the message in flight
        self._sent_at = 0
        self._tries = 0
        self._out = []
        self._peer = None  # (epoch, seq) of the last delivered message
        self.duplicates = 0
        self.retransmits = 0
        self.failures = 0

    def busy(self):
        return len(self._queue) > 0

    def in_flight(self):
        """(mtype, seq) of the message awaiting an ACK, or None."""
        if self._wire is None:
            return None
        return (self._queue[0][0], self._queue[0][1])

    def send(self, mtype, payload, now):
        """Queue a reliable message; returns its seq. Raises LinkError if the queue is full."""
        if mtype in (ACK, NAK):
            raise LinkError("ACK/NAK are sent by the link itself")
        if len(self._queue) >= self.max_queue:
            raise LinkError(f"send queue full ({self.max_queue})")
        # Check the payload now, so a bad message fails at the caller.
        encode(mtype, 0, self.epoch, payload)
        self._seq = (self._seq + 1) & 0xFF
        if self._seq == 0:
            self._seq = 1
        self._queue.append([mtype, self._seq, bytes(payload)])
        if self._wire is None:
            self._start(now)
        return self._seq

    def _start(self, now):
        if not self._queue:
            self._wire = None
            return
        m = self._queue[0]
        self._wire = encode(m[0], m[1], self.epoch, m[2])
        self._sent_at = now
        self._tries = 0
        self._out.append(self._wire)

    def take_output(self):
        """Bytes to write to the port, in order (list of bytes)."""
        out = self._out
        self._out = []
        return out

    def reset_peer(self):
        self._peer = None

    def receive(self, frame, now):
        """Handle one decoded frame; returns a list of events."""
        events = []  # type: list[tuple]
        if frame.ver != VERSION:
            self._out.append(encode(NAK, frame.seq, frame.epoch, bytes((NAK_VERSION,))))
            events.append((EV_ERROR, NAK_VERSION, frame))
            return events
        t = frame.type
        if t in (ACK, NAK):
            if self._wire is not None and frame.epoch == self.epoch:
                m = self._queue[0]
                if frame.seq == m[1]:
                    self._queue.pop(0)
                    if t == ACK:
                        events.append((EV_ACKED, m[0], m[1]))
                    else:
                        self.failures += 1
                        events.append((EV_FAILED, m[0], m[1], m[2], frame.payload[0]))
                    self._start(now)
            return events
        if self.accept is not None and t not in self.accept:
            self._out.append(encode(NAK, frame.seq, frame.epoch, bytes((NAK_TYPE,))))
            events.append((EV_ERROR, NAK_TYPE, frame))
            return events
        self._out.append(encode(ACK, frame.seq, frame.epoch))
        key = (frame.epoch, frame.seq)
        if key == self._peer:
            self.duplicates += 1
            return events
        self._peer = key
        events.append((EV_MESSAGE, frame))
        return events

    def poll(self, now):
        """Retransmit or give up on timeouts; returns a list of events."""
        events = []  # type: list[tuple]
        while self._wire is not None and ticks_diff(now, self._sent_at) >= self.ack_timeout_ms:
            if self._tries < self.retries:
                self._tries += 1
                self.retransmits += 1
                self._sent_at = now
                self._out.append(self._wire)
                break
            m = self._queue.pop(0)
            self.failures += 1
            events.append((EV_FAILED, m[0], m[1], m[2], FAIL_NO_ACK))
            self._start(now)
        return events

    def next_deadline(self):
        """Tick at which poll() has work to do, or None."""
        if self._wire is None:
            return None
        return self._sent_at + self.ack_timeout_ms


# ---------------------------------------------------------------- payloads


def vend_req(vend_id, slot, pulse_ms, timeout_ms):
    return u32(vend_id) + bytes((slot,)) + u16(pulse_ms) + u16(timeout_ms)


def parse_vend_req(p):
    return get_u32(p, 0), p[4], get_u16(p, 5), get_u16(p, 7)


def vend_result(vend_id, slot, result, elapsed_ms):
    return u32(vend_id) + bytes((slot, result)) + u16(min(elapsed_ms, 0xFFFF))


def parse_vend_result(p):
    return get_u32(p, 0), p[4], p[5], get_u16(p, 6)


def boot(reset_cause, fw_ver, boot_count, last_vend_id, last_slot, last_state, last_result):
    return (
        bytes((reset_cause & 0xFF, fw_ver & 0xFF))
        + u16(boot_count & 0xFFFF)
        + u32(last_vend_id)
        + bytes((last_slot, last_state, last_result))
    )


def parse_boot(p):
    """-> (reset_cause, fw_ver, boot_count, last_vend_id, last_slot, last_state, last_result)"""
    return p[0], p[1], get_u16(p, 2), get_u32(p, 4), p[8], p[9], p[10]


def status(busy, door, uptime_s, crc_errors, skipped, last_vend_id):
    return (
        bytes((busy, door))
        + u32(uptime_s)
        + u16(min(crc_errors, 0xFFFF))
        + u16(min(skipped, 0xFFFF))
        + u32(last_vend_id)
    )


def parse_status(p):
    """-> (busy, door, uptime_s, crc_errors, skipped, last_vend_id)"""
    return p[0], p[1], get_u32(p, 2), get_u16(p, 6), get_u16(p, 8), get_u32(p, 10)


def gate_pulse(relay, pulse_ms):
    return bytes((relay,)) + u16(pulse_ms)


def parse_gate_pulse(p):
    return p[0], get_u16(p, 1)


def sensor(sensor_id, state, ticks):
    return bytes((sensor_id, state)) + u32(ticks & 0xFFFFFFFF)


def parse_sensor(p):
    return p[0], p[1], get_u32(p, 2)


def feedback(led, buzzer, duration_ms):
    return bytes((led, buzzer)) + u16(duration_ms)


def parse_feedback(p):
    return p[0], p[1], get_u16(p, 2)


def error(code, arg):
    return bytes((code,)) + u32(arg & 0xFFFFFFFF)


def parse_error(p):
    return p[0], get_u32(p, 1)


def mdb_host(op, session, funds):
    """op: 1 credit (begin a session with funds), 2 approve, 3 deny, 4 revoke."""
    return bytes((op,)) + u32(session) + u16(funds & 0xFFFF)


def parse_mdb_host(p):
    return p[0], get_u32(p, 1), get_u16(p, 5)


def mdb_event(kind, session, item, price, state):
    return bytes((kind,)) + u32(session) + u16(item) + u16(price) + bytes((state,))


def parse_mdb_event(p):
    """-> (kind, session, item, price, reader state)"""
    return p[0], get_u32(p, 1), get_u16(p, 5), get_u16(p, 7), p[9]
