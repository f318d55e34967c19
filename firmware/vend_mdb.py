"""Board side of the MDB vend channel: the 9-bit UART adapter around the pure reader in mdb.py,
and the bridge between the reader and the host's frame link (MDB_HOST in, MDB_EVENT out).

Rules: the MDB reply is written from inside step(), from state the reader already holds; the
frame link only ever changes that state (credit / approve / deny / revoke) between POLLs.

The flash journal (journal.py, the pulse channel's one record) also holds the MDB vend, so a
reset or power loss mid-vend is settled at the next boot exactly as on the pulse path:
- approve: journal.start(session, item) is written BEFORE the reader queues VEND APPROVED
  (a failed write denies instead: no approval the journal does not know);
- the VMC's VEND SUCCESS -> finish(R_DISPENSED), VEND FAILURE / CANCEL after approval ->
  finish(R_NO_DROP), a VMC RESET after approval -> finish(R_INTERRUPTED); written after the
  reply went out (the flash write stays off the word's own reply path) and before the
  MDB_EVENT is sent to the host;
- a board reset with the record in progress: app.py reports it in BOOT and finishes it
  R_INTERRUPTED (truly unknown); the host's query (VEND_REQ pulse 0) gets the record's result.

UART adapters (cfg["mdb_adapter"], board_config.py), all with one interface: any(),
read_words(now) -> words (data | mode << 8), write_words(words, now):
- "pty": the two-byte word encoding (the simulator, or a bridge that carries the mode bit out
  of band): every word is a flag byte (0/1) then the data byte, see mdb.encode_words;
- "rp2_pio": mdb_uart_rp2.py, a PIO 9-bit UART (RP2040);
- "esp32_parity": mdb_uart_esp32.py, the parity bit as the mode bit (ESP32; receive infers it).
"""

import frame
import mdb
from journal import JournalError

# MDB_HOST ops
OP_CREDIT = 1
OP_APPROVE = 2
OP_DENY = 3
OP_REVOKE = 4


# reader event -> the journal's result for the vend in progress
RESULTS = {
    mdb.EV_VEND_SUCCESS: frame.R_DISPENSED,
    mdb.EV_VEND_FAILURE: frame.R_NO_DROP,  # also a VEND CANCEL after approval: not vended
    mdb.EV_RESET_MID_VEND: frame.R_INTERRUPTED,  # the VMC itself lost the outcome
}


class PtyWords:
    """The pty encoding over a machine.UART: two bytes per word."""

    def __init__(self, cfg):
        import machine  # here, not at the top: the pure parts run under CPython tests

        self.uart = machine.UART(cfg["mdb_uart"], baudrate=9600, tx=cfg.get("mdb_tx"),
                                 rx=cfg.get("mdb_rx"))
        self.decoder = mdb.WordDecoder()

    def any(self):
        return self.uart.any()

    def read_words(self, now):
        n = self.uart.any()
        data = self.uart.read(n) if n else None
        return self.decoder.feed(data) if data else []

    def write_words(self, words, now):
        self.uart.write(mdb.encode_words(words))


def open_words(cfg):
    """The board's word port, by cfg["mdb_adapter"] (imported only where it is used: rp2 and
    esp32 modules exist only on their own port)."""
    kind = cfg.get("mdb_adapter", "pty")
    if kind == "rp2_pio":
        import mdb_uart_rp2

        return mdb_uart_rp2.Rp2Words(cfg)
    if kind == "esp32_parity":
        import mdb_uart_esp32

        return mdb_uart_esp32.Esp32Words(cfg)
    if kind == "pty":
        return PtyWords(cfg)
    raise mdb.MdbError("unknown mdb_adapter: " + str(kind))


class MdbPort:
    """The MDB vend channel of one board: UART <-> mdb.Reader <-> the host link."""

    def __init__(self, cfg, send, journal=None, port=None):
        self.send = send  # send(mtype, payload): the board's reliable link to the host
        self.journal = journal  # journal.Journal: the last vend, across resets (None: not kept)
        self.port = port if port is not None else open_words(cfg)  # port: tests pass words
        self.reader = mdb.Reader(
            country=cfg.get("mdb_country", 0x1392),
            scale=cfg.get("mdb_scale", 1),
            decimals=cfg.get("mdb_decimals", 0),
            session_timeout_ms=cfg.get("mdb_session_ms", 60000),
            decision_timeout_ms=cfg.get("mdb_decision_ms", 4000),
        )

    def step(self, now):
        """Answer what the VMC sent; forward the reader's events to the host. True if busy."""
        r = self.reader
        busy = False
        if self.port.any():
            busy = True
            for w in self.port.read_words(now):
                reply = r.word(w, now)
                if reply:
                    self.port.write_words(reply, now)
        r.tick(now)
        if r.events:
            for ev in r.take_events():
                self._journal_event(ev[0], ev[1])
                self.send(frame.MDB_EVENT, frame.mdb_event(ev[0], ev[1], ev[2], ev[3], r.state))
        return busy

    def _journal_event(self, kind, session):
        """The VMC's outcome of the journaled vend: on flash before the host hears of it."""
        j = self.journal
        if j is None or j.state != frame.J_IN_PROGRESS or j.vend_id != session:
            return
        result = RESULTS.get(kind)
        if result is None:
            return
        try:
            j.finish(result)
        except JournalError:  # the record stays "in progress": interrupted at boot
            self.send(frame.ERROR, frame.error(frame.E_JOURNAL, session))

    def _approve(self, session, now):
        r = self.reader
        if r.session != session or not r.pending or r.state != mdb.VEND:
            r.approve(session, now)  # refused by the table (EV_REFUSED): nothing journaled
            return
        j = self.journal
        if j is not None:
            try:
                j.start(session, min(r.item, 255))  # before VEND APPROVED can leave the board
            except JournalError:  # no approval the journal cannot answer for
                self.send(frame.ERROR, frame.error(frame.E_JOURNAL, session))
                r.deny(session, now)
                return
        r.approve(session, now)

    def host(self, payload, now):
        op, session, funds = frame.parse_mdb_host(payload)
        r = self.reader
        if op == OP_CREDIT:
            r.credit(session, funds, now)
        elif op == OP_APPROVE:
            self._approve(session, now)
        elif op == OP_DENY:
            r.deny(session, now)
        elif op == OP_REVOKE:
            r.revoke(session, now)
        else:
            r.events.append((mdb.EV_REFUSED, session, 0, 0))
        self.step(now)  # events (a refusal) go out at once
