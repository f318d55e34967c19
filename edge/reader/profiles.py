"""Card profiles: how a tapped card becomes a CardRead (identifier, technician ID or a reason).

The on-card layout of CCUS cards is not public, so the layout is configuration:
- `uid`: the card's UID/IDm is mapped to a technician by the ID list;
- `felica`: the ID is read from blocks of a FeliCa service (ASCII or BCD digits);
- `iso_dep`: the ID is read with APDUs from a Type 4 (A or B) card: SELECT the AID,
  SELECT the file, READ BINARY.
Codecs are pure (edge.reader.decode); this module runs them over a transport: an nfcpy tag
here, a PC/SC card handle in pcsc_backend. Nothing here raises: failures become reasons.
"""

import logging
from collections.abc import Callable
from typing import Any

from edge.config import ProfileConfig
from edge.decision import CardRead
from edge.errors import ReaderError
from edge.reader.decode import (
    check_apdu,
    decode_felica_read,
    decode_tid,
    felica_read_command,
    read_binary,
    select_aid,
    select_file,
)
from protocol.reasons import Reason
from protocol.touch import CardTech

log = logging.getLogger(__name__)

Transmit = Callable[[bytes], bytes]   # one APDU in, its response (data + SW1 SW2) out


class LinkLost(ReaderError):
    """The card or reader stopped answering during a read (card pulled away, reader gone)."""


def tech_of(tag: Any) -> CardTech:
    brty = str(getattr(getattr(tag, "target", None), "brty", ""))
    if brty.endswith("F"):
        return CardTech.FELICA
    if brty.endswith("A"):
        return CardTech.ISO_A
    if brty.endswith("B"):
        return CardTech.ISO_B
    return CardTech.UNKNOWN


def apply_iso_dep(transmit: Transmit, p: ProfileConfig) -> str | Reason:
    """SELECT AID, SELECT file (if configured), READ BINARY, decode. LinkLost propagates."""
    data = check_apdu(transmit(select_aid(bytes.fromhex(p.aid))), "select_aid")
    if isinstance(data, Reason):
        return data
    if p.file_id:
        data = check_apdu(transmit(select_file(bytes.fromhex(p.file_id))), "select_file")
        if isinstance(data, Reason):
            return data
    data = check_apdu(transmit(read_binary(p.read_offset, p.read_length)), "read")
    if isinstance(data, Reason):
        return data
    if len(data) > p.read_length:
        return Reason.BAD_RESPONSE   # more than Le asked for: not a card we understand
    return decode_tid(data, p)


def result(ident: bytes, tech: CardTech, tid_or_reason: str | Reason) -> CardRead:
    if isinstance(tid_or_reason, Reason):
        return CardRead(ident, tech, error=tid_or_reason)
    return CardRead(ident, tech, tid=tid_or_reason)


# -- nfcpy tags ----------------------------------------------------------------------------

def read_card(tag: Any, profile: ProfileConfig) -> CardRead:
    """Apply a profile to an activated nfcpy tag. Never raises: failures become reasons."""
    tech = tech_of(tag)
    ident = bytes(getattr(tag, "identifier", b"") or b"")
    try:
        if profile.kind == "uid":
            return CardRead(ident, tech) if ident else CardRead(b"", tech, error=Reason.UNREADABLE)
        if profile.kind == "felica":
            if tech is not CardTech.FELICA:
                return CardRead(ident, tech, error=Reason.WRONG_TECHNOLOGY)
            return result(ident, tech, _felica(tag, profile))
        if profile.kind == "iso_dep":
            if not hasattr(tag, "transceive") or tech not in (CardTech.ISO_A, CardTech.ISO_B) \
                    or not hasattr(tag, "_dep"):
                return CardRead(ident, tech, error=Reason.WRONG_TECHNOLOGY)
            return result(ident, tech, apply_iso_dep(_nfcpy_transmit(tag), profile))
    except LinkLost as exc:
        log.debug("card %s lost during the read: %s", ident.hex(), exc)
        return CardRead(ident, tech, error=Reason.UNREADABLE)
    except Exception:  # noqa: BLE001 - the reader loop must survive any card
        log.exception("card %s: unexpected failure in profile %s", ident.hex(), profile.kind)
        return CardRead(ident, tech, error=Reason.BAD_RESPONSE)
    return CardRead(ident, tech, error=Reason.UNREADABLE)


def _nfcpy_transmit(tag: Any) -> Transmit:
    import nfc.clf
    import nfc.tag

    def transmit(apdu: bytes) -> bytes:
        try:
            return bytes(tag.transceive(apdu))
        except (nfc.tag.TagCommandError, nfc.clf.CommunicationError) as exc:
            raise LinkLost(str(exc)) from exc
    return transmit


def _felica(tag: Any, p: ProfileConfig) -> str | Reason:
    import nfc.clf

    idm = bytes(tag.idm)
    if getattr(tag, "sys", None) != p.system_code:
        # the card's first system is another one: it may still hold ours (multi-system cards)
        try:
            idm, _pmm = tag.polling(p.system_code)
            idm = bytes(idm)
        except Exception:  # noqa: BLE001 - no answer to polling for our system code
            return Reason.FOREIGN_CARD
    pmm = bytes(tag.pmm)
    a, b, e = pmm[5] & 7, pmm[5] >> 3 & 7, pmm[5] >> 6   # nfcpy's timeout rule for reads
    timeout = 302.1e-6 * ((b + 1) * p.block_count + a + 1) * 4 ** e
    cmd = felica_read_command(idm, p.service_code, p.block, p.block_count)
    for attempt in range(3):
        try:
            rsp = bytes(tag.clf.exchange(cmd, timeout))
            break
        except nfc.clf.CommunicationError as exc:
            if attempt == 2:
                raise LinkLost(str(exc)) from exc
    data = decode_felica_read(rsp, idm, p.block_count)
    return data if isinstance(data, Reason) else decode_tid(data, p)
