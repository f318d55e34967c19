"""Roles as plug-ins (edge/roles): found by name in the ccus.roles entry points, edge/ never
imports vending/, and the decision core does not pull in the whole ID-list package."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from edge import roles

ROOT = Path(__file__).resolve().parent.parent


def test_every_role_of_the_touch_schema_has_a_plug_in() -> None:
    from protocol.touch import Role

    for r in Role:
        factory = roles.load(r.value)
        assert callable(factory)
    assert roles.load("vending").__module__ == "vending.role"


def test_an_unknown_role_names_the_group_and_what_to_do() -> None:
    with pytest.raises(roles.RoleError, match=r"no plug-in in entry-point group ccus.roles.*reinstall"):
        roles.load("turnstile-9000")


def test_edge_never_imports_vending() -> None:
    offenders = []
    for path in (ROOT / "edge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("vending", "cloud_sink", "ops", "sim")]
    assert offenders == []


def test_the_decision_core_imports_only_the_list_base() -> None:
    code = ("import sys, edge.decision; "
            "print(sorted(m for m in sys.modules if m.startswith('edge.idlist')), "
            "'cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['edge.idlist', 'edge.idlist.base'] False"


def test_the_list_package_still_serves_its_public_names() -> None:
    import edge.idlist as idl

    assert sorted(idl.__all__) == sorted(idl._WHERE)
    for name in idl.__all__:
        assert getattr(idl, name) is not None
    with pytest.raises(AttributeError):
        _ = idl.NoSuchThing  # type: ignore[attr-defined]
