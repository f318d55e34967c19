"""write_atomic (the one way a file is replaced) and the one error base per package."""

import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.atomic import write_atomic


def test_replaces_with_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "device.key"
    old = os.umask(0o077)
    try:
        write_atomic(p, b"one", mode=0o644)
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        write_atomic(p, "zwei ✓", mode=0o600)
    finally:
        os.umask(old)
    assert p.read_text(encoding="utf-8") == "zwei ✓"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(x.name for x in p.parent.iterdir()) == ["device.key"]  # no temp file left


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()  # a folder where the file should be: the rename fails
    (target / "x").write_text("keep")
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert (target / "x").read_text() == "keep"
    assert [x.name for x in tmp_path.iterdir()] == ["state"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=70_000), min_size=1, max_size=4))
def test_the_last_write_wins_byte_for_byte(tmp_path_factory: pytest.TempPathFactory,
                                          writes: list[bytes]) -> None:
    p = tmp_path_factory.mktemp("w") / "f"
    for data in writes:
        write_atomic(p, data)
    assert p.read_bytes() == writes[-1]


def test_every_replacing_writer_uses_write_atomic() -> None:
    """No private temp-file-and-rename left outside edge/atomic.py (the ID-list updater
    installs a verified temp file it built itself; moving a file aside is no write)."""
    root = Path(__file__).resolve().parent.parent
    allowed = {"edge/atomic.py", "edge/idlist/updater.py"}
    temp_rename = re.compile(r"os\.(replace|rename)\(\s*\w*tmp|\w*tmp\w*\.(replace|rename)\(")
    offenders = []
    for pkg in ("protocol", "edge", "vending", "cloud_sink", "ops", "sim", "demo", "ccus", "broker"):
        for f in (root / pkg).rglob("*.py"):
            rel = f.relative_to(root).as_posix()
            if rel not in allowed and temp_rename.search(f.read_text()):
                offenders.append(rel)
    assert offenders == []


def test_one_base_per_package_catches_every_family_member() -> None:
    from cloud_sink.courses import CsvError
    from cloud_sink.errors import SinkError
    from cloud_sink.stores.postgres import StoreUnavailable
    from edge.board import BoardError, BoardSilent, BoardTimeout
    from edge.config import ConfigError
    from edge.config_apply import ConfigRefused
    from edge.errors import EdgeError, ListError, ReaderError
    from edge.idlist import DeltaError, ListFormatError
    from edge.idlist.dist import ManifestError
    from edge.idlist.merge import MergeConflict
    from edge.reader.pcsc_backend import PcscDown
    from edge.reader.profiles import LinkLost
    from edge.signing import SignatureError
    from ops.errors import OpsError
    from ops.mqttc import MqttError, PublishError
    from ops.pki import PkiError
    from protocol.ack import AckError
    from protocol.errors import ProtocolError
    from protocol.touch import TouchError
    from vending import InvalidTransition, LimitReached
    from vending.errors import VendingError
    from vending.ledger import LedgerError
    from vending.mdb import MdbError

    families: dict[type[Exception], list[type[Exception]]] = {
        ListError: [ListFormatError, DeltaError, MergeConflict, ManifestError],
        ReaderError: [PcscDown, LinkLost],
        EdgeError: [ListError, ReaderError, ConfigError, ConfigRefused, BoardError, BoardSilent,
                    BoardTimeout, SignatureError],
        ProtocolError: [TouchError, AckError],
        OpsError: [PkiError, MqttError, PublishError],
        SinkError: [StoreUnavailable, CsvError],
        VendingError: [LimitReached, LedgerError, InvalidTransition, MdbError],
    }
    for base, members in families.items():
        for cls in members:
            assert issubclass(cls, base), (cls, base)
    # the older bases stay, so `except ValueError` callers keep working
    for cls in (ListFormatError, DeltaError, ConfigError, SignatureError, TouchError, PkiError, CsvError):
        assert issubclass(cls, ValueError), cls
    with pytest.raises(ListError):
        from edge.idlist import load_list

        load_list(b"not a list")


def test_write_new_creates_private_and_never_replaces(tmp_path: Path) -> None:
    from edge.atomic import write_new

    key = write_new(tmp_path / "k" / "device.key", b"secret")
    assert key.read_bytes() == b"secret" and (key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        write_new(key, b"other")
    assert key.read_bytes() == b"secret"
