"""The nfcpy reader backend: one thread per reader, each tap handed on as a CardRead.

The same code serves a Sony RC-S380 (`usb:054c:06c3`), a PN532 (`tty:USB0:pn532`) and the
emulated field of the tests and demo (`udp:127.0.0.1:PORT`): only the path differs. A card
held on the reader is one tap (we wait for its removal); a reader that fails is reopened
with backoff, and its health is what the state message reports.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge.config import ProfileConfig, ReaderConfig
from edge.decision import CardRead
from edge.reader.profiles import read_card

log = logging.getLogger(__name__)


class NfcpyReader:
    def __init__(self, cfg: ReaderConfig, profile: ProfileConfig,
                 on_read: Callable[[ReaderConfig, CardRead], None],
                 on_health: Callable[[str, str], None] | None = None) -> None:
        self.cfg, self.profile, self.on_read = cfg, profile, on_read
        self.on_health = on_health or (lambda name, health: None)
        self.health = "starting"
        self.taps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader-{cfg.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _set_health(self, health: str) -> None:
        if health != self.health:
            self.health = health
            log.info("reader %s: %s", self.cfg.name, health)
            self.on_health(self.cfg.name, health)

    def _run(self) -> None:
        import nfc

        backoff = 0.5
        while not self._stop.is_set():
            try:
                clf = nfc.ContactlessFrontend(self.cfg.path)
            except (OSError, ValueError) as exc:
                self._set_health("down")
                log.warning("reader %s: cannot open %s: %s; retry in %.1fs",
                            self.cfg.name, self.cfg.path, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            self._set_health("ok")
            try:
                self._serve(clf)
            except Exception:  # noqa: BLE001 - a driver fault must not kill the reader thread
                log.exception("reader %s: driver error; reopening", self.cfg.name)
                self._set_health("error")
                self._stop.wait(backoff)
            finally:
                clf.close()

    def _serve(self, clf: Any) -> None:
        rdwr = {
            "targets": list(self.cfg.targets),
            "on-connect": self._on_connect,
            "on-release": lambda tag: True,
            "iterations": 1,
            "interval": 0.05,
            "beep-on-connect": False,
        }
        while not self._stop.is_set():
            result = clf.connect(rdwr=rdwr, terminate=self._stop.is_set)
            if result is False:  # nfcpy's way of saying the device failed (IOError inside)
                raise OSError("reader stopped answering")

    def _on_connect(self, tag: Any) -> bool:
        started = time.monotonic()
        read = read_card(tag, self.profile)
        self.taps += 1
        try:
            self.on_read(self.cfg, read)
        except Exception:  # noqa: BLE001 - the decision path logs its own faults; keep reading
            log.exception("reader %s: handling a tap failed", self.cfg.name)
        log.debug("reader %s: tap handled in %.1f ms", self.cfg.name,
                  (time.monotonic() - started) * 1000)
        return True  # wait for removal: a card held on the reader is one tap
