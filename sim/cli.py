"""`ccus card ...`: emulated cards for a site engineer checking a reader, the demo and the tests."""

import argparse
import time

from protocol.touch import CardTech
from sim.cards import DEMO_AID, DEMO_FILE, EmulatedCard, felica_card, my_number_card, type4_card

KINDS = ("felica", "transit", "4a", "4b", "my-number")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("card", help="emulated cards (nfcpy udp driver, or a PC/SC virtual card)")
    s = p.add_subparsers(dest="card_cmd", required=True, metavar="COMMAND")
    em = s.add_parser("emulate", help="tap an emulated card on udp:127.0.0.1:PORT or on vpcd",
                      description="felica: IDm, ID in block 0 of service 0x100B (system 8008); "
                      "transit: a FeliCa card of system 0003; 4a/4b: Type 4 card, ID at the "
                      f"start of file {DEMO_FILE.hex()} of application {DEMO_AID.hex()}; "
                      "my-number: a Type 4B card with only My Number applications.")
    em.add_argument("kind", nargs="?", default="felica", choices=KINDS, help="which card")
    where = em.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="the nfcpy reader's udp port (>= 49152)")
    where.add_argument("--pcsc", action="store_true",
                       help="insert into pcscd's virtual reader (vsmartcard-vpcd, localhost:35963)")
    em.add_argument("--id", dest="ident",
                    help="IDm (16 hex digits) or UID (4A: 8/14/20, 4B: 8 hex digits)")
    em.add_argument("--tid", help="technician ID (14 digits) to put on the card")
    em.add_argument("--taps", type=int, default=1, help="how many taps (default 1)")
    em.add_argument("--interval", type=float, default=1.0, help="seconds between taps")
    em.add_argument("--hold", type=float, default=0.15, help="seconds a card stays (PC/SC: 1.0)")
    em.set_defaults(func=_emulate)


def card_of(kind: str, ident: str | None, tid: str | None) -> EmulatedCard:
    if kind in ("felica", "transit"):
        idm = bytes.fromhex(ident or "0102030405060708")
        if kind == "transit":
            return felica_card(idm, tid=tid, system_code=0x0003, service_code=0x090F)
        return felica_card(idm, tid=tid)
    if kind == "my-number":
        return my_number_card(bytes.fromhex(ident)) if ident else my_number_card()
    tech = CardTech.ISO_A if kind == "4a" else CardTech.ISO_B
    uid = bytes.fromhex(ident or ("04A1B2C3D4E5F6" if kind == "4a" else "A1B2C3D4"))
    return type4_card(tech, uid, tid=tid)


def _emulate(args: argparse.Namespace) -> int:
    card = card_of(args.kind, args.ident, args.tid)
    if args.pcsc:
        return _emulate_pcsc(card, args)
    from sim.nfc_card import CardField

    field = CardField(args.port)
    try:
        for i in range(args.taps):
            seen = field.tap(card, hold_s=args.hold, timeout_s=5.0)
            print(f"tap {i + 1}: {'read by the reader' if seen else 'no reader polled within 5 s'}")
            if i + 1 < args.taps:
                time.sleep(args.interval)
    finally:
        field.close()
    return 0


def _emulate_pcsc(card: EmulatedCard, args: argparse.Namespace) -> int:
    from sim.vpcd import VpcdCard

    for i in range(args.taps):
        vc = VpcdCard(card)
        try:
            vc.insert()
        except OSError as exc:
            print(f"cannot reach vpcd on localhost:35963 (is pcscd running?): {exc}")
            return 1
        read = vc.wait_apdus(1, 5.0)
        time.sleep(max(args.hold, 1.0) if read else 0)
        vc.remove()
        print(f"tap {i + 1}: {'read by the reader' if read else 'no APDU within 5 s'}")
        if i + 1 < args.taps:
            time.sleep(args.interval)
    return 0
