"""The config examples in the docs and in deploy/etc/ccus-touch/agent.toml load with edge.config
(and course schedules with Schedule.load), so the documentation cannot drift from the code;
and the schedule's rules that docs/config.md states (an offset is required) hold."""

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cloud_sink.workday import jst_ms
from edge.agent import Agent
from edge.config import AgentConfig, ConfigError, from_dict
from edge.roles.training import Schedule

ROOT = Path(__file__).resolve().parent.parent
# file -> how many marked blocks it must have (so a renamed marker cannot pass by finding none)
DOCS = {"docs/config.md": 4, "docs/vending.md": 2, "docs/operations.md": 1}
DEPLOY = ROOT / "deploy/etc/ccus-touch/agent.toml"
BASE_DEVICE = {"id": "doc-example", "site": "13100000000009"}


def blocks(path: Path) -> list[tuple[str, str]]:
    """(marker, text) of each ```toml block whose first line is '# agent.toml' / '# schedule.toml'."""
    out = []
    for m in re.finditer(r"^```toml\n(.*?)^```", path.read_text(), re.S | re.M):
        first = m.group(1).split("\n", 1)[0].strip()
        if first in ("# agent.toml", "# schedule.toml"):
            out.append((first[2:], m.group(1)))
    return out


def load_agent(raw: dict[str, Any]) -> AgentConfig:
    raw.setdefault("device", dict(BASE_DEVICE))
    if "vending" in raw:  # a [vending] example is for a vending machine
        raw["device"].setdefault("role", "vending")
    return from_dict(raw)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_marked_example_in_the_docs_loads(doc: str, tmp_path: Path) -> None:
    found = blocks(ROOT / doc)
    assert len(found) == DOCS[doc], [m for m, _ in found]
    for i, (kind, text) in enumerate(found):
        if kind == "schedule.toml":
            (tmp_path / f"s{i}.toml").write_text(text)
            schedule = Schedule.load(tmp_path / f"s{i}.toml")
            assert schedule.courses, f"{doc} block {i}: no course"
        else:
            cfg = load_agent(tomllib.loads(text))
            assert cfg.device.id


def test_the_documented_values_are_what_the_code_reads(tmp_path: Path) -> None:
    vend = [tomllib.loads(t) for _, t in blocks(ROOT / "docs/vending.md")]
    mdb = load_agent(vend[1]).vending
    assert (mdb.channel, mdb.price_ceiling, mdb.session_s, mdb.scope) == ("mdb", 160, 45.0, "site")
    (tmp_path / "s.toml").write_text(blocks(ROOT / "docs/config.md")[1][1])
    k101 = Schedule.load(tmp_path / "s.toml").courses[0]
    assert k101.id == "K-101" and k101.start_ms == jst_ms(2026, 12, 1, 9, 0)


def uncommented(table: str) -> str:
    """The commented example `# [table]` in the deploy agent.toml, its '# ' taken off."""
    lines = DEPLOY.read_text().splitlines()
    start = lines.index(f"# [{table}]")
    out = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        out.append(line[2:])
    return "\n".join(out)


def test_the_deploy_agent_toml_and_its_commented_examples_load() -> None:
    base = tomllib.loads(DEPLOY.read_text())
    assert from_dict(base).metrics.listen == ""  # off as shipped
    for table in ("metrics", "vending", "training"):
        example = tomllib.loads(uncommented(table))
        assert list(example) == [table]
        raw = {**base, **example}
        if table != "metrics":
            raw["device"] = {**base["device"], "role": table}
        cfg = from_dict(raw)
        assert getattr(cfg, table) != type(getattr(cfg, table))(), f"[{table}]: all defaults?"


def test_a_course_without_a_utc_offset_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "naive.toml"
    bad.write_text('[[course]]\nid = "K"\nname = "k"\nstart = 2026-12-01T09:00:00\n'
                   'end = 2026-12-01T17:00:00+09:00\n')
    with pytest.raises(ValueError, match=r"course\[0\]\.start: give the UTC offset"):
        Schedule.load(bad)


@pytest.mark.parametrize("content, message", [
    (None, "training.schedule: cannot read "),
    ("[[course]\n", r"^training\.schedule: "),
    ('[[course]]\nid = "K"\nname = "k"\nstart = 2026-12-02T09:00:00+09:00\n'
     'end = 2026-12-01T17:00:00+09:00\n', "training.schedule: course K: ends before it starts"),
])
def test_a_bad_schedule_is_a_config_error_naming_the_key(tmp_path: Path, content: str | None,
                                                         message: str) -> None:
    path = tmp_path / "courses.toml"
    if content is not None:
        path.write_text(content)
    cfg = from_dict({"device": {**BASE_DEVICE, "role": "training",
                                "data_dir": str(tmp_path / "d")},
                     "mqtt": {"tls": False, "port": 1}, "training": {"schedule": str(path)}})
    with pytest.raises(ConfigError, match=message):
        Agent(cfg, config_keys=[])
