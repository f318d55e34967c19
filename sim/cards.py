"""Emulated cards: what a card holds (pure data), for the emulator, the demo and the tests."""

from dataclasses import dataclass, field

from protocol.touch import CardTech

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
    # ISO-DEP (Type 4A/4B) applications: AID -> {file ID (2 bytes) -> contents}
    apps: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tech is CardTech.FELICA and len(self.ident) != 8:
            raise ValueError("a FeliCa IDm is 8 bytes")
        if self.tech is CardTech.ISO_A and len(self.ident) not in (4, 7, 10):
            raise ValueError("an ISO 14443A UID is 4, 7 or 10 bytes")
        if self.tech is CardTech.ISO_B and len(self.ident) != 4:
            raise ValueError("an ISO 14443B PUPI is 4 bytes")
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
            "apps": {aid.hex(): {fid.hex(): data.hex() for fid, data in files.items()}
                     for aid, files in self.apps.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> "EmulatedCard":
        services = d.get("services") or {}
        apps = d.get("apps") or {}
        if not isinstance(services, dict) or not isinstance(apps, dict):
            raise ValueError("services and apps are objects")
        return cls(
            tech=CardTech(str(d["tech"])),
            ident=bytes.fromhex(str(d["ident"])),
            system_code=int(str(d.get("system_code", 0x8008))),
            pmm=bytes.fromhex(str(d.get("pmm", FELICA_PMM.hex()))),
            services={int(sc): tuple(bytes.fromhex(b) for b in blocks)
                      for sc, blocks in services.items()},
            apps={bytes.fromhex(aid): {bytes.fromhex(f): bytes.fromhex(v) for f, v in files.items()}
                  for aid, files in apps.items()},
        )


def felica_card(idm: bytes, *, tid: str | None = None, service_code: int = 0x100B,
                system_code: int = 0x8008) -> EmulatedCard:
    """A FeliCa card; with `tid`, block 0 of `service_code` holds the ID as ASCII digits."""
    services = {}
    if tid is not None:
        services[service_code] = (tid.encode("ascii").ljust(FELICA_BLOCK, b"\0"),)
    return EmulatedCard(CardTech.FELICA, idm, system_code=system_code, services=services)


# A proprietary AID (RID F0: not registered) for the project's emulated Type 4 cards. The
# real CCUS card's AID is not public: a site configures it in [profiles.X].aid.
DEMO_AID = bytes.fromhex("F04343555301")
DEMO_FILE = bytes.fromhex("0001")
# My Number card (ISO 14443B): the JPKI and 券面事項入力補助 applications' AIDs
MY_NUMBER_AIDS = (bytes.fromhex("D392F000260100000001"), bytes.fromhex("D3921000310001010408"))


def type4_card(tech: CardTech, uid: bytes, *, tid: str | None = None, aid: bytes = DEMO_AID,
               fid: bytes = DEMO_FILE, contents: bytes | None = None) -> EmulatedCard:
    """A Type 4A/4B card whose application `aid` has file `fid` starting with the ID (ASCII)."""
    if contents is None:
        contents = (tid or "").encode("ascii").ljust(16, b"\0")
    return EmulatedCard(tech, uid, apps={aid: {fid: contents}})


def my_number_card(pupi: bytes = bytes.fromhex("4D4E0001")) -> EmulatedCard:
    """A stand-in for a My Number card: Type 4B, only its own applications (no data)."""
    return EmulatedCard(CardTech.ISO_B, pupi, apps={aid: {} for aid in MY_NUMBER_AIDS})


class Iso7816Card:
    """The APDU side of an emulated ISO-DEP card: SELECT by AID / file ID, READ BINARY.

    Pure state machine (no I/O), shared by the udp Type 4 emulator and the PC/SC card.
    """

    def __init__(self, card: EmulatedCard) -> None:
        self.card = card
        self.app: dict[bytes, bytes] | None = None
        self.file: bytes | None = None

    def respond(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            return b"\x67\x00"
        cla, ins, p1, p2 = apdu[:4]
        if cla != 0x00:
            return b"\x6e\x00"
        lc = apdu[4] if len(apdu) > 5 else 0
        data = apdu[5: 5 + lc]
        if ins == 0xA4 and p1 == 0x04:               # SELECT by DF name (AID)
            if data not in self.card.apps:
                return b"\x6a\x82"
            self.app, self.file = self.card.apps[data], None
            return b"\x90\x00"
        if ins == 0xA4 and p1 == 0x02:               # SELECT EF under the current DF
            if self.app is None or data not in self.app:
                return b"\x6a\x82"
            self.file = self.app[data]
            return b"\x90\x00"
        if ins == 0xB0:                              # READ BINARY, short Le
            if self.file is None:
                return b"\x69\x86"
            offset = (p1 & 0x7F) << 8 | p2
            le = apdu[4] if len(apdu) == 5 else 0
            le = le or 256
            if offset > len(self.file):
                return b"\x6b\x00"
            chunk = self.file[offset: offset + le]
            return chunk + (b"\x90\x00" if len(chunk) == le else b"\x62\x82")
        return b"\x6d\x00"
