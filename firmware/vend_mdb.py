"""Board side of the MDB vend channel: the 9-bit UART adapter around the pure reader in mdb.py,
and the bridge between the reader and the host's frame link (MDB_HOST in, MDB_EVENT out).

Rules: the MDB reply is written from inside step(), from state the reader already holds; the
frame link only ever changes that state (credit / approve / deny / revoke) between POLLs.

UART adapters (cfg["mdb_adapter"], board_config.py), all with one interface: any(),
read_words(now) -> words (data | mode << 8), write_words(words, now):
- "pty": the two-byte word encoding (the simulator, or a bridge that carries the mode bit out
  of band): every word is a flag byte (0/1) then the data byte, see mdb.encode_words;
- "rp2_pio": mdb_uart_rp2.py, a PIO 9-bit UART (RP2040);
- "esp32_parity": mdb_uart_esp32.py, the parity bit as the mode bit (ESP32; receive infers it).
"""

import frame
import machine
import mdb

# MDB_HOST ops
OP_CREDIT = 1
OP_APPROVE = 2
OP_DENY = 3
OP_REVOKE = 4


class PtyWords:
    """The pty encoding over a machine.UART: two bytes per word."""

    def __init__(self, cfg):
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

    def __init__(self, cfg, send):
        self.send = send  # send(mtype, payload): the board's reliable link to the host
        self.port = open_words(cfg)
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
