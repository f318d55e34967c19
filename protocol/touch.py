"""Touch schema v1: the record of one card tap, and its CBOR codec (pure, no I/O).

A touch's identity is (device, seq). The wire form is a CBOR map with short text keys;
docs/protocol.md is the normative description. decode() either returns a valid Touch or
raises TouchError with a reason code; it never raises anything else, whatever the bytes.
"""

import io
import re
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import cbor2

from protocol.errors import ProtocolError
from protocol.fields import (  # noqa: F401 - re-exported: the touch's field rules
    DEVICE_ID,
    FACT_KEY,
    MAX_FACT_TEXT,
    SITE_ID,
    TECHNICIAN_ID,
    fact_text_ok,
)
from protocol.reasons import Reason
from protocol.timequality import TimeQuality

SCHEMA_VERSION = 1
MAX_PAYLOAD = 4096          # a v1 touch is ~150 bytes; anything this large is not a touch
MAX_SEQ = 2**63 - 1
# 9999-12-31 23:59:59.999 Asia/Tokyo: beyond it a clock has no calendar date, so no work day
MAX_TS_MS = 253_402_268_399_999
MAX_FACTS = 16


class Role(StrEnum):
    GATE = "gate"
    VENDING = "vending"
    TRAINING = "training"


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class CardTech(StrEnum):
    FELICA = "felica"        # NFC-F, 212/424 kbps (Type 3)
    ISO_A = "iso14443a"      # NFC-A (Type 2 / Type 4A)
    ISO_B = "iso14443b"      # NFC-B (Type 4B)
    UNKNOWN = "unknown"


class TouchError(ProtocolError):
    """A payload that is not a valid v1 touch. `reason` is a stable code for dead letters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Fact = str | int | bool


@dataclass(frozen=True, slots=True)
class Touch:
    device: str
    site: str
    role: Role
    seq: int
    ts_ms: int
    tq: TimeQuality
    card: bytes
    card_tech: CardTech
    tid: str | None
    decision: Decision
    reason: Reason
    list_version: int
    config_version: int
    facts: dict[str, Fact] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.device, self.seq)


def encode(t: Touch) -> bytes:
    """Touch -> CBOR bytes. Validates first, so nothing invalid ever leaves a device."""
    m = to_map(t)
    _validate(m)
    return cbor2.dumps(m)


def decode(payload: bytes) -> Touch:
    """CBOR bytes -> Touch, or TouchError(reason) for anything else."""
    if len(payload) > MAX_PAYLOAD:
        raise TouchError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    fp = io.BytesIO(payload)
    try:
        m = cbor2.CBORDecoder(fp).decode()
    except RecursionError as exc:
        raise TouchError("malformed_cbor", "nesting too deep") from exc
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on garbage; all mean the same
        raise TouchError("malformed_cbor", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if fp.tell() != len(payload):
        raise TouchError("malformed_cbor", f"{len(payload) - fp.tell()} trailing bytes")
    return _validate(m)


def to_map(t: Touch) -> dict[str, Any]:
    """Touch -> its wire map (the CBOR map encode() writes), not validated."""
    return {
        "v": SCHEMA_VERSION,
        "dev": t.device,
        "site": t.site,
        "role": t.role.value,
        "seq": t.seq,
        "ts": t.ts_ms,
        "tq": t.tq.value,
        "card": bytes(t.card),
        "ct": t.card_tech.value,
        "tid": t.tid,
        "dec": t.decision.value,
        "rsn": t.reason.value,
        "lv": t.list_version,
        "cv": t.config_version,
        "x": dict(t.facts),
    }


def _field(m: dict[Any, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in m:
        raise TouchError("missing_field", key)
    value = m[key]
    # bool is an int in Python: never accept it where a number is meant
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TouchError("bad_field", f"{key}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _show(value: Any, limit: int = 40) -> str:
    """A hostile value, short and safe, for an error message: a 30,000-bit integer has no
    decimal repr (Python refuses past 4,300 digits, with ValueError) and nested values are cut."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    try:
        return repr(value)[:limit]
    except Exception:  # noqa: BLE001 - a huge integer inside a container, a deep nesting
        return f"<{type(value).__name__}>"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _enum(m: dict[Any, Any], key: str, enum: type[Enum]) -> Any:
    raw = _field(m, key, str)
    try:
        return enum(raw)
    except ValueError:
        raise TouchError("bad_field", f"{key}: unknown value {_show(raw)}") from None


def _int_in(m: dict[Any, Any], key: str, lo: int, hi: int) -> int:
    value = _field(m, key, int)
    if not lo <= value <= hi:
        raise TouchError("bad_field", f"{key}: {_show(value)} outside {lo}..{hi}")
    return value


def _str_match(m: dict[Any, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = _field(m, key, str)
    if not pattern.match(value):
        raise TouchError("bad_field", f"{key}: {_show(value[:40])} is not a valid {key}")
    return value


def _validate(m: Any) -> Touch:
    if not isinstance(m, dict):
        raise TouchError("not_a_map", f"top level is {type(m).__name__}")
    v = m.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise TouchError("missing_field", "v")
    if v != SCHEMA_VERSION:
        raise TouchError("unknown_schema", f"v={_show(v)}")
    tid = m.get("tid")
    if tid is not None and (not isinstance(tid, str) or not TECHNICIAN_ID.match(tid)):
        raise TouchError("bad_field", "tid: not 14 ASCII digits")
    card = _field(m, "card", bytes)
    if len(card) > 32:
        raise TouchError("bad_field", f"card: {len(card)} bytes > 32")
    facts = _field(m, "x", dict)
    if len(facts) > MAX_FACTS:
        raise TouchError("bad_field", f"x: {len(facts)} facts > {MAX_FACTS}")
    for k, fv in facts.items():
        if not isinstance(k, str) or not FACT_KEY.match(k):
            raise TouchError("bad_field", f"x: bad fact key {_show(k)}")
        if not isinstance(fv, str | int | bool) or (isinstance(fv, str) and not fact_text_ok(fv)):
            raise TouchError("bad_field", f"x.{k}: facts are strings (<= 64, no NUL), ints or bools")
        if isinstance(fv, int) and not isinstance(fv, bool) and not -(2**63) <= fv <= MAX_SEQ:
            raise TouchError("bad_field", f"x.{k}: integer out of range")
    role = _enum(m, "role", Role)
    if role is Role.GATE and facts.get("dir") not in ("in", "out"):
        raise TouchError("bad_field", "x.dir: a gate touch needs dir 'in' or 'out'")
    return Touch(
        device=_str_match(m, "dev", DEVICE_ID),
        site=_str_match(m, "site", SITE_ID),
        role=role,
        seq=_int_in(m, "seq", 1, MAX_SEQ),
        ts_ms=_int_in(m, "ts", 0, MAX_TS_MS),
        tq=_enum(m, "tq", TimeQuality),
        card=bytes(card),
        card_tech=_enum(m, "ct", CardTech),
        tid=tid,
        decision=_enum(m, "dec", Decision),
        reason=_enum(m, "rsn", Reason),
        list_version=_int_in(m, "lv", 0, MAX_SEQ),
        config_version=_int_in(m, "cv", 0, MAX_SEQ),
        facts=dict(facts),
    )
