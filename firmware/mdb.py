"""MDB cashless device #1 (address 0x10): the 9-bit word encoding, the command parser and the
reader state machine as a table. Pure and sans-IO (no UART, no clock): callers pass words and a
millisecond tick in and take reply words and host events out.

Rules of this file:
- it runs unchanged on CPython 3.11+ and MicroPython 1.2x: no typing, dataclasses, enum,
  __future__ or struct;
- nothing here blocks or allocates much per word: a POLL is answered from state the reader
  already holds (the agent's decision is pushed in ahead of time with credit()/approve()/deny()),
  so the 5 ms reply budget does not depend on the host link;
- the reader never raises on line input: bad words are counted and dropped.

Words are ints 0..0x1FF: bit 8 is the MDB mode bit (set by the VMC on an address byte, by the
reader on the last byte of a reply, the checksum, or on a lone ACK). On the pty (the simulator) a
word travels as two bytes: a flag byte (0 or 1: the mode bit) then the data byte. The real
UART adapters (RP2040 PIO, ESP32 parity trick) are described in docs/vending.md.
"""

try:  # MicroPython: tick counters wrap, so differences go through ticks_diff.
    from time import ticks_diff  # type: ignore[attr-defined]
except ImportError:  # CPython: callers pass monotonic milliseconds.

    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b


# ---------------------------------------------------------------- wire constants

ADDRESS = 0x10  # cashless device #1; the command is address | (0..7)
MODE = 0x100
ACK = 0x00
RET = 0xAA
NAK = 0xFF

# commands (low 3 bits of the address byte)
CMD_RESET = 0
CMD_SETUP = 1
CMD_POLL = 2
CMD_VEND = 3
CMD_READER = 4
CMD_EXPANSION = 7

# parsed command codes (events into the table): (cmd << 4) | subcommand
RESET = 0x00
SETUP_CONFIG = 0x10
SETUP_PRICES = 0x11
POLL = 0x20
VEND_REQUEST = 0x30
VEND_CANCEL = 0x31
VEND_SUCCESS = 0x32
VEND_FAILURE = 0x33
SESSION_COMPLETE = 0x34
CASH_SALE = 0x35
READER_DISABLE = 0x40
READER_ENABLE = 0x41
READER_CANCEL = 0x42
EXPANSION_ID = 0x70
EXPANSION_OPTIONS = 0x74  # level 3 "optional feature enabled": we announce level 1, enable none

# host-side inputs and the reader's own timer (events into the table, not on the MDB wire)
H_CREDIT = 0x100  # the agent reserved an allowance: begin a session with these funds
H_REVOKE = 0x101  # the reservation is gone: cancel the session / deny what is pending
H_APPROVE = 0x102  # the agent journaled the vend start: approve the pending VEND REQUEST
H_DENY = 0x103
T_TIMEOUT = 0x104  # session (or pending decision) timed out

# Command length in bytes, address byte included, checksum excluded: (cmd, sub) or (cmd, None)
CMD_LEN = {
    (CMD_RESET, None): 1,
    (CMD_POLL, None): 1,
    (CMD_SETUP, 0): 6,  # config data: VMC feature level, columns, rows, display info
    (CMD_SETUP, 1): 6,  # max / min price (level 1: 2 bytes each)
    (CMD_VEND, 0): 6,  # vend request: price(2) item(2)
    (CMD_VEND, 1): 2,  # vend cancel
    (CMD_VEND, 2): 4,  # vend success: item(2)
    (CMD_VEND, 3): 2,  # vend failure
    (CMD_VEND, 4): 2,  # session complete
    (CMD_VEND, 5): 6,  # cash sale: price(2) item(2)
    (CMD_READER, 0): 2,
    (CMD_READER, 1): 2,
    (CMD_READER, 2): 2,
    (CMD_EXPANSION, 0): 31,  # request id: manufacturer(3) serial(12) model(12) version(2)
    (CMD_EXPANSION, 4): 6,  # optional feature enabled: 4 bytes of bits (level 3 VMCs send it)
}

