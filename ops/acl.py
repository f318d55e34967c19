"""Mosquitto ACL files from the inventory, pure: what each identity may publish and read, and
(render_dynsec) who may join a shared subscription.

The broker takes the username from the certificate CN (see ops/pki.py). Rules are written
per identity (not `pattern ... %u`) because a device's site is not in its username: an
explicit block binds each device to its own site.

    device    write   ccus/v1/{site}/{dev}/touch, /state, /config/ack
              read    ccus/v1/{site}/{dev}/config, ccus/v1/{site}/_site/config,
                      ccus/v1/{site}/{dev}/ack, ccus/v1/list/#
    operator  write   ccus/v1/+/+/config (device and _site), ccus/v1/list/#
              read    the same (to see what is retained), ccus/v1/+/+/state, ccus/v1/+/+/config/ack
    sink      read    ccus/v1/+/+/touch, ccus/v1/+/+/state, ccus/v1/+/+/config/ack
              write   ccus/v1/+/+/ack
    console   read    ccus/v1/+/+/touch, /state, /config (device and _site), /config/ack,
                      ccus/v1/list/#   (the operator's console, docs/console.md: read-only)
              write   nothing
    bridge    what every device of its site may do, for all of them (ccus/v1/{site}/+/...);
              on its own site broker also what the site watchdog and its retained keeper
              need, which run with the bridge certificate there (a NATS cloud): read the
              bridge's $SYS state and the site's touches, write the site's config and lists

Anything not listed is denied; a certificate whose CN is in no block can connect but do nothing.

Mosquitto 2.0's acl_file never checks SUBSCRIBE (security_default.c: "FIXME - implement ACL
subscription strings"): a device may join `$share/sink/...` and take its share of the touches,
which the read check then drops. The dynamic-security plugin does check SUBSCRIBE, so the cloud
broker loads it with a file from render_dynsec: every identity refused `$share/...`, sinks
allowed `$share/sink/...`, and no other rule, so that every publish and read falls through
(the plugin defers) to acl_file, which stays the one place topic rights live.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from protocol import topics as t
from protocol.topics import PREFIX, SITE_LEVEL  # noqa: F401 - re-exported for the ops tools


@dataclass
class Inventory:
    """Who exists: devices as (site, dev), and names of operators, sinks and bridged sites."""
    devices: list[tuple[str, str]] = field(default_factory=list)
    operators: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)  # site ids
    consoles: list[str] = field(default_factory=list)


def device_rules(site: str, dev: str) -> list[tuple[str, str]]:
    return [
        ("write", t.touch(site, dev)),
        ("write", t.state(site, dev)),
        ("write", t.config_ack(site, dev)),
        ("write", t.event(site, dev)),  # alarms (gate forced, held open): docs/protocol.md
        ("read", t.config(site, dev)),
        ("read", t.site_config(site)),
        ("read", t.touch_ack(site, dev)),
        ("read", t.ALL_LISTS),
    ]


def bridge_rules(site: str) -> list[tuple[str, str]]:
    # '+' also matches _site, so ".../+/config" covers the site-wide config
    return [r for r in device_rules(site, "+") if f"/{SITE_LEVEL}/" not in r[1]]


def site_watchdog_rules(site: str) -> list[tuple[str, str]]:
    """The bridge identity's extra rights on its own site broker: `ccus site-watchdog
    --keep-retained` (broker/bridge_watchdog.py) watches the bridge's state and the touches and
    keeps config and lists retained. Config and lists are signed; the devices verify them."""
    return [("read", f"$SYS/broker/connection/bridge-{site}/state"),
            ("read", t.every(t.TOUCH, site)),
            ("write", t.every(t.CONFIG, site)),
            ("write", t.ALL_LISTS)]


OPERATOR_RULES = [
    ("readwrite", t.every(t.CONFIG)),
    ("readwrite", t.ALL_LISTS),
    ("read", t.every(t.STATE)),
    ("read", t.every(t.CONFIG_ACK)),
]

SINK_RULES = [
    ("read", t.every(t.TOUCH)),
    ("read", t.every(t.STATE)),
    ("read", t.every(t.CONFIG_ACK)),
    ("write", t.every(t.ACK)),
]


# the console (docs/console.md) reads with a plain subscription (it must see every touch without
# taking any from the sinks' $share group: dynsec gives it the no-shared role) and writes nothing
CONSOLE_RULES = [
    ("read", t.every(t.TOUCH)),
    ("read", t.every(t.STATE)),
    ("read", t.every(t.CONFIG)),
    ("read", t.every(t.CONFIG_ACK)),
    ("read", t.ALL_LISTS),
]


def _block(user: str, rules: Iterable[tuple[str, str]]) -> list[str]:
    return [f"user {user}"] + [f"topic {access} {topic}" for access, topic in rules] + [""]


def render_acl(inv: Inventory, *, site: str | None = None) -> str:
    """The acl_file text. With `site`, only that site's devices (a site broker's ACL)."""
    ids = [dev for _, dev in set(inv.devices)]
    dup = sorted({d for d in ids if ids.count(d) > 1})
    if dup:
        # the username is the CN alone: one id at two sites would merge their rights
        raise ValueError(f"device id {dup[0]!r} is used at more than one site")
    lines = ["# ccus-touch broker ACL, generated by `ccus ops acl`; do not edit by hand.",
             "# Users are certificate CNs (use_identity_as_username). Unlisted: denied.", ""]
    for s, dev in sorted(set(inv.devices)):
        if site is None or s == site:
            lines += _block(dev, device_rules(s, dev))
    for name in sorted(set(inv.operators)):
        lines += _block(f"operator:{name}", OPERATOR_RULES)
    for name in sorted(set(inv.sinks)):
        lines += _block(f"sink:{name}", SINK_RULES)
    for name in sorted(set(inv.consoles)):
        lines += _block(f"console:{name}", CONSOLE_RULES)
    for s in sorted(set(inv.bridges)):
        if site is None:
            lines += _block(f"bridge:{s}", bridge_rules(s))
        elif s == site:   # its own site broker: the watchdog's rights too
            lines += _block(f"bridge:{s}", bridge_rules(s) + site_watchdog_rules(s))
    return "\n".join(lines)


SHARE_GROUP = "sink"   # cloud_sink subscribes as $share/sink/...

# dynamic-security roles (Mosquitto 2.0 JSON). Rules match topic *filters* at SUBSCRIBE;
# higher priority first. Defaults deny, which for this plugin means "defer to acl_file".
DYNSEC_ROLES = [
    {"rolename": "no-shared", "textdescription": "may join no shared subscription",
     "acls": [{"acltype": "subscribePattern", "topic": "$share/#", "allow": False}]},
    {"rolename": "sink", "textdescription": f"may join $share/{SHARE_GROUP}/... only",
     "acls": [{"acltype": "subscribePattern", "topic": f"$share/{SHARE_GROUP}/#",
               "allow": True, "priority": 10},
              {"acltype": "subscribePattern", "topic": "$share/#", "allow": False,
               "priority": 0}]},
]


def identities(inv: Inventory, *, site: str | None = None) -> list[tuple[str, str]]:
    """(username, kind) of every identity the inventory names, as the broker sees them."""
    out = [(dev, "device") for s, dev in sorted(set(inv.devices)) if site is None or s == site]
    out += [(f"operator:{n}", "operator") for n in sorted(set(inv.operators))]
    out += [(f"sink:{n}", "sink") for n in sorted(set(inv.sinks))]
    out += [(f"console:{n}", "console") for n in sorted(set(inv.consoles))]
    out += [(f"bridge:{s}", "bridge") for s in sorted(set(inv.bridges))
            if site is None or s == site]
    return out


def render_dynsec(inv: Inventory) -> str:
    """The dynamic-security plugin's config file (plugin_opt_config_file) for the cloud broker.

    The plugin reads it at start only (SIGHUP does not): restart the broker after adding an
    identity. No passwords: with use_identity_as_username Mosquitto skips password checks."""
    render_acl(inv)  # the same checks (one device id at one site)
    clients = [{"username": user, "textname": kind,
                "roles": [{"rolename": "sink" if kind == "sink" else "no-shared"}]}
               for user, kind in identities(inv)]
    doc = {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                "subscribe": False, "unsubscribe": True},
           "clients": clients, "groups": [], "roles": DYNSEC_ROLES}
    return json.dumps(doc, indent=1) + "\n"
