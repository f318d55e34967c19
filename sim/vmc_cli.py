"""`ccus vmc simulate`: the VMC simulator (sim/vmc.py) against a board's MDB line.

--port PATH   drive a board whose MDB UART is that serial port / pty (an agent credits it);
--board       start the simulated board (real firmware under the MicroPython unix port) with a
              scripted host on its frame link that credits each session and approves, and run
              the scenario list: setup, a dispense, a failure, a cancel, an out-of-sequence
              command, READER DISABLE with a session open, a reset mid-vend. Prints one line
              per scenario and the host's events.
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

from firmware import mdb
from sim.vmc import PROFILES, PtyWire, Vmc, VmcError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("vmc", help="a vending machine controller (MDB master) simulator")
    s = p.add_subparsers(dest="vmc_cmd", required=True, metavar="COMMAND")
    sim = s.add_parser("simulate", help="drive an MDB cashless reader over a pty")
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="the reader's MDB serial port (two-byte word encoding)")
    where.add_argument("--board", action="store_true",
                       help="start the simulated board and a scripted host, run every scenario")
    sim.add_argument("--profile", default="standard", choices=sorted(PROFILES))
    sim.add_argument("--item", type=int, default=1)
    sim.add_argument("--price", type=int, default=120, help="yen (scale factor 1)")
    sim.add_argument("--vends", type=int, default=1, help="--port: sessions to wait for")
    sim.add_argument("--timeout", type=float, default=0.2, help="reply timeout, s (MDB: 0.005)")
    sim.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    if args.board:
        return _with_board(args)
    try:
        fd = os.open(args.port, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        print(f"ccus vmc: cannot open {args.port}: {e.strerror}: give the reader's MDB port",
              file=sys.stderr)
        return 2
    tty.setraw(fd)
    vmc = Vmc(PtyWire(fd), profile=args.profile, reply_timeout=args.timeout)
    try:
        vmc.setup()
        for _ in range(args.vends):
            vmc.poll_until((mdb.P_BEGIN_SESSION,), polls=100000)
            print(f"session: funds {vmc.funds} yen -> {vmc.select(args.item, args.price)}")
    except VmcError as e:
        print(f"ccus vmc: {e}", file=sys.stderr)
        return 1
    finally:
        for line in vmc.log:
            print(line)
        os.close(fd)
    return 0


def _with_board(args: argparse.Namespace) -> int:
    from edge.board import BoardLink
    from firmware import frame
    from sim.board import BoardProcess

    vm, vs = os.openpty()
    tty.setraw(vm)
    tty.setraw(vs)
    work = Path(tempfile.mkdtemp(prefix="ccus-vmc-"))
    board = BoardProcess(work, uarts={"1": os.ttyname(vs)}, mdb_uart=1, wdt_ms=3000)
    stop = threading.Event()
    th: threading.Thread | None = None
    try:
        board.start()
        link = BoardLink(board.port, ack_timeout=0.2)

        def host() -> None:  # a scripted agent: credit a session whenever none is open
            session = 0
            open_ = False
            while not stop.is_set():
                link.pump(0.01)
                for kind, sid, item, price, _st in link.take_mdb_events():
                    print(f"  host: {mdb.EV_NAMES.get(kind, kind)} session {sid} item {item} "
                          f"price {price}")
                    if kind == mdb.EV_VEND_REQUEST:
                        link.request(frame.MDB_HOST, frame.mdb_host(2, sid, 0))
                    elif kind in (mdb.EV_SESSION_END, mdb.EV_RESET, mdb.EV_RESET_MID_VEND,
                                  mdb.EV_REFUSED):
                        open_ = False
                if not open_:
                    session += 1
                    link.request(frame.MDB_HOST, frame.mdb_host(1, session, 150))
                    open_ = True
                    time.sleep(0.05)

        vmc = Vmc(PtyWire(vm), profile=args.profile, reply_timeout=args.timeout)
        vmc.setup()
        th = threading.Thread(target=host, daemon=True)
        th.start()
        for name, dispense in (("dispense", True), ("failure", False)):
            vmc.poll_until((mdb.P_BEGIN_SESSION,))
            print(f"{name}: {vmc.select(args.item, args.price, dispense=dispense)}")
        vmc.poll_until((mdb.P_BEGIN_SESSION,))
        vmc.vend_request(args.item, args.price)
        print(f"cancel: {vmc.vend_cancel().code == mdb.P_VEND_DENIED and 'denied' or '?'}")
        vmc.session_complete()
        print(f"out of sequence: {vmc.vend_success(args.item).code == mdb.P_OUT_OF_SEQUENCE}")
        vmc.poll_until((mdb.P_BEGIN_SESSION,))
        vmc.reader_disable()  # the machine disables the reader with credit shown
        vmc.poll_until((mdb.P_SESSION_CANCEL,))
        ended = vmc.session_complete().code == mdb.P_END_SESSION
        print(f"disable in session: {ended and vmc.send([0x14, 0x01]).ack}")  # enabled again
        vmc.poll_until((mdb.P_BEGIN_SESSION,))
        vmc.vend_request(args.item, args.price)
        vmc.poll_until((mdb.P_VEND_APPROVED,))
        print(f"reset mid-vend: {vmc.reset().ack}")
        time.sleep(0.3)
        print(f"RETs {vmc.rets}, resends {vmc.resends}, polls {vmc.polls}")
    except VmcError as e:
        print(f"ccus vmc: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        if th is not None:
            th.join(2)  # before the board's pty goes: the host thread reads it
        board.close()
        shutil.rmtree(work, ignore_errors=True)
        os.close(vm)
        os.close(vs)
    return 0