# poll / immediate reply codes (first byte of a reader reply)
P_JUST_RESET = 0x00
P_CONFIG = 0x01
P_BEGIN_SESSION = 0x03
P_SESSION_CANCEL = 0x04
P_VEND_APPROVED = 0x05
P_VEND_DENIED = 0x06
P_END_SESSION = 0x07
P_CANCELLED = 0x08
P_PERIPHERAL_ID = 0x09
P_OUT_OF_SEQUENCE = 0x0B

# ---------------------------------------------------------------- states and the table

INACTIVE = 0
DISABLED = 1
ENABLED = 2
SESSION_IDLE = 3
VEND = 4
STATE_NAMES = ("INACTIVE", "DISABLED", "ENABLED", "SESSION_IDLE", "VEND")

# actions (what the reader does besides changing state)
A_ACK = 0  # reply ACK
A_CONFIG = 1  # reply READER CONFIG DATA
A_PRICES = 2  # store max/min price, ACK
A_ID = 3  # reply PERIPHERAL ID
A_CANCELLED = 4  # reply CANCELLED
A_VEND_REQ = 5  # ACK; hold the request, tell the host, wait for its decision
A_VEND_CANCEL = 6  # reply VEND DENIED; tell the host
A_SUCCESS = 7  # ACK; tell the host (commit)
A_FAILURE = 8  # ACK; tell the host (release)
A_COMPLETE = 9  # reply END SESSION; tell the host
A_CREDIT = 10  # queue BEGIN SESSION with the funds
A_REVOKE = 11  # queue SESSION CANCEL REQUEST (or VEND DENIED if a request is pending)
A_APPROVE = 12  # queue VEND APPROVED
A_DENY = 13  # queue VEND DENIED
A_TIMEOUT = 14  # like A_REVOKE, and tell the host it timed out
A_NONE = 15  # ACK, nothing else (a harmless repeat)
A_REPEAT = 16  # a repeat of the last VEND SUCCESS / FAILURE (our ACK was lost): ACK, no event
A_DISABLE_SESSION = 17  # READER DISABLE with a session open: ACK; end the session, then DISABLED
A_ENABLE_SESSION = 18  # READER ENABLE with a session open: ACK; the session ends in ENABLED again
A_OPTIONS = 19  # EXPANSION optional feature enable (level 3 VMCs): ACK, enable nothing

