"""The MQTT topic tree (contract v1): builders and the parser the sink uses. Pure."""

from edge.touch import DEVICE_ID, SITE_ID

PREFIX = "ccus/v1"


def touch(site: str, device: str) -> str:
    return f"{PREFIX}/{site}/{device}/touch"


def state(site: str, device: str) -> str:
    return f"{PREFIX}/{site}/{device}/state"


def config(site: str, device: str) -> str:
    return f"{PREFIX}/{site}/{device}/config"


def config_ack(site: str, device: str) -> str:
    return f"{PREFIX}/{site}/{device}/config/ack"


def touch_ack(site: str, device: str) -> str:
    """Retained end-to-end acknowledgement the sink publishes per device (highest stored seq)."""
    return f"{PREFIX}/{site}/{device}/ack"


ALL_TOUCHES = f"{PREFIX}/+/+/touch"


def shared(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: sinks in one group split the messages between them."""
    return f"$share/{group}/{topic_filter}"


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """'ccus/v1/{site}/{dev}/{kind}' -> (site, dev, kind), or None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return None
    site, dev, kind = parts[2], parts[3], parts[4]
    if not SITE_ID.match(site) or not DEVICE_ID.match(dev):
        return None
    return site, dev, kind
