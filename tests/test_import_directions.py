"""The rooms and which may import which (docs/architecture.md draws it): read with ast over the
tree, every import counted (module level, inside functions, under TYPE_CHECKING alike).

A new edge that the table does not allow fails here; so does a cycle between top-level
packages, and a `_private` name imported from another package.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_ROOMS = {"tests", "bench", "scripts", "docs", "deploy"}
ANY = "*"

# room -> the rooms it may import. The picture in docs/architecture.md is this table.
ALLOWED: dict[str, set[str] | str] = {
    "protocol": set(),                          # the wire contract: nothing of ours
    "firmware": set(),                          # MicroPython: nothing of ours
    "broker": set(),                            # Mosquitto configs and launcher
    "edge": {"protocol", "firmware"},           # the device: board link speaks firmware/frame.py
    "vending": {"edge", "protocol", "firmware"},
    "cloud_sink": {"protocol"},                 # from the device side only the wire contract
    "ops": {"edge", "protocol", "broker"},
    "sim": {"protocol", "firmware", "edge"},
    "console": {"cloud_sink", "ops", "protocol"},   # the web console reads the store and MQTT
    "demo": ANY,
    "ccus": ANY,                                # the command, lazily
}

# Allowed-edge exceptions, each with the file(s) it covers and why (none left: the last one,
# edge/agent.py -> vending.station, went when roles became plug-ins through the `ccus.roles`
# entry points). test_every_exception_is_still_needed fails on one no longer used.
EXCEPTIONS: dict[tuple[str, str], set[str]] = {}


def rooms() -> set[str]:
    return {p.name for p in ROOT.iterdir()
            if p.is_dir() and p.name not in NOT_ROOMS and not p.name.startswith(".")
            and any(p.glob("*.py"))}


def imports() -> list[tuple[str, str, str, str]]:
    """(from room, to room, file, module) for every import between two rooms."""
    known = rooms()
    out = []
    for room in sorted(known):
        for f in sorted((ROOT / room).rglob("*.py")):
            tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in known and top != room:
                        out.append((room, top, f.relative_to(ROOT).as_posix(), name))
    return out


def test_every_room_is_in_the_table() -> None:
    assert rooms() == set(ALLOWED), "a new top-level package: add it to ALLOWED and the docs"


def test_imports_follow_the_allowed_directions() -> None:
    bad = []
    for src, dst, f, name in imports():
        allowed = ALLOWED[src]
        if allowed == ANY or dst in allowed or f in EXCEPTIONS.get((src, dst), set()):
            continue
        bad.append(f"{src} -> {dst}: {f} imports {name}")
    assert bad == []


def test_every_exception_is_still_needed() -> None:
    used = {(src, dst, f) for src, dst, f, _ in imports()}
    for (src, dst), files in EXCEPTIONS.items():
        for f in files:
            assert (src, dst, f) in used, f"{f} no longer imports {dst}: drop the exception"


def test_no_cycle_between_rooms() -> None:
    graph: dict[str, set[str]] = {r: set() for r in rooms()}
    for src, dst, f, _ in imports():
        if f not in EXCEPTIONS.get((src, dst), set()):
            graph[src].add(dst)

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        stack = [start]
        while stack:
            for n in graph[stack.pop()] - seen:
                seen.add(n)
                stack.append(n)
        return seen

    assert sorted(r for r in graph if r in reaches(r)) == []


def test_no_private_name_crosses_a_room() -> None:
    known = rooms()
    bad = []
    for room in sorted(known):
        for f in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] in known - {room}):
                    bad += [f"{f.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []


def test_the_rules_catch_a_forbidden_edge() -> None:
    # the checker itself: edge -> cloud_sink is refused, cloud_sink -> protocol is not
    assert "cloud_sink" not in ALLOWED["edge"] and "edge" not in ALLOWED["cloud_sink"]
    assert "protocol" in ALLOWED["cloud_sink"]
