"""deploy/install.sh into a temp root: the tree, its owners and modes (ids from the tree's own
/etc/passwd), the venv's `ccus`, every path the systemd units name, `systemd-analyze verify`."""

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
                              ".ruff_cache", ".hypothesis", "build", "demo-data")

pytestmark = [
    pytest.mark.e2e,
    # the script sets owners (chown) and makes users with useradd --prefix: both need root
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="deploy/install.sh --root needs root and useradd"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("deploy")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    root = tmp / "root"
    r = subprocess.run(["bash", str(src / "deploy" / "install.sh"), "--root", str(root), "--src", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    yield root


def ids(root: Path, db: str) -> dict[str, int]:
    rows = (line.split(":") for line in (root / "etc" / db).read_text().splitlines())
    return {f[0]: int(f[2]) for f in rows}


def members(root: Path, group: str) -> set[str]:
    for line in (root / "etc" / "group").read_text().splitlines():
        f = line.split(":")
        if f[0] == group:
            return set(filter(None, f[3].split(",")))
    return set()


@pytest.mark.parametrize("path, owner, group, mode", [
    ("etc/ccus-touch", "root", "ccus", 0o750),
    ("etc/ccus-touch/keys", "root", "ccus", 0o750),
    ("etc/ccus-touch/agent.toml", "root", "ccus", 0o640),
    ("var/lib/ccus-touch", "ccus", "ccus", 0o750),
    ("opt/ccus-touch/venv/bin/ccus", "root", "root", None),
    ("etc/systemd/system/ccus-agent.service", "root", "root", 0o644),
])
def test_owners_and_modes(tree: Path, path: str, owner: str, group: str, mode: int | None) -> None:
    users, groups = {"root": 0, **ids(tree, "passwd")}, {"root": 0, **ids(tree, "group")}
    st = (tree / path).stat()
    assert (st.st_uid, st.st_gid) == (users[owner], groups[group])
    if mode is not None:
        assert stat.S_IMODE(st.st_mode) == mode, oct(st.st_mode)


def test_the_ccus_user_is_a_system_account_with_its_device_groups(tree: Path) -> None:
    line = next(x for x in (tree / "etc/passwd").read_text().splitlines() if x.startswith("ccus:"))
    name, _, uid, _, _, home, shell = line.split(":")
    assert int(uid) < 1000 and home == "/var/lib/ccus-touch" and shell == "/usr/sbin/nologin"
    assert "ccus" in members(tree, "plugdev") and "ccus" in members(tree, "dialout")


def test_the_venv_runs_ccus(tree: Path) -> None:
    r = subprocess.run([str(tree / "opt/ccus-touch/venv/bin/ccus"), "--help"], capture_output=True,
                       text=True, timeout=60, cwd=tree)
    assert r.returncode == 0 and "agent" in r.stdout and "sink" in r.stdout, r.stderr


def test_every_path_the_agent_unit_names_is_in_the_tree(tree: Path) -> None:
    unit = (tree / "etc/systemd/system/ccus-agent.service").read_text()
    assert unit == (ROOT / "deploy/systemd/ccus-agent.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) agent --config (\S+)$", unit, re.M)
    assert exec_start, "ExecStart is not `ccus agent --config FILE`"
    binary, conf = exec_start.groups()
    assert (tree / binary.lstrip("/")).stat().st_mode & stat.S_IXUSR
    assert (tree / conf.lstrip("/")).is_file()
    keys = re.search(r"^Environment=CCUS_KEYS_DIR=(\S+)$", unit, re.M)
    assert keys and (tree / keys.group(1).lstrip("/")).is_dir()
    doc = re.search(r"^Documentation=file://(\S+)$", unit, re.M)
    assert doc and (tree / doc.group(1).lstrip("/")).is_file()
    state = re.search(r"^StateDirectory=(\S+)$", unit, re.M)
    assert state and (tree / "var/lib" / state.group(1)).is_dir()
    user = re.search(r"^User=(\S+)$", unit, re.M)
    assert user and user.group(1) in ids(tree, "passwd")


def test_a_second_run_keeps_the_operators_config(tree: Path) -> None:
    conf = tree / "etc/ccus-touch/agent.toml"
    conf.write_text("# mine\n")
    src = tree.parent / "src"
    r = subprocess.run(["bash", str(src / "deploy/install.sh"), "--root", str(tree), "--src", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert conf.read_text() == "# mine\n"
    lines = (tree / "etc/passwd").read_text().splitlines()
    assert sum(line.startswith("ccus:") for line in lines) == 1


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_installed_unit(tree: Path) -> None:
    # verify --root resolves ExecStart= inside the tree; it needs the stock units (sysinit.target)
    stock = Path("/usr/lib/systemd/system")
    if not stock.is_dir():
        pytest.skip("no stock systemd units on this machine")
    shutil.copytree(stock, tree / "usr/lib/systemd/system", dirs_exist_ok=True, symlinks=True)
    unit = "/etc/systemd/system/ccus-agent.service"
    r = subprocess.run(["systemd-analyze", "verify", f"--root={tree}", unit], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # and it does look: the same unit with an ExecStart that is not in the tree fails
    bad = tree / "etc/systemd/system/ccus-broken.service"
    bad.write_text((tree / unit.lstrip("/")).read_text().replace("/opt/ccus-touch/venv/bin/ccus",
                                                                  "/opt/nowhere/ccus"))
    r = subprocess.run(["systemd-analyze", "verify", f"--root={tree}",
                        "/etc/systemd/system/ccus-broken.service"],
                       capture_output=True, text=True, timeout=60)
    bad.unlink()
    assert r.returncode != 0 and "/opt/nowhere/ccus" in r.stderr
