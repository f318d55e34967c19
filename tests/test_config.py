"""Agent config: defaults for everything optional, errors that name the key."""

from pathlib import Path

import pytest

from edge.config import ConfigError, from_dict, load

MINIMAL = {"device": {"id": "gate-01", "site": "13100000000001"}}


def test_minimal_config_gets_production_defaults() -> None:
    cfg = from_dict(MINIMAL)
    assert cfg.device.role == "gate"
    assert cfg.mqtt.tls is True and cfg.mqtt.port == 8883   # secure by default
    assert cfg.mqtt.inflight == 50
    assert cfg.readers == [] and cfg.idlist.path == ""


def test_reader_defaults() -> None:
    cfg = from_dict({**MINIMAL, "readers": [{"name": "entry", "path": "usb:054c:06c3"}]})
    r = cfg.readers[0]
    assert (r.backend, r.direction, r.profile, r.retap_window_s) == ("nfcpy", "in", "uid", 2.0)


@pytest.mark.parametrize(("raw", "key"), [
    ({}, "device: missing"),
    ({"device": {"site": "13100000000001"}}, "device.id: missing"),
    ({**MINIMAL, "mqtt": {"hots": "x"}}, "mqtt.hots: unknown key"),
    ({**MINIMAL, "mqtt": {"port": "1883"}}, "mqtt.port: expected int"),
    ({**MINIMAL, "mqtt": {"tls": 1}}, "mqtt.tls: expected bool"),
    ({"device": {"id": "gate 01", "site": "13100000000001"}}, "device.id"),
    ({"device": {"id": "g", "site": "1310"}}, "device.site"),
    ({"device": {"id": "g", "site": "13100000000001", "role": "turnstile"}}, "device.role"),
    ({**MINIMAL, "readers": [{"name": "a", "path": "x", "direction": "up"}]}, "readers[0].direction"),
    ({**MINIMAL, "readers": [{"name": "a"}]}, "readers[0].path: missing"),
    ({**MINIMAL, "readers": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]},
     "readers[1].name"),
    ({**MINIMAL, "readers": [{"name": "a", "path": "x", "profile": "ccus"}]}, "readers[0].profile"),
    ({**MINIMAL, "readers": [{"name": "a", "path": "x", "targets": ["999Z"]}]}, "readers[0].targets"),
    ({**MINIMAL, "profiles": {"ccus": {"encoding": "ebcdic"}}}, "profiles.ccus.encoding"),
    # a reader's name rides on every touch as its `reader` fact: the touch codec's text rule
    ({**MINIMAL, "readers": [{"name": "r" * 65, "path": "x"}]}, "readers[0].name: 1..64"),
    ({**MINIMAL, "readers": [{"name": "a\x00", "path": "x"}]}, "readers[0].name: 1..64"),
    ({**MINIMAL, "readers": [{"name": "", "path": "x"}]}, "readers[0].name: 1..64"),
    # the gate's board (docs/architecture.md, "The gate loop")
    ({**MINIMAL, "gate": {"relay_out": 2}}, "gate.relay_in, gate.relay_out: 0 or 1"),
    ({**MINIMAL, "gate": {"pulse_ms": 9000}}, "gate.pulse_ms: 1..5000"),
    ({**MINIMAL, "gate": {"passage_timeout_s": 0}}, "gate.passage_timeout_s"),
    ({**MINIMAL, "gate": {"serial": 1}}, "gate.serial: expected str"),
])
def test_errors_name_the_key(raw: dict, key: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict(raw)


def test_load_reports_toml_errors_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[device\nid = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "absent.toml")


def test_a_course_id_no_touch_could_carry_is_refused_at_load(tmp_path: Path) -> None:
    from edge.roles.training import Schedule

    f = tmp_path / "courses.toml"
    f.write_text('[[course]]\nid = "K\\u0000101"\nname = "x"\n'
                 'start = 2026-12-01T09:00:00+09:00\nend = 2026-12-03T17:00:00+09:00\n')
    with pytest.raises(ValueError, match=r"course\[0\]\.id: 1\.\.64 characters, no NUL"):
        Schedule.load(f)
    f.write_text(f.read_text().replace("K\\u0000101", "K-101"))
    assert [c.id for c in Schedule.load(f).courses] == ["K-101"]