# (state, event) -> (new state, action). RESET and POLL are handled before the table (same in
# every state); any VMC command missing here is answered OUT OF SEQUENCE, any host input missing
# here is refused (EV_REFUSED) and changes nothing.
TABLE = {
    (INACTIVE, SETUP_CONFIG): (DISABLED, A_CONFIG),
    (DISABLED, SETUP_CONFIG): (DISABLED, A_CONFIG),  # quirk: some VMCs send SETUP twice
    (ENABLED, SETUP_CONFIG): (ENABLED, A_CONFIG),
    (INACTIVE, SETUP_PRICES): (INACTIVE, A_PRICES),
    (DISABLED, SETUP_PRICES): (DISABLED, A_PRICES),
    (ENABLED, SETUP_PRICES): (ENABLED, A_PRICES),
    (INACTIVE, EXPANSION_ID): (INACTIVE, A_ID),
    (DISABLED, EXPANSION_ID): (DISABLED, A_ID),
    (ENABLED, EXPANSION_ID): (ENABLED, A_ID),
    (INACTIVE, EXPANSION_OPTIONS): (INACTIVE, A_OPTIONS),
    (DISABLED, EXPANSION_OPTIONS): (DISABLED, A_OPTIONS),
    (ENABLED, EXPANSION_OPTIONS): (ENABLED, A_OPTIONS),
    (DISABLED, READER_ENABLE): (ENABLED, A_ACK),
    (ENABLED, READER_ENABLE): (ENABLED, A_NONE),
    (DISABLED, READER_DISABLE): (DISABLED, A_NONE),
    (ENABLED, READER_DISABLE): (DISABLED, A_ACK),
    # READER DISABLE with a session open (MDB 4.2, 7.4.12: "any transaction in progress will
    # not be affected and should continue to its normal completion"): a vend already asked for
    # runs to its VEND SUCCESS / FAILURE; an idle session is cancelled (funds withdrawn, SESSION
    # CANCEL REQUEST); SESSION COMPLETE then ends in DISABLED instead of ENABLED.
    (SESSION_IDLE, READER_DISABLE): (SESSION_IDLE, A_DISABLE_SESSION),
    (VEND, READER_DISABLE): (VEND, A_DISABLE_SESSION),
    (SESSION_IDLE, READER_ENABLE): (SESSION_IDLE, A_ENABLE_SESSION),
    (VEND, READER_ENABLE): (VEND, A_ENABLE_SESSION),
    (DISABLED, READER_CANCEL): (DISABLED, A_CANCELLED),
    (ENABLED, READER_CANCEL): (ENABLED, A_CANCELLED),
    (SESSION_IDLE, VEND_REQUEST): (VEND, A_VEND_REQ),
    (VEND, VEND_CANCEL): (SESSION_IDLE, A_VEND_CANCEL),
    (VEND, VEND_SUCCESS): (SESSION_IDLE, A_SUCCESS),
    (VEND, VEND_FAILURE): (SESSION_IDLE, A_FAILURE),
    (SESSION_IDLE, VEND_SUCCESS): (SESSION_IDLE, A_REPEAT),
    (SESSION_IDLE, VEND_FAILURE): (SESSION_IDLE, A_REPEAT),
    (SESSION_IDLE, SESSION_COMPLETE): (ENABLED, A_COMPLETE),
    (ENABLED, CASH_SALE): (ENABLED, A_NONE),
    (SESSION_IDLE, CASH_SALE): (SESSION_IDLE, A_NONE),
    (ENABLED, H_CREDIT): (SESSION_IDLE, A_CREDIT),
    (SESSION_IDLE, H_REVOKE): (SESSION_IDLE, A_REVOKE),
    (VEND, H_REVOKE): (VEND, A_REVOKE),
    (VEND, H_APPROVE): (VEND, A_APPROVE),
    (VEND, H_DENY): (SESSION_IDLE, A_DENY),
    (SESSION_IDLE, T_TIMEOUT): (SESSION_IDLE, A_TIMEOUT),
    (VEND, T_TIMEOUT): (VEND, A_TIMEOUT),
}

# events for the host (Reader.events: (kind, session, item, price))
EV_VEND_REQUEST = 1  # the VMC asks to vend item at price: journal START, then approve()/deny()
EV_VEND_SUCCESS = 2  # commit
EV_VEND_FAILURE = 3  # release
EV_VEND_CANCEL = 4  # the VMC cancelled the request before approval/after denial: release
EV_SESSION_END = 5  # session over (SESSION COMPLETE); a reservation never vended is released
EV_RESET_MID_VEND = 6  # the VMC reset after VEND APPROVED without a result: indeterminate
EV_RESET = 7  # the VMC reset with a session open but no vend approved: release
EV_TIMEOUT = 8  # the session timed out; the reader asked the VMC to cancel
EV_DENIED = 9  # the reader denied a vend request by itself (price above funds, no decision)
EV_REFUSED = 10  # a host input made no sense in this state (session = the one named)
EV_DISABLED = 11  # the VMC disabled the reader in a session: nothing more will be approved in it
EV_NAMES = {
    1: "vend_request", 2: "vend_success", 3: "vend_failure", 4: "vend_cancel",
    5: "session_end", 6: "reset_mid_vend", 7: "reset", 8: "timeout", 9: "denied", 10: "refused",
    11: "disabled",
}  # fmt: skip


class MdbError(ValueError):
    pass


# ---------------------------------------------------------------- 9-bit words on a byte pipe


def encode_words(words):
    """Words (0..0x1FF) -> the pty encoding: per word a flag byte (mode bit) and the data byte."""
    out = bytearray()
    for w in words:
        if not 0 <= w <= 0x1FF:
            raise MdbError("word out of range: " + str(w))
        out.append(w >> 8)
        out.append(w & 0xFF)
    return bytes(out)


class WordDecoder:
    """Bytes of the pty encoding -> words. A flag byte above 1 cannot start a word: it is
    skipped (counted), which puts a decoder that lost one byte back in step."""

    def __init__(self):
        self._flag = -1
        self.skipped = 0

    def feed(self, data):
        out = []
        for b in data:
            if self._flag < 0:
                if b > 1:
                    self.skipped += 1
                else:
                    self._flag = b
            else:
                out.append((self._flag << 8) | b)
                self._flag = -1
        return out


