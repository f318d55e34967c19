"""The simulated gate agents of `ccus cluster up --agents N`: real `ccus agent` processes started
through broker/cluster_procs.py (folder, proc.json, stop by `ccus cluster down`).

Rules of this file:

- An agent is a gate with one nfcpy reader on an emulated-card field, ``udp:127.0.0.1:PORT``
  (the same port on every start of one folder, as its outbox in ``data/`` is kept), and a
  static list of `CARDS` technicians whose cards `ccus card emulate` makes (sim/agent_config.py).
- With a site broker every second agent is behind it (MQTT 5, its bridge carries the touches),
  the others are straight on the nodes (MQTT 3.1.1, every node in ``brokers``, acks at QoS 0),
  with their device certificates on a secure cluster.
- With ``keys`` (a folder of operator ``*.pub``, the agent's CCUS_KEYS_DIR) the agents take
  signed config pushes and follow the signed list ``list_name``; without it they trust no key
  (a push is refused, the CSV list stays).
- It lives in `ccus` (which may import every room): the broker room imports none of ours, and
  the simulator's cards and configs are sim's.
"""

import os
from pathlib import Path

from broker.cluster_pki import Tls
from broker.cluster_procs import CCUS, Started, log_from, running, saved, spawn, wait_all
from broker.launcher import BrokerError
from sim.agent_config import card_of, gate_agent_toml, technicians, tid_of, write_idlist_csv
from sim.nfc_card import free_udp_port

CARDS = 40


def agent_name(i: int) -> str:
    return f"gate-{i:02d}"


def behind_site(i: int, has_site: bool) -> bool:
    """Is agent i (from 1) behind the site broker? The odd ones, when there is one."""
    return has_site and i % 2 == 1


def _agent_toml(folder: Path, dev: str, site: str, udp: int, *, site_port: int | None,
                mqtt_ports: list[int], tls: Tls | None, list_name: str = "") -> str:
    text = gate_agent_toml(dev=dev, site=site, data_dir=folder / "data", host="127.0.0.1",
                           port=site_port or mqtt_ports[0], list_path=folder / "list.csv",
                           udp_port=udp)
    if list_name:  # the signed list replaces the CSV once it arrives
        text = text.replace("[idlist]\n", f'[idlist]\nname = "{list_name}"\n', 1)
    if tls is not None and site_port is None:  # the site broker's device listener is plain
        text = text.replace("tls = false\n", f'tls = true\nca_file = "{tls.ca}"\n'
                            f'cert_file = "{tls.cert}"\nkey_file = "{tls.key}"\n', 1)
    if site_port is None:  # straight on the nodes: docs/operations.md, "Devices on the cluster"
        nodes = ", ".join(f'"127.0.0.1:{p}"' for p in mqtt_ports)
        text = text.replace("[idlist]", f'protocol = "3.1.1"\nbrokers = [{nodes}]\n'
                            "subscribe_qos = 0\n[idlist]", 1)
    return text


def start_agents(cluster_dir: Path, n: int, site: str, mqtt_ports: list[int],
                 site_port: int | None = None, *, tls: dict[str, Tls] | None = None,
                 keys: Path | None = None, list_name: str = "",
                 timeout: float = 60.0) -> list[Started]:
    """`n` gate agents at `site` (every second one behind the site broker on `site_port`, when
    there is one); return once every agent has connected to its broker. `tls`: gate-NN's
    device certificate, on a secure cluster (used straight on the nodes). `keys`: the folder
    of trusted operator keys (then the agents follow the signed list `list_name`)."""
    # no folder given: one that does not exist, so no key of the machine's is trusted
    keys_dir = str(keys) if keys else str(cluster_dir / "no-trusted-keys")
    out = []
    log_at: dict[str, int] = {}   # each agent's log size before this start: it is appended to
    for i in range(1, n + 1):
        dev = agent_name(i)
        folder = cluster_dir / f"agent-{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if running(folder):
            raise BrokerError(f"{folder}: that agent is running already (pid "
                              f"{saved(folder)['pid']}); `ccus cluster down --dir {cluster_dir}`")
        udp = int(saved(folder).get("udp") or free_udp_port())
        behind = site_port if behind_site(i, site_port is not None) else None
        own = None if behind else (tls or {}).get(dev)
        conf = folder / "agent.toml"
        conf.write_text(_agent_toml(folder, dev, site, udp, site_port=behind,
                                    mqtt_ports=mqtt_ports, tls=own,
                                    list_name=list_name if keys else ""))
        write_idlist_csv(folder / "list.csv", technicians(CARDS))
        log = folder / "agent.log"
        log_at[dev] = log.stat().st_size if log.exists() else 0
        pid = spawn(folder, "agent.log", [*CCUS, "agent", "--config", str(conf), "--log-format",
                                           "text"], ["agent", str(conf)], keep={"udp": udp},
                    env={**os.environ, "CCUS_KEYS_DIR": keys_dir})
        via = f"site broker 127.0.0.1:{site_port} (MQTT 5)" if behind else \
            f"the nodes (MQTT 3.1.1{', TLS' if own else ''})"
        line = (f"{dev}: reader udp:127.0.0.1:{udp} via {via}, pid {pid}; tap: ccus card emulate "
                f"felica --port {udp} --id {card_of(1).ident.hex().upper()} --tid {tid_of(1)}")
        out.append(Started(dev, pid, folder, line))

    def connected(s: Started) -> bool:  # since this start
        return "mqtt: connected to" in log_from(s.folder / "agent.log", log_at[s.name])

    wait_all(out, "agent.log", "connected", connected, timeout)
    return out
