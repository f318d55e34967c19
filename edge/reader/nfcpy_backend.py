"""The nfcpy reader backend: one thread per reader, each tap handed on as a CardRead.

The same code serves a Sony RC-S380 (`usb:054c:06c3`), a PN532 (`tty:USB0:pn532`) and the
emulated field of the tests and demo (`udp:127.0.0.1:PORT`): only the path differs. A card
held on the reader is one tap (we wait for its removal); a reader that fails is reopened
with backoff, and its health is what the state message reports. Feedback goes through the
device's LED/buzzer where nfcpy drives one (RC-S380), else through the feedback hook.

nfcpy's udp driver cannot tell a field process that died from an empty field: with `udp:`
the health stays "ok" and reads resume when the field is back.
"""

import logging
import time
from typing import Any

from edge.config import ProfileConfig, ReaderConfig
from edge.reader.backend import Feedback, OnHealth, OnRead, ReaderThread, outcome
from edge.reader.profiles import read_card

log = logging.getLogger(__name__)


class NfcpyReader(ReaderThread):
    def __init__(self, cfg: ReaderConfig, profile: ProfileConfig, on_read: OnRead,
                 on_health: OnHealth | None = None, feedback: Feedback | None = None) -> None:
        super().__init__(cfg, profile, on_read, on_health, feedback)
        self.discovered_at = 0.0   # perf_counter() when the last card answered the poll
        self._clf: Any = None

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
            self._clf = clf
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
            "on-discover": self._on_discover,
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

    def _on_discover(self, target: Any) -> bool:
        self.discovered_at = time.perf_counter()
        return True

    def _on_connect(self, tag: Any) -> bool:
        read = read_card(tag, self.profile)
        self.taps += 1
        try:
            touch = self.on_read(self.cfg, read)
        except Exception:  # noqa: BLE001 - the decision path logs its own faults; keep reading
            log.exception("reader %s: handling a tap failed", self.cfg.name)
            touch = None
        self._feedback(touch)
        log.debug("reader %s: tap handled in %.2f ms", self.cfg.name,
                  (time.perf_counter() - self.discovered_at) * 1000)
        return True  # wait for removal: a card held on the reader is one tap

    def _feedback(self, touch: Any) -> None:
        result = outcome(touch)
        if result is None or self.cfg.feedback == "none":
            return
        try:
            if self.cfg.feedback == "reader" and self._device_signals():
                # nfcpy turns LED and buzzer off again when the card is removed
                self._clf.device.turn_on_led_and_buzzer()
            elif self.feedback is not None:
                self.feedback(self.cfg.name, *result)
        except Exception:  # noqa: BLE001 - feedback is best effort; the touch is already made
            log.exception("reader %s: feedback failed", self.cfg.name)

    def _device_signals(self) -> bool:
        """True if the open device has its own LED/buzzer driver in nfcpy (RC-S380 does)."""
        import nfc.clf.device

        device = getattr(self._clf, "device", None)
        method = getattr(type(device), "turn_on_led_and_buzzer", None)
        return method is not None and method is not nfc.clf.device.Device.turn_on_led_and_buzzer
