"""Board side of the MDB vend channel: the 9-bit UART adapter around the pure reader in mdb.py,
and the bridge between the reader and the host's frame link (MDB_HOST in, MDB_EVENT out).

Rules: the MDB reply is written from inside step(), from state the reader already holds; the
frame link only ever changes that state (credit / approve / deny / revoke) between POLLs.

UART adapters:
- today: the two-byte word encoding (the simulator, or a bridge that carries the mode bit out
  of band): every word is a flag byte (0/1) then the data byte, see mdb.encode_words. So
  board_config's "mdb_uart" stays None on real boards until a 9-bit adapter exists;
- on an RP2040 a PIO 9-bit UART program, on an ESP32 the UART parity trick (the parity of each
  byte set per byte so the parity bit is the mode bit): not written yet, docs/vending.md.
"""

import frame
import machine
import mdb

# MDB_HOST ops
OP_CREDIT = 1
OP_APPROVE = 2
OP_DENY = 3
OP_REVOKE = 4


class MdbPort:
    """The MDB vend channel of one board: UART <-> mdb.Reader <-> the host link."""

    def __init__(self, cfg, send):
        self.send = send  # send(mtype, payload): the board's reliable link to the host
        self.uart = machine.UART(cfg["mdb_uart"], baudrate=9600, tx=cfg.get("mdb_tx"),
                                 rx=cfg.get("mdb_rx"))
        self.reader = mdb.Reader(
            country=cfg.get("mdb_country", 0x1392),
            scale=cfg.get("mdb_scale", 1),
            decimals=cfg.get("mdb_decimals", 0),
            session_timeout_ms=cfg.get("mdb_session_ms", 60000),
            decision_timeout_ms=cfg.get("mdb_decision_ms", 4000),
        )
        self.words = mdb.WordDecoder()

    def step(self, now):
        """Answer what the VMC sent; forward the reader's events to the host. True if busy."""
        r = self.reader
        n = self.uart.any()
        busy = False
        if n:
            busy = True
            for w in self.words.feed(self.uart.read(n)):
                reply = r.word(w, now)
                if reply:
                    self.uart.write(mdb.encode_words(reply))
        r.tick(now)
        if r.events:
            for ev in r.take_events():
                self.send(frame.MDB_EVENT, frame.mdb_event(ev[0], ev[1], ev[2], ev[3], r.state))
        return busy

    def host(self, payload, now):
        op, session, funds = frame.parse_mdb_host(payload)
        r = self.reader
        if op == OP_CREDIT:
            r.credit(session, funds, now)
        elif op == OP_APPROVE:
            r.approve(session, now)
        elif op == OP_DENY:
            r.deny(session, now)
        elif op == OP_REVOKE:
            r.revoke(session, now)
        else:
            r.events.append((mdb.EV_REFUSED, session, 0, 0))
        self.step(now)  # events (a refusal) go out at once
