"""Reader and profile config: new keys load, bad values name their key, backends follow the config."""

from pathlib import Path

import pytest

from edge.agent import Agent
from edge.config import ConfigError, from_dict
from edge.reader.nfcpy_backend import NfcpyReader
from edge.reader.pcsc_backend import PcscReader


def raw(tmp: Path | None = None, **profile: object) -> dict[str, object]:
    return {
        "device": {"id": "gate-01", "site": "13100000000001",
                   "data_dir": str(tmp or "/nonexistent")},
        "readers": [
            {"name": "a", "path": "pcsc:RC-S300", "backend": "pcsc", "profile": "p",
             "feedback": "hook"},
            {"name": "b", "path": "udp:127.0.0.1:50001", "targets": ["106B"]},
        ],
        "profiles": {"p": {"kind": "iso_dep", "aid": "F04343555301", "file_id": "0001",
                           **profile}},
    }


def test_iso_dep_profile_and_pcsc_reader_load() -> None:
    cfg = from_dict(raw(read_length=32, read_offset=4))
    p = cfg.profiles["p"]
    assert (p.kind, p.aid, p.file_id, p.read_offset, p.read_length) == \
        ("iso_dep", "F04343555301", "0001", 4, 32)
    assert cfg.readers[0].backend == "pcsc" and cfg.readers[0].feedback == "hook"


@pytest.mark.parametrize("bad,key", [
    ({"aid": "F0"}, "aid"),
    ({"aid": "XYZ"}, "aid"),
    ({"file_id": "01"}, "file_id"),
    ({"read_length": 0}, "read_length"),
    ({"kind": "mifare"}, "kind"),
    ({"block_count": 16}, "block_count"),
    ({"encoding": "utf16"}, "encoding"),
])
def test_bad_profile_values_name_their_key(bad: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_dict(raw(**bad))


def test_pcsc_path_and_feedback_are_checked() -> None:
    r = raw()
    r["readers"][0]["path"] = "usb:054c:06c3"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"readers\[0\].path"):
        from_dict(r)
    r = raw()
    r["readers"][1]["feedback"] = "loud"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"readers\[1\].feedback"):
        from_dict(r)


def test_agent_builds_each_backend_by_config(tmp_path: Path) -> None:
    agent = Agent(from_dict(raw(tmp_path)), config_keys=[])
    try:
        assert isinstance(agent.readers[0], PcscReader)
        assert isinstance(agent.readers[1], NfcpyReader)
        assert agent.state()["readers"] == {"a": "starting", "b": "starting"}
    finally:
        agent.outbox.close()
