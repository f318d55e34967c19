"""`ccus card ...`: emulated cards for a site engineer checking a reader, the demo and the tests."""

import argparse
import time

from edge.reader.cards import felica_card
from edge.reader.emulator import CardField


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("card", help="emulated cards (nfcpy udp driver)")
    s = p.add_subparsers(dest="card_cmd", required=True, metavar="COMMAND")
    em = s.add_parser("emulate", help="tap an emulated FeliCa card on udp:127.0.0.1:PORT")
    em.add_argument("--port", type=int, required=True, help="the reader's udp port (>= 49152)")
    em.add_argument("--idm", default="0102030405060708", help="IDm, 16 hex digits")
    em.add_argument("--tid", help="technician ID to put in block 0 of service 0x100B")
    em.add_argument("--taps", type=int, default=1, help="how many taps (default 1)")
    em.add_argument("--interval", type=float, default=1.0, help="seconds between taps")
    em.set_defaults(func=_emulate)


def _emulate(args: argparse.Namespace) -> int:
    field = CardField(args.port)
    card = felica_card(bytes.fromhex(args.idm), tid=args.tid)
    try:
        for i in range(args.taps):
            seen = field.tap(card, timeout_s=5.0)
            print(f"tap {i + 1}: {'read by the reader' if seen else 'no reader polled within 5 s'}")
            if i + 1 < args.taps:
                time.sleep(args.interval)
    finally:
        field.close()
    return 0
