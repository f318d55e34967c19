"""Start the firmware under the unix port with the stand-in machine: rp2 pin map, journal from CCUS_SIM."""

import app
import board_config
import machine

cfg = board_config.for_platform("rp2")
cfg["journal"] = machine.SIM.get("journal", "vend.jnl")
for k in ("wdt_ms", "debounce_ms", "max_timeout_ms"):
    if k in machine.SIM:
        cfg[k] = machine.SIM[k]
cfg["mdb_adapter"] = "pty"  # the simulated VMC speaks the two-byte word encoding on a pty
for k in machine.SIM:
    if k.startswith("mdb_"):  # the MDB vend channel (firmware/vend_mdb.py): uart id, timeouts
        cfg[k] = machine.SIM[k]
print("BOARD START")
app.run(cfg)
