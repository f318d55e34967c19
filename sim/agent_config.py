"""A one-reader gate agent's config for a simulated site: plain MQTT, a static CSV list, one nfcpy
reader on an emulated-card field (`udp:`). What the tests, the benches and `ccus cluster up
--agents` start an agent process with; and the simulated technicians' cards (card i: FeliCa IDm
012E4CD3 + i in 8 hex digits, technician ID 10000000000000 + i) and their static list CSV."""

from pathlib import Path

from edge.idlist import Entry, Status
from sim.cards import EmulatedCard, felica_card


def card_of(i: int) -> EmulatedCard:
    return felica_card(bytes.fromhex(f"012E4CD3{i:08X}"))


def tid_of(i: int) -> str:
    return f"{10000000000000 + i:014d}"


def write_idlist_csv(path: Path, entries: list[Entry]) -> None:
    lines = ["tid,status,level,cards"]
    lines += [f"{e.tid},{e.status.value},{e.level},{' '.join(c.hex() for c in e.cards)}"
              for e in entries]
    path.write_text("\n".join(lines) + "\n")


def technicians(n: int) -> list[Entry]:
    """Technicians 1..n, active, each with card_of(i)."""
    return [Entry(tid_of(i), Status.ACTIVE, cards=(card_of(i).ident,)) for i in range(1, n + 1)]


def gate_agent_toml(*, dev: str, site: str, data_dir: Path, host: str, port: int,
                    list_path: Path, udp_port: int) -> str:
    """agent.toml text: device `dev` at `site`, broker host:port without TLS, the list at
    `list_path`, reader `entry` on udp:127.0.0.1:udp_port reading FeliCa (212F)."""
    return f"""
[device]
id = "{dev}"
site = "{site}"
data_dir = "{data_dir}"
[mqtt]
host = "{host}"
port = {port}
tls = false
[idlist]
path = "{list_path}"
[[readers]]
name = "entry"
path = "udp:127.0.0.1:{udp_port}"
targets = ["212F"]
"""
