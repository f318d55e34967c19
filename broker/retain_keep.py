"""What a site broker must keep retained that its bridge to NATS brought unretained. Pure.

Rules of this file:

- A bridge to NATS's MQTT gateway speaks 3.1.1 without Mosquitto's bridge flag (try_private
  false, broker/templates/site-cluster.conf). NATS then sends a retained message published
  while the bridge is connected as an ordinary one (MQTT 3.1.1 §3.3.1.3: retain 0 to an
  established subscription), so the site broker forwards it and keeps nothing; only what NATS
  sends at the bridge's (re)subscribe comes flagged. A device that subscribes later, or asks
  again (an agent re-fetching list chunks that came before their manifest,
  edge/idlist/updater.py), finds the old retained state or none. Bridged to Mosquitto's cloud
  (try_private true) the flag is kept and this never fires.
- Kept: what the cloud keeps retained for the site's devices and sends down the bridge: their
  config (``ccus/v1/{site}/+/config``, the site-wide ``_site`` one included) and the ID lists
  (``ccus/v1/list/#``). Not the end-to-end acks (the NATS sink publishes them unretained; a
  device that missed one replays and is acknowledged again), not what devices publish.
- A message is republished, retained, QoS 1, same payload (an empty one clears the retained
  message, as it did in the cloud) exactly when it came unretained on a kept topic. The
  keeper (broker/bridge_watchdog.py, ``keep_retained``) subscribes with MQTT 5
  retain-as-published, so the flag it sees is the one the bridge delivered, and no-local, so
  its own republishes never come back.
"""

LIST_FILTER = "ccus/v1/list/#"


def kept_filters(site: str) -> tuple[str, str]:
    """The topic filters the keeper subscribes to on the site broker of `site`."""
    return (f"ccus/v1/{site}/+/config", LIST_FILTER)


def is_kept(topic: str, site: str) -> bool:
    """Is `topic` one the cloud keeps retained for this site's devices?"""
    parts = topic.split("/")
    if parts[:3] == ["ccus", "v1", "list"]:
        return len(parts) > 3
    return len(parts) == 5 and parts[:3] == ["ccus", "v1", site] and bool(parts[3]) \
        and parts[4] == "config"


def to_republish(topic: str, retained: bool, site: str) -> bool:
    """Republish this message retained? Only an unretained copy of a kept topic."""
    return not retained and is_kept(topic, site)
