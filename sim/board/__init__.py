"""A simulated controller board for the demo and the tests: the real firmware (firmware/) under the
MicroPython unix port, on a real pty, with a stand-in `machine` module (machine.py here, MicroPython
code) whose pins, UART and watchdog a JSON file scripts.
"""

from sim.board.process import DOOR, DROP, EMERGENCY, GATE, GATE_OUT, VEND_PIN, BoardProcess

__all__ = ["DOOR", "DROP", "EMERGENCY", "GATE", "GATE_OUT", "VEND_PIN", "BoardProcess"]
