"""A one-reader gate agent's config for a simulated site: plain MQTT, a static CSV list, one nfcpy
reader on an emulated-card field (`udp:`). What the tests and benches start an agent process with."""

from pathlib import Path


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
