"""The PC/SC reader backend (pyscard + pcscd): Sony RC-S300 family, ACR122U-class readers.

One thread per reader. It waits for a card with SCardGetStatusChange, connects, reads the
UID/IDm with the standard pseudo-APDU GET DATA (FF CA 00 00 00), applies the card profile
(ISO-DEP APDUs go to the card as they are; FeliCa blocks go through the PC/SC Part 3
storage-card commands SELECT FILE / READ BINARY, class FF), hands the CardRead on and
disconnects, leaving the card. A card held on the reader is one tap: the next tap needs the
slot to go empty first (removal detected). pcscd gone, the reader unplugged or a reader
that stops answering: health "down", the context is dropped and re-established with
backoff, without a restart.

Vendor-specific and untested without hardware: the FeliCa commands (the RC-S300 follows
PC/SC Part 3 for FeliCa Standard; other readers may need their transparent/escape command),
the ACR122U LED/buzzer pseudo-APDU (FF 00 40), and the Type A/B split from the ATR.
"""

import logging
import struct
from typing import Any

from edge.config import ProfileConfig, ReaderConfig
from edge.decision import CardRead
from edge.errors import ReaderError
from edge.reader.backend import Feedback, OnHealth, OnRead, ReaderThread, outcome
from edge.reader.decode import atr_tech, check_apdu, decode_tid
from edge.reader.profiles import LinkLost, Transmit, apply_iso_dep, result
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision

log = logging.getLogger(__name__)

GET_UID = bytes.fromhex("FFCA000000")
POLL_MS = 200                      # a bounded wait, so stop() and health stay responsive

# ACR122U: FF 00 40 <LED state> 04 <T1> <T2> <repetitions> <buzzer link>, T in 100 ms units
ACR122_ALLOW = bytes.fromhex("FF0040A804" "01010101")   # green blink, 1 beep
ACR122_DENY = bytes.fromhex("FF00405404" "01010301")    # red blink, 3 beeps


class PcscDown(ReaderError):
    """pcscd or the reader is not usable; the context is re-established with backoff."""


def felica_blocks(transmit: Transmit, p: ProfileConfig) -> bytes | Reason:
    """PC/SC Part 3 FeliCa: SELECT FILE the service (little-endian), READ BINARY each block."""
    sel = b"\xff\xa4\x00\x01\x02" + struct.pack("<H", p.service_code)
    answer = check_apdu(transmit(sel), "select_service")
    if isinstance(answer, Reason):
        return answer
    data = b""
    for n in range(p.block, p.block + p.block_count):
        block = check_apdu(transmit(bytes([0xFF, 0xB0, n >> 8, n & 0xFF, 16])), "read")
        if isinstance(block, Reason):
            return block
        if len(block) > 16:
            return Reason.BAD_RESPONSE
        data += block
        if len(block) < 16:
            break
    return data


def read_pcsc_card(transmit: Transmit, atr: bytes, profile: ProfileConfig) -> CardRead:
    """Apply a profile to a connected PC/SC card. Never raises: failures become reasons."""
    tech = atr_tech(atr)
    try:
        uid = check_apdu(transmit(GET_UID), "get_uid")
        ident = b"" if isinstance(uid, Reason) else uid
        if profile.kind == "uid":
            if isinstance(uid, Reason) or not uid:
                return CardRead(b"", tech, error=Reason.UNREADABLE)
            return CardRead(ident, tech)
        if profile.kind == "felica":
            if tech is not CardTech.FELICA:
                return CardRead(ident, tech, error=Reason.WRONG_TECHNOLOGY)
            data = felica_blocks(transmit, profile)
            return result(ident, tech, data if isinstance(data, Reason) else decode_tid(data, profile))
        if profile.kind == "iso_dep":
            if tech not in (CardTech.ISO_A, CardTech.ISO_B):
                return CardRead(ident, tech, error=Reason.WRONG_TECHNOLOGY)
            return result(ident, tech, apply_iso_dep(transmit, profile))
    except LinkLost as exc:
        log.debug("card lost during the read: %s", exc)
        return CardRead(b"", tech, error=Reason.UNREADABLE)
    except Exception:  # noqa: BLE001 - the reader loop must survive any card
        log.exception("unexpected failure in profile %s", profile.kind)
        return CardRead(b"", tech, error=Reason.BAD_RESPONSE)
    return CardRead(b"", tech, error=Reason.UNREADABLE)


