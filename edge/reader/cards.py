"""Emulated cards: what a card holds (pure data), for the emulator, the demo and the tests."""

from dataclasses import dataclass, field

from edge.touch import CardTech

# A FeliCa Standard PMm (IC code 0x01, RC-S915 family). Bytes 3 and 5 set the maximum
# response times nfcpy allows for Request Response (~10 ms, the presence check) and for a
# one-block read (~12 ms): long enough for an emulated card in another process, short
# enough that a removed card is noticed in ~40 ms, as with a real card.
FELICA_PMM = bytes.fromhex("01014B474F4F93FF")
FELICA_BLOCK = 16


@dataclass(frozen=True)
class EmulatedCard:
    """A card to present to a reader: its identifier and, for FeliCa, its readable blocks."""

    tech: CardTech
    ident: bytes                                 # IDm (8 bytes) for FeliCa, UID for ISO 14443
    system_code: int = 0x8008                    # FeliCa system code the card answers polling for
    pmm: bytes = FELICA_PMM
    # FeliCa services: service code -> blocks (16 bytes each), readable without encryption
    services: dict[int, tuple[bytes, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tech is CardTech.FELICA and len(self.ident) != 8:
            raise ValueError("a FeliCa IDm is 8 bytes")
        for blocks in self.services.values():
            if any(len(b) != FELICA_BLOCK for b in blocks):
                raise ValueError("FeliCa blocks are 16 bytes")

    def to_json(self) -> dict[str, object]:
        return {
            "tech": self.tech.value,
            "ident": self.ident.hex(),
            "system_code": self.system_code,
            "pmm": self.pmm.hex(),
            "services": {str(sc): [b.hex() for b in blocks] for sc, blocks in self.services.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> "EmulatedCard":
        services = d.get("services") or {}
        assert isinstance(services, dict)
        return cls(
            tech=CardTech(str(d["tech"])),
            ident=bytes.fromhex(str(d["ident"])),
            system_code=int(str(d.get("system_code", 0x8008))),
            pmm=bytes.fromhex(str(d.get("pmm", FELICA_PMM.hex()))),
            services={int(sc): tuple(bytes.fromhex(b) for b in blocks)
                      for sc, blocks in services.items()},
        )


def felica_card(idm: bytes, *, tid: str | None = None, service_code: int = 0x100B,
                system_code: int = 0x8008) -> EmulatedCard:
    """A FeliCa card; with `tid`, block 0 of `service_code` holds the ID as ASCII digits."""
    services = {}
    if tid is not None:
        services[service_code] = (tid.encode("ascii").ljust(FELICA_BLOCK, b"\0"),)
    return EmulatedCard(CardTech.FELICA, idm, system_code=system_code, services=services)
