"""Which touch a dead letter accounts for (pure): the key the store keeps and the ack ledger counts.

Rules of this file: pure, never raises, imports nothing of the sink but its record types, so
the store backends (cloud_sink.stores.base) and the acknowledgement ledger (cloud_sink.acks)
both import it and neither imports the other.

A dead letter of a device's own touch (on its own topic: the broker's ACL lets no one else
publish there) is kept with its bytes, so its seq counts as accounted for: one refused touch
must not stop the device forgetting every touch after it. Not so for reasons a later sink may
store (a newer schema, a device registered later): the device keeps those and sends them again.
"""

import cbor2

from cloud_sink.model import DeadLetter
from protocol import topics
from protocol.touch import MAX_PAYLOAD, MAX_SEQ

# dead letters the device keeps and sends again: a later sink may store them
KEEP_ON_DEVICE = frozenset({"unknown_schema", "unregistered_device"})


def dead_letter_key(letter: DeadLetter) -> tuple[str, str, int] | None:
    """(site, device, seq) a dead letter accounts for in its device's acknowledgement, or None:
    the topic is the device's touch topic and the payload a CBOR map naming that device and
    site with a valid seq (pure; never raises)."""
    where = topics.parse_device_topic(letter.topic)
    if (letter.reason in KEEP_ON_DEVICE or where is None or where[2] != "touch"
            or len(letter.payload) > MAX_PAYLOAD):
        return None
    try:
        m = cbor2.loads(letter.payload)
    except Exception:  # noqa: BLE001 - any undecodable payload names no seq
        return None
    site, device, _ = where
    if type(m) is not dict or m.get("dev") != device or m.get("site") != site:
        return None
    seq = m.get("seq")
    return (site, device, seq) if type(seq) is int and 1 <= seq <= MAX_SEQ else None
