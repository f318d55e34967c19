"""Validation of one MQTT message on a touch topic (pure): a Touch, or a DeadLetter with a reason."""

from cloud_sink.model import DeadLetter
from protocol import topics
from protocol.touch import Touch, TouchError, decode


def validate(topic: str, payload: bytes) -> Touch | DeadLetter:
    where = topics.parse_device_topic(topic)
    if where is None or where[2] != "touch":
        return DeadLetter(topic, payload, "bad_topic", "not ccus/v1/{site}/{device}/touch")
    try:
        touch = decode(payload)
    except TouchError as exc:
        return DeadLetter(topic, payload, exc.reason, exc.detail)
    site, device, _ = where
    if (touch.site, touch.device) != (site, device):
        # a device may only speak for itself: the topic is what the broker's ACL checked
        return DeadLetter(topic, payload, "topic_mismatch",
                          f"payload says {touch.site}/{touch.device}, topic {site}/{device}")
    return touch