def checksum(data):
    s = 0
    for b in data:
        s += b
    return s & 0xFF


def block(data):
    """A reader reply: data bytes, then the checksum with the mode bit set."""
    out = list(data)
    out.append(MODE | checksum(data))
    return out


def command_words(data):
    """A VMC command: the address byte with the mode bit, the rest, then the checksum."""
    out = [MODE | data[0]]
    for b in data[1:]:
        out.append(b)
    out.append(checksum(data))
    return out


def u16(v):
    return ((v >> 8) & 0xFF, v & 0xFF)


# ---------------------------------------------------------------- the reader


class Reader:
    """The cashless device. Feed it words with word(w, now) and it returns the words to answer.

    Host side (the agent, through the frame link) calls credit(session, funds), approve(),
    deny(), revoke(); the reader's own findings for the host appear in `events` (take_events()).
    tick(now) runs the session timeout.
    """

    def __init__(self, country=0x1392, scale=1, decimals=0, max_response_s=5,
                 session_timeout_ms=60000, decision_timeout_ms=4000, ident=None):
        self.country = country  # BCD; 0x1392: ISO 4217 numeric 392 (yen), from config
        self.scale = scale
        self.decimals = decimals
        self.max_response_s = max_response_s
        self.session_timeout_ms = session_timeout_ms
        self.decision_timeout_ms = decision_timeout_ms  # < max_response_s: we deny, not the VMC
        self.ident = ident or b"CCU" + b"000000000001" + b"CCUS-TOUCH  " + b"\x00\x01"
        self.state = INACTIVE
        self.vmc_level = 0
        self.max_price = 0xFFFF
        self.min_price = 0
        self.session = 0  # the host's id for the open session (its vend_id); 0: none
        self.funds = 0
        self.item = 0
        self.price = 0
        self.approved = False  # VEND APPROVED queued or sent for the current request
        self.pending = False  # a VEND REQUEST waits for the host's decision
        self.last_result = -1  # VEND_SUCCESS / VEND_FAILURE last reported in this session
        self.disable_at_end = False  # READER DISABLE came in a session: end it in DISABLED
        self.since = 0  # tick the session / pending request started
        self.queue = []  # poll replies waiting (lists of words)
        self.queue.append(block((P_JUST_RESET,)))
        self.out = None  # the data reply sent last, awaiting the VMC's ACK
        self.out_from_poll = False
        self.events = []
        self._cmd = []  # bytes of the command being received (address byte first)
        self._want = 0
        self.bad_checksums = 0
        self.foreign = 0  # bytes for other peripherals
        self.out_of_sequence = 0
        self.approvals = 0

    # ------------------------------------------------------------ line side

    def word(self, w, now):
        """One word from the VMC; returns the reply words (empty: say nothing)."""
        if w == MODE | ACK and not self._cmd and self.out is not None:
            w = ACK  # quirk (MateDealer: a Sanden VDI 100-5): an ACK with the mode bit set
        if w & MODE:
            self._take_back()
            addr = w & 0xFF
            self._cmd = []
            if addr & 0xF8 != ADDRESS:
                self.foreign += 1
                self._want = 0
                return []
            self._cmd.append(addr)
            self._want = -1  # not known until the subcommand (or the length table) says
            if CMD_LEN.get((addr & 7, None)):
                self._want = CMD_LEN[(addr & 7, None)]
            return []
        b = w & 0xFF
        if not self._cmd:
            return self._control(b)
        if self._want == -1 and len(self._cmd) == 1:
            n = CMD_LEN.get((self._cmd[0] & 7, b))
            if n is None:
                self._cmd = []
                return [NAK]  # an unknown subcommand: the VMC will not get an answer it expects
            self._want = n
        if len(self._cmd) < self._want:
            self._cmd.append(b)
            return []
        # b is the checksum
        data = self._cmd
        self._cmd = []
        if checksum(data) != b:
            self.bad_checksums += 1
            return [NAK]
        return self._command(data, now)

    def _control(self, b):
        """ACK / RET / NAK from the VMC about our last data reply."""
        if self.out is None:
            return []
        if b == ACK:
            self.out = None
            return []
        if b == RET:
            return list(self.out)
        # NAK (or noise): not delivered; a poll reply goes back to the queue for the next POLL
        self._take_back()
        return []

    def _take_back(self):
        """A reply the VMC did not ACK: poll replies are sent again at the next POLL."""
        if self.out is not None and self.out_from_poll:
            self.queue.insert(0, self.out)
        self.out = None

    def _send(self, words, from_poll=False):
        self.out = words
        self.out_from_poll = from_poll
        return list(words)

    def _command(self, data, now):
        cmd = data[0] & 7
        sub = data[1] if len(data) > 1 else None
        code = (cmd << 4) | (sub or 0)
        if code == RESET:
            return self._reset()
        if code == POLL:
            if self.queue:
                return self._send(self.queue.pop(0), True)
            return [MODE | ACK]
        t = TABLE.get((self.state, code))
        if t is None:
            self.out_of_sequence += 1
            return self._send(block((P_OUT_OF_SEQUENCE,)))
        self.state = t[0]
        return self._act(t[1], data, now)

    def _reset(self):
        if self.session:
            if self.state == VEND and self.approved:
                self._event(EV_RESET_MID_VEND)
            else:
                self._event(EV_RESET)
        self.state = INACTIVE
        self._end()
        self.queue = [block((P_JUST_RESET,))]
        self.out = None
        return [MODE | ACK]

    def _end(self):
        self.session = 0
        self.funds = 0
        self.item = 0
        self.price = 0
        self.approved = False
        self.pending = False
        self.last_result = -1
        self.disable_at_end = False

    def _event(self, kind):
        if len(self.events) < 16:  # the host drains it every loop; never grow without bound
            self.events.append((kind, self.session, self.item, self.price))

    def _act(self, a, data, now):
        if a in (A_ACK, A_NONE):
            return [MODE | ACK]
        if a == A_CONFIG:
            self.vmc_level = data[2]
            c = u16(self.country)
            reply = (P_CONFIG, 1, c[0], c[1], self.scale, self.decimals, self.max_response_s, 0)
            return self._send(block(reply))
        if a == A_PRICES:
            self.max_price = (data[2] << 8) | data[3]
            self.min_price = (data[4] << 8) | data[5]
            return [MODE | ACK]
        if a == A_ID:
            return self._send(block(bytes((P_PERIPHERAL_ID,)) + self.ident))
        if a == A_CANCELLED:
            return self._send(block((P_CANCELLED,)))
        if a == A_OPTIONS:
            return [MODE | ACK]
        if a == A_DISABLE_SESSION:
            if not self.disable_at_end:
                self.disable_at_end = True
                self.funds = 0
                self._event(EV_DISABLED)
                if self.state == SESSION_IDLE:  # no vend in progress: ask the VMC to end it
                    self.queue.append(block((P_SESSION_CANCEL,)))
            return [MODE | ACK]
        if a == A_ENABLE_SESSION:
            self.disable_at_end = False  # the session still ends (funds are gone), in ENABLED
            return [MODE | ACK]
        if a == A_VEND_REQ:
            self.price = (data[2] << 8) | data[3]
            self.item = (data[4] << 8) | data[5]
            self.approved = False
            self.last_result = -1
            if self.session == 0 or self.disable_at_end or self.price > self.funds:
                self.state = SESSION_IDLE
                self.queue.append(block((P_VEND_DENIED,)))
                self._event(EV_DENIED)
                self._cancel_if_disabled()
            else:
                self.pending = True
                self.since = now
                self._event(EV_VEND_REQUEST)
            return [MODE | ACK]
        if a == A_VEND_CANCEL:
            self.pending = False
            self._drop_queued(P_VEND_APPROVED)
            if not self.approved:
                self._event(EV_VEND_CANCEL)
            else:  # cancelled after approval: the VMC did not vend (spec: cancel = no vend)
                self._event(EV_VEND_FAILURE)
            self.approved = False
            self._cancel_if_disabled()
            return self._send(block((P_VEND_DENIED,)))
        if a == A_REPEAT:
            code = (data[0] & 7) << 4 | data[1]
            if code == self.last_result:
                return [MODE | ACK]
            self.out_of_sequence += 1
            return self._send(block((P_OUT_OF_SEQUENCE,)))
        if a in (A_SUCCESS, A_FAILURE):
            if not self.approved:  # a result for a vend we never approved: refuse it
                self.state = VEND
                self.out_of_sequence += 1
                return self._send(block((P_OUT_OF_SEQUENCE,)))
            if a == A_SUCCESS and len(data) >= 4:
                self.item = (data[2] << 8) | data[3]
            self._event(EV_VEND_SUCCESS if a == A_SUCCESS else EV_VEND_FAILURE)
            self.last_result = VEND_SUCCESS if a == A_SUCCESS else VEND_FAILURE
            self.approved = False
            self.funds = 0  # one vend per session: one allowance, one drink
            self.since = now
            self._cancel_if_disabled()  # disabled during the vend: now end the session
            return [MODE | ACK]
        if a == A_COMPLETE:
            if self.disable_at_end:
                self.state = DISABLED  # "enable/disable itself appropriately" (MDB 7.2.4)
            self._event(EV_SESSION_END)
            self._end()
            self._drop_queued(P_SESSION_CANCEL)
            return self._send(block((P_END_SESSION,)))
        return [MODE | ACK]

    def _cancel_if_disabled(self):
        """Back in SESSION_IDLE after a vend the VMC disabled us during: ask it to end the
        session (SESSION CANCEL REQUEST), once."""
        if self.disable_at_end:
            self._drop_queued(P_SESSION_CANCEL)
            self.queue.append(block((P_SESSION_CANCEL,)))

    def _drop_queued(self, code):
        self.queue = [q for q in self.queue if q[0] != code]

    # ------------------------------------------------------------ host side

    def host(self, code, now, session=0, funds=0):
        """A host input (H_*); returns True if the table took it."""
        if code != H_CREDIT and session != self.session:
            self.events.append((EV_REFUSED, session, 0, 0))
            return False
        t = TABLE.get((self.state, code))
        if t is None:
            self.events.append((EV_REFUSED, session, 0, 0))
            return False
        if code == H_APPROVE and not self.pending:
            self.events.append((EV_REFUSED, session, 0, 0))
            return False
        self.state = t[0]
        a = t[1]
        if a == A_CREDIT:
            self.session = session
            self.funds = min(funds, 0xFFFE)  # 0xFFFF means "funds unknown" on the wire
            self.since = now
            f = u16(self.funds)
            self.queue.append(block((P_BEGIN_SESSION, f[0], f[1])))
        elif a == A_APPROVE:
            self.pending = False
            self.approved = True
            self.approvals += 1
            p = u16(self.price)
            self.queue.append(block((P_VEND_APPROVED, p[0], p[1])))
        elif a == A_DENY:
            self.pending = False
            self.queue.append(block((P_VEND_DENIED,)))
            self._cancel_if_disabled()
        elif a in (A_REVOKE, A_TIMEOUT):
            if a == A_TIMEOUT:
                self._event(EV_TIMEOUT)
            self.funds = 0
            if self.state == VEND and self.pending:
                self.pending = False
                self.state = SESSION_IDLE
                self.queue.append(block((P_VEND_DENIED,)))
                self._cancel_if_disabled()
            elif self.state == SESSION_IDLE:
                self.queue.append(block((P_SESSION_CANCEL,)))
            self.since = now
        return True

    def credit(self, session, funds, now):
        return self.host(H_CREDIT, now, session, funds)

    def approve(self, session, now):
        return self.host(H_APPROVE, now, session)

    def deny(self, session, now):
        return self.host(H_DENY, now, session)

    def revoke(self, session, now):
        return self.host(H_REVOKE, now, session)

    def tick(self, now):
        """Timeouts: a pending decision is denied, an idle session is cancelled."""
        if not self.session:
            return
        el = ticks_diff(now, self.since)
        pending_late = self.pending and el >= self.decision_timeout_ms
        if pending_late or (self.state == SESSION_IDLE and el >= self.session_timeout_ms):
            self.host(T_TIMEOUT, now, self.session)

    def take_events(self):
        ev = self.events
        self.events = []
        return ev
