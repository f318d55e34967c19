"""The end-to-end acknowledgement message (pure): sink -> device, retained, QoS 1.

Topic ``ccus/v1/{site}/{dev}/ack`` (protocol.topics.touch_ack). Payload: CBOR map
``{"v": 1, "upto": N}`` or ``{"v": 1, "upto": N, "ep": E}``: every touch of that device with
seq <= N is committed in the store. N only grows; N = 0 means nothing is covered yet. E, when
present, is the sink's epoch (0..2**63-1): it changes every time a sink (re)connects and
re-subscribes, so a device that sees a new epoch knows the sink may have missed touches the
broker accepted meanwhile, and replays its unacknowledged touches at once. Other keys are
ignored (a newer sink may add some). docs/delivery.md is the normative text.

Rules: decode_ack_msg() and decode_ack() return a value or raise AckError; they never raise
anything else, whatever the bytes (big integers, deep nesting, tags, floats, booleans).
"""

from typing import NamedTuple

import cbor2

from protocol.errors import ProtocolError

ACK_VERSION = 1
MAX_SEQ = 2**63 - 1
MAX_EPOCH = 2**63 - 1
MAX_ACK_PAYLOAD = 64


class AckError(ProtocolError):
    """A payload on an ack topic that is not a valid v1 acknowledgement."""


class AckMsg(NamedTuple):
    upto: int
    epoch: int | None


def _is_int(value: object, top: int) -> bool:
    return type(value) is int and 0 <= value <= top  # type() is int: not bool, not a float 1.0


def encode_ack(upto: int, epoch: int | None = None) -> bytes:
    if not _is_int(upto, MAX_SEQ):
        raise AckError(f"upto must be an integer 0..2**63-1, got {upto!r:.40}")
    m: dict[str, int] = {"v": ACK_VERSION, "upto": upto}
    if epoch is not None:
        if not _is_int(epoch, MAX_EPOCH):
            raise AckError(f"epoch must be an integer 0..2**63-1, got {epoch!r:.40}")
        m["ep"] = epoch
    return cbor2.dumps(m)


def decode_ack_msg(payload: bytes) -> AckMsg:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise AckError("an ack is bytes")
    if len(payload) > MAX_ACK_PAYLOAD:
        raise AckError(f"{len(payload)} bytes: too large for an ack")
    try:
        m = cbor2.loads(payload)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise AckError(f"malformed CBOR: {type(exc).__name__}") from exc
    if type(m) is not dict:
        raise AckError("not a v1 ack map")
    try:
        v, upto, epoch = m.get("v"), m.get("upto"), m.get("ep")
    except Exception as exc:  # noqa: BLE001 - keys of odd types that refuse comparison
        raise AckError("not a v1 ack map") from exc
    if type(v) is not int or v != ACK_VERSION:
        raise AckError("not a v1 ack map")
    if not isinstance(upto, int) or not _is_int(upto, MAX_SEQ):
        raise AckError(f"upto: {type(upto).__name__} {upto!r:.40} is not a seq")
    if epoch is not None and not _is_int(epoch, MAX_EPOCH):
        raise AckError(f"ep: {type(epoch).__name__} {epoch!r:.40} is not an epoch")
    return AckMsg(upto, epoch)


def decode_ack(payload: bytes) -> int:
    """The acknowledged prefix alone (the epoch, if any, is checked and dropped)."""
    return decode_ack_msg(payload).upto
