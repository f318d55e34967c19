"""The end-to-end acknowledgement message (pure): sink -> device, retained, QoS 1.

Topic ``ccus/v1/{site}/{dev}/ack`` (protocol.topics.touch_ack). Payload: CBOR map
``{"v": 1, "upto": N}``: every touch of that device with seq <= N is committed in the store.
N only grows; N = 0 means nothing is covered yet. docs/delivery.md is the normative text.
decode_ack() returns N or raises AckError; it never raises anything else, whatever the bytes.
"""

import cbor2

from protocol.errors import ProtocolError

ACK_VERSION = 1
MAX_SEQ = 2**63 - 1
MAX_ACK_PAYLOAD = 64


class AckError(ProtocolError):
    """A payload on an ack topic that is not a valid v1 acknowledgement."""


def encode_ack(upto: int) -> bytes:
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= MAX_SEQ:
        raise AckError(f"upto must be an integer 0..2**63-1, got {upto!r}")
    return cbor2.dumps({"v": ACK_VERSION, "upto": upto})


def decode_ack(payload: bytes) -> int:
    if len(payload) > MAX_ACK_PAYLOAD:
        raise AckError(f"{len(payload)} bytes: too large for an ack")
    try:
        m = cbor2.loads(payload)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise AckError(f"malformed CBOR: {type(exc).__name__}") from exc
    if not isinstance(m, dict) or m.get("v") != ACK_VERSION or isinstance(m.get("v"), bool):
        raise AckError("not a v1 ack map")
    upto = m.get("upto")
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= MAX_SEQ:
        raise AckError(f"upto: {upto!r:.40} is not a seq")
    return upto
