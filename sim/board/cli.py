"""`ccus board simulate`: a controller board on this machine, for trying a site without hardware.

The board is the real firmware (firmware/) under the MicroPython unix port, on a pty; the
agent's `[vending] serial` or `[gate] serial` names the port it prints. What a machine or a
door would do is wired in: a vend line pulse drops a can past the drop sensor, a gate relay
pulse lets a person push the door open and shut. Lines typed on standard input drive the
board's inputs while it runs:

    door open | door close          the door sensor (a forced door, a door held open)
    emergency on | emergency off    the fire-alarm release contact
    walk off | walk on              the next gate pulses open a door nobody pushes (not_passed)
    kill | start                    pull the board's power / power it up again (watchdog, reset)
    quit                            stop

Every output the firmware drives is printed in words (relay, vend line, LEDs, buzzer).
"""

from __future__ import annotations

import argparse
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sim.board.process import DOOR, DROP, EMERGENCY, GATE, GATE_OUT, VEND_PIN, BoardProcess

# rp2 pin map (firmware/board_config.py) -> what a person sees
OUTPUTS = {GATE: "gate relay (entry)", GATE_OUT: "gate relay (exit)",
           **{pin: f"vend line {slot}" for slot, pin in VEND_PIN.items()}}
INPUTS = {"door": DOOR, "emergency": EMERGENCY}


def links(kind: str) -> list[dict[str, Any]]:
    """What the machine around the board does when the board drives an output."""
    if kind == "vending":  # a can falls past the drop sensor 120 ms after the vend pulse
        return [{"out": pin, "in": DROP, "delay_ms": 120, "hold_ms": 150, "level": 0}
                for pin in VEND_PIN.values()]
    # a person pushes the opened door 150 ms after the relay pulse and it closes again
    return [{"out": pin, "in": DOOR, "delay_ms": 150, "hold_ms": 200, "level": 0}
            for pin in (GATE, GATE_OUT)]


def parse_command(line: str) -> tuple[str, ...] | None:
    """One typed line -> a command tuple, or None if it is not one (pure)."""
    words = line.strip().lower().split()
    if words in (["quit"], ["exit"], ["kill"], ["start"]):
        return (words[0] if words[0] != "exit" else "quit",)
    if len(words) == 2 and words[0] == "door" and words[1] in ("open", "close"):
        return ("set", str(DOOR), "0" if words[1] == "open" else "1")
    if len(words) == 2 and words[0] == "emergency" and words[1] in ("on", "off"):
        return ("set", str(EMERGENCY), "0" if words[1] == "on" else "1")
    if len(words) == 2 and words[0] == "walk" and words[1] in ("on", "off"):
        return ("walk", words[1])
    return None


def describe(pin: int, level: int) -> str:
    return f"{OUTPUTS.get(pin, f'pin {pin}')} {'on' if level else 'off'}"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("board", help="a simulated controller board (the real firmware on a pty)")
    s = p.add_subparsers(dest="board_cmd", required=True, metavar="COMMAND")
    sim = s.add_parser("simulate", help="run the firmware under the MicroPython unix port on a pty",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--kind", choices=("gate", "vending"), default="gate",
                     help="what the board drives (default gate)")
    sim.add_argument("--data", help="folder for the board's flash and logs (default: a temp one)")
    sim.add_argument("--seconds", type=float, default=0.0,
                     help="stop after this many seconds (default: run until quit or Ctrl-C)")
    sim.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    data = Path(args.data or tempfile.mkdtemp(prefix="ccus-board-"))
    data.mkdir(parents=True, exist_ok=True)
    board = BoardProcess(data, links=links(args.kind))
    try:
        board.start()
    except (AssertionError, OSError) as exc:
        print(f"ccus board: the simulated board did not start: {str(exc).splitlines()[0]}",
              file=sys.stderr)
        board.close()
        return 1
    print(f"board ({args.kind}) on {board.port}: set `serial = \"{board.port}\"` in the agent's "
          f"[{args.kind}] table; flash and logs in {data}", flush=True)
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
    # systemd's stop or a test's terminate(): leave through `finally`, so the board goes too
    signal.signal(signal.SIGTERM, _stop)
    seen = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            changes = board.pins()
            for pin, level, _ms in changes[seen:]:
                print(describe(pin, level), flush=True)
            seen = len(changes)
            ready = select.select([sys.stdin], [], [], 0.05)[0] if not sys.stdin.closed else []
            if not ready:
                continue
            line = sys.stdin.readline()
            if not line:  # stdin closed: keep running until --seconds or a signal
                sys.stdin.close()
                continue
            cmd = parse_command(line)
            if cmd is None:
                print(f"? {line.strip()!r}: door open|close, emergency on|off, walk on|off, "
                      "kill, start, quit", flush=True)
            elif cmd[0] == "quit":
                break
            elif cmd[0] == "kill":
                board.kill()
                print("board power off", flush=True)
            elif cmd[0] == "start":
                board.start()
                seen = 0  # a new log per start
                print("board power on", flush=True)
            elif cmd[0] == "set":
                board.set_input(int(cmd[1]), int(cmd[2]))
            elif cmd[0] == "walk":
                for pin in (GATE, GATE_OUT):
                    board.skip_links(pin, 0 if cmd[1] == "on" else 1_000_000)
    except KeyboardInterrupt:
        pass
    finally:
        board.close()
    return 0




def _stop(*_: object) -> None:
    raise KeyboardInterrupt
