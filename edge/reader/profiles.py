"""Card profiles: how a tapped card becomes a CardRead (identifier, technician ID or a reason).

The on-card layout of CCUS cards is not public, so the layout is configuration:
- `uid`: the card's UID/IDm is mapped to a technician by the ID list;
- `felica`: the technician ID is read from a FeliCa service's block (ASCII or BCD digits).
Decoding is pure (decode_tid); reading goes through nfcpy's tag object.
"""

import re
from typing import Any

from edge.config import ProfileConfig
from edge.decision import CardRead
from edge.reasons import Reason
from edge.touch import CardTech

DIGITS14 = re.compile(rb"[0-9]{14}\Z")


def tech_of(tag: Any) -> CardTech:
    brty = str(getattr(getattr(tag, "target", None), "brty", ""))
    if brty.endswith("F"):
        return CardTech.FELICA
    if brty.endswith("A"):
        return CardTech.ISO_A
    if brty.endswith("B"):
        return CardTech.ISO_B
    return CardTech.UNKNOWN


def decode_tid(block: bytes, p: ProfileConfig) -> str | None:
    """The technician ID in `block` as the profile lays it out, or None if it is not one."""
    if p.encoding == "ascii":
        raw = block[p.offset: p.offset + p.length]
        return raw.decode("ascii") if len(raw) == 14 and DIGITS14.match(raw) else None
    # BCD: two digits a byte, high nibble first; 14 digits take 7 bytes
    raw = block[p.offset: p.offset + 7]
    if len(raw) != 7:
        return None
    digits = "".join(f"{b >> 4}{b & 0x0F}" for b in raw)
    return digits if digits.isdigit() and len(digits) == 14 else None


def read_card(tag: Any, profile: ProfileConfig) -> CardRead:
    """Apply a profile to an activated nfcpy tag. Never raises: failures become reasons."""
    tech = tech_of(tag)
    ident = bytes(getattr(tag, "identifier", b"") or b"")
    if profile.kind == "uid":
        if not ident:
            return CardRead(b"", tech, error=Reason.UNREADABLE)
        return CardRead(ident, tech)
    # kind == "felica"
    if tech is not CardTech.FELICA:
        return CardRead(ident, tech, error=Reason.FOREIGN_CARD)
    try:
        import nfc.tag.tt3 as tt3

        sc = tt3.ServiceCode(profile.service_code >> 6, profile.service_code & 0x3F)
        data = tag.read_without_encryption([sc], [tt3.BlockCode(profile.block, service=0)])
    except Exception as exc:  # noqa: BLE001 - nfcpy raises many error types for one meaning
        errno = getattr(exc, "errno", 0) or 0
        # 0xA1/0xA6: the card has no such service: a card of another system
        reason = Reason.FOREIGN_CARD if errno & 0xFF in (0xA1, 0xA6) else Reason.UNREADABLE
        return CardRead(ident, tech, error=reason)
    tid = decode_tid(bytes(data), profile)
    if tid is None:
        return CardRead(ident, tech, error=Reason.BAD_CARD_DATA)
    return CardRead(ident, tech, tid=tid)
