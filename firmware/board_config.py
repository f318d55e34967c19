"""Board pin maps and timings: one small dict per board kind, chosen by sys.platform."""

import sys

# Pin numbers are GPIO numbers. *_active is the pin level that means "on"/"detected".
RP2 = {
    "name": "rp2040",
    "uart": 0,
    "baud": 115200,
    "tx": 0,
    "rx": 1,
    "vend": (2, 3, 4, 5),  # slot 1..4 -> vend line (relay/optocoupler) pins
    "vend_active": 1,
    "drop": 6,  # drop (vend) sensor, optical, pulled up, low while a can falls
    "drop_active": 0,
    "pull_up": True,  # use the MCU's internal pull-ups on drop and door inputs
    "gate": 7,  # gate relay 0 (the one relay, or the entry direction)
    "gate_out": 13,  # gate relay 1 (the exit direction of a two-relay turnstile); None: none
    "gate_active": 1,  # relays need a pull-down on their driver: a reset pin floats to "off"
    "door": 8,  # door/turnstile sensor, pulled up, low when open
    "door_active": 0,
    "emergency": 12,  # emergency release (fire-alarm contact, normally open), pulled up
    "emergency_active": 0,  # the contact closes to ground on alarm; a normally-closed loop: 1
    "led_green": 9,
    "led_red": 10,
    "buzzer": 11,
    "debounce_ms": 5,
    "wdt_ms": 4000,  # RP2040 allows at most 8388 ms
    "journal": "/vend.jnl",
    "max_timeout_ms": 30000,
    # MDB vend channel (firmware/vend_mdb.py): the PIO 9-bit UART (firmware/mdb_uart_rp2.py).
    # mdb_uart: None = no MDB interface fitted; else the first of two PIO state machines (0: RX
    # on SM 0, TX on SM 1). Unproven on a real bus: docs/vending.md.
    "mdb_adapter": "rp2_pio",
    "mdb_uart": None,
    "mdb_tx": 14,
    "mdb_rx": 15,
    "mdb_country": 0x1392,  # BCD ISO 4217 numeric with a leading 1: 392 = yen
}

ESP32 = {
    "name": "esp32",
    "uart": 2,
    "baud": 115200,
    "tx": 17,
    "rx": 16,
    "vend": (25, 26, 27, 14),
    "vend_active": 1,
    "drop": 34,  # input-only pin: needs an external pull-up
    "drop_active": 0,
    "pull_up": False,  # GPIO 34-39 have no internal pull-ups: external resistors
    "gate": 32,
    "gate_out": 33,
    "gate_active": 1,
    "door": 35,
    "door_active": 0,
    "emergency": 39,  # input-only pin: external pull-up
    "emergency_active": 0,
    "led_green": 18,
    "led_red": 19,
    "buzzer": 23,
    "debounce_ms": 5,
    "wdt_ms": 4000,
    "journal": "/vend.jnl",
    "max_timeout_ms": 30000,
    # MDB: UART 1 with the parity bit as the mode bit (firmware/mdb_uart_esp32.py); None = no MDB
    # interface fitted. Receive infers the mode bit from gaps: docs/vending.md.
    "mdb_adapter": "esp32_parity",
    "mdb_uart": None,
    "mdb_tx": 4,
    "mdb_rx": 5,
    "mdb_country": 0x1392,
}

BOARDS = {"rp2": RP2, "esp32": ESP32}


def for_platform(platform=None):
    """The config for this board (a copy, so callers may override keys)."""
    p = platform or sys.platform
    return dict(BOARDS.get(p, RP2))