class PcscReader(ReaderThread):
    def __init__(self, cfg: ReaderConfig, profile: ProfileConfig, on_read: OnRead,
                 on_health: OnHealth | None = None, feedback: Feedback | None = None) -> None:
        super().__init__(cfg, profile, on_read, on_health, feedback)
        self.reader_name = ""
        self.want = cfg.path.removeprefix("pcsc:")

    def _run(self) -> None:
        from smartcard import scard

        backoff = 0.2
        while not self._stop.is_set():
            rc, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if rc != scard.SCARD_S_SUCCESS:
                self._set_health("down")
                log.warning("reader %s: no PC/SC service (%s); retry in %.1fs", self.cfg.name,
                            scard.SCardGetErrorMessage(rc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            try:
                self._serve(scard, ctx)
            except PcscDown as exc:
                self._set_health("down")
                log.warning("reader %s: %s; retry in %.1fs", self.cfg.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # noqa: BLE001 - a driver fault must not kill the reader thread
                log.exception("reader %s: PC/SC error; starting over", self.cfg.name)
                self._set_health("error")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            else:
                backoff = 0.2
            finally:
                scard.SCardReleaseContext(ctx)

    def _find_reader(self, scard: Any, ctx: Any) -> str:
        rc, names = scard.SCardListReaders(ctx, [])
        if rc != scard.SCARD_S_SUCCESS:
            raise PcscDown(f"no readers ({scard.SCardGetErrorMessage(rc)})")
        for name in names:
            if self.want in name:
                return str(name)
        raise PcscDown(f"no reader matching {self.want!r} among {names}")

    def _serve(self, scard: Any, ctx: Any) -> None:
        self.reader_name = self._find_reader(scard, ctx)
        state = scard.SCARD_STATE_UNAWARE
        handled = False           # the card now in the slot has been read: wait for removal
        ok_once = False
        while not self._stop.is_set():
            rc, states = scard.SCardGetStatusChange(ctx, POLL_MS, [(self.reader_name, state)])
            if rc == scard.SCARD_E_TIMEOUT:
                continue
            if rc != scard.SCARD_S_SUCCESS:
                raise PcscDown(f"status: {scard.SCardGetErrorMessage(rc)}")
            _name, event, atr = states[0]
            state = event & ~scard.SCARD_STATE_CHANGED
            if event & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE | scard.SCARD_STATE_IGNORE):
                raise PcscDown(f"reader {self.reader_name!r} is gone")
            if not ok_once:
                ok_once = True
                self._set_health("ok")
            if event & scard.SCARD_STATE_EMPTY:
                handled = False
            elif event & scard.SCARD_STATE_PRESENT and not event & scard.SCARD_STATE_MUTE \
                    and not handled:
                handled = self._tap(scard, ctx, bytes(atr))

    def _tap(self, scard: Any, ctx: Any, atr: bytes) -> bool:
        """Read the card in the slot; False if it could not even be connected (try again)."""
        rc, card, proto = scard.SCardConnect(ctx, self.reader_name, scard.SCARD_SHARE_SHARED,
                                             scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        if rc != scard.SCARD_S_SUCCESS:
            log.debug("reader %s: connect: %s", self.cfg.name, scard.SCardGetErrorMessage(rc))
            if rc in (scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED,
                      scard.SCARD_E_READER_UNAVAILABLE, scard.SCARD_E_UNKNOWN_READER):
                raise PcscDown(f"connect: {scard.SCardGetErrorMessage(rc)}")
            return False

        def transmit(apdu: bytes) -> bytes:
            rc, rsp = scard.SCardTransmit(card, proto, list(apdu))
            if rc != scard.SCARD_S_SUCCESS:
                raise LinkLost(scard.SCardGetErrorMessage(rc))
            return bytes(rsp)

        try:
            read = read_pcsc_card(transmit, atr, self.profile)
            self.taps += 1
            try:
                touch = self.on_read(self.cfg, read)
            except Exception:  # noqa: BLE001 - the decision path logs its own faults
                log.exception("reader %s: handling a tap failed", self.cfg.name)
                touch = None
            self._feedback(touch, transmit)
        finally:
            scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        return True

    def _feedback(self, touch: Any, transmit: Transmit) -> None:
        res = outcome(touch)
        if res is None or self.cfg.feedback == "none":
            return
        try:
            if self.cfg.feedback == "reader" and "ACR122" in self.reader_name.upper():
                transmit(ACR122_ALLOW if res[0] is Decision.ALLOW else ACR122_DENY)
            elif self.feedback is not None:
                self.feedback(self.cfg.name, *res)
        except Exception:  # noqa: BLE001 - feedback is best effort; the touch is already made
            log.exception("reader %s: feedback failed", self.cfg.name)

