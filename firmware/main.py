"""Board entry point: MicroPython runs main.py after boot; it starts the board application."""

import app

app.run()
