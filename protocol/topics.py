"""The whole MQTT topic tree (contract v1), in one place: builders, filters and parsers. Pure.

Rules of this file:
- Every topic any part of the system publishes or subscribes to is spelled here and nowhere
  else: the agent, the sink, the operator's tools and the broker ACL all build from these names.
- Device topics are ccus/v1/{site}/{dev}/{kind}; the site-wide level is the reserved device
  name `_site` (no device id starts with '_'); ID lists live under ccus/v1/list/{name}/.

    ccus/v1/{site}/{dev}/touch        device -> sink       QoS 1
    ccus/v1/{site}/{dev}/state        device -> cloud      QoS 1, retained, last will
    ccus/v1/{site}/{dev}/config       operator -> device   QoS 1, retained, signed
    ccus/v1/{site}/_site/config       operator -> site     QoS 1, retained, signed
    ccus/v1/{site}/{dev}/config/ack   device -> operator   QoS 1, retained
    ccus/v1/{site}/{dev}/ack          sink -> device       QoS 1, retained (end-to-end ack)
    ccus/v1/{site}/{dev}/event        device -> cloud      QoS 1 (alarms: gate forced, held open)
    ccus/v1/list/{name}/snapshot/manifest, .../snapshot/{version}/{index},
    ccus/v1/list/{name}/delta/{from}-{to}/{count}/{index}   operator -> devices, retained
"""

from protocol.fields import DEVICE_ID, SITE_ID

PREFIX = "ccus/v1"
SITE_LEVEL = "_site"  # site-wide config: ccus/v1/{site}/_site/config
LIST_ROOT = f"{PREFIX}/list"

# the last level of a device topic
TOUCH, STATE, CONFIG, CONFIG_ACK, ACK = "touch", "state", "config", "config/ack", "ack"
EVENT = "event"


def device(site: str, dev: str, kind: str) -> str:
    return f"{PREFIX}/{site}/{dev}/{kind}"


def touch(site: str, dev: str) -> str:
    return device(site, dev, TOUCH)


def state(site: str, dev: str) -> str:
    return device(site, dev, STATE)


def config(site: str, dev: str) -> str:
    return device(site, dev, CONFIG)


def site_config(site: str) -> str:
    return config(site, SITE_LEVEL)


def config_ack(site: str, dev: str) -> str:
    return device(site, dev, CONFIG_ACK)


def touch_ack(site: str, dev: str) -> str:
    """Retained end-to-end acknowledgement the sink publishes per device (highest stored seq)."""
    return device(site, dev, ACK)


def event(site: str, dev: str) -> str:
    """A device's alarms (JSON): a gate forced or held open, an emergency release."""
    return device(site, dev, EVENT)


def every(kind: str, site: str = "+") -> str:
    """The filter for one kind of device topic over every device (of one site, or of all)."""
    return device(site, "+", kind)


ALL_TOUCHES = every(TOUCH)


def shared(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: sinks in one group split the messages between them."""
    return f"$share/{group}/{topic_filter}"


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """'ccus/v1/{site}/{dev}/{kind}' -> (site, dev, kind), or None if it is not one.

    `kind` is a single level (touch, state, config, ack); see parse_config_ack for config/ack."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return None
    site, dev, kind = parts[2], parts[3], parts[4]
    if not SITE_ID.match(site) or not DEVICE_ID.match(dev):
        return None
    return site, dev, kind


def parse_config_ack(topic: str) -> tuple[str, str] | None:
    """'ccus/v1/{site}/{dev}/config/ack' -> (site, dev), or None."""
    parts = topic.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[4:] != ["config", "ack"]:
        return None
    if not SITE_ID.match(parts[2]) or not DEVICE_ID.match(parts[3]):
        return None
    return parts[2], parts[3]


# -- ID lists ----------------------------------------------------------------------------------
def list_subscription(name: str) -> str:
    """The one filter a device subscribes to for list `name`."""
    return f"{LIST_ROOT}/{name}/#"


def list_manifest(name: str) -> str:
    return f"{LIST_ROOT}/{name}/snapshot/manifest"


def list_chunk(name: str, version: int, index: int) -> str:
    return f"{LIST_ROOT}/{name}/snapshot/{version}/{index}"


def list_delta(name: str, from_version: int, to_version: int, count: int = 1, index: int = 0) -> str:
    return f"{LIST_ROOT}/{name}/delta/{from_version}-{to_version}/{count}/{index}"


ALL_LISTS = f"{LIST_ROOT}/#"


# The NATS cluster tier (docs/operations.md "National layout"): NATS's MQTT gateway carries an
# MQTT topic as the NATS subject with '/' -> '.', and a filter's '+' -> '*', '#' -> '>'. Our
# levels never hold '.', '*', '>' or spaces (site and device IDs, fixed kinds), so the mapping
# is one to one on the topic tree.
def nats_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or filter of the tree."""
    return ".".join("*" if lv == "+" else ">" if lv == "#" else lv for lv in topic.split("/"))


def mqtt_topic(subject: str) -> str:
    """The MQTT topic of a NATS subject (the inverse of nats_subject on topics)."""
    return subject.replace(".", "/")


ALL_TOUCH_SUBJECTS = nats_subject(ALL_TOUCHES)   # ccus.v1.*.*.touch
TOUCH_STREAM = "CCUS_TOUCHES"                    # the JetStream stream that keeps them (R3)
