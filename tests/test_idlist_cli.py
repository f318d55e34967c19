"""`ccus ops keygen` / `ccus ops list publish --dry-run` / `list show`, without a broker."""

import argparse
import json

from edge.idlist import Status, open_list
from edge.idlist.dist import open_delta, open_manifest
from edge.signing import load_private_key, load_public_key
from ops.list_cli import main, register, register_keygen
from ops.list_publish import plan_publish

CSV = "tid,status,level,cards\n12345678901234,active,2,0102030405060708\n" \
      "22345678901234,suspended,1,a1b2c3d4;0011223344556677\n"


def test_keygen_prints_only_public_facts(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    key_pem = (tmp_path / "k").read_text()
    assert "PRIVATE" in key_pem and "PRIVATE" not in out
    assert key_pem.splitlines()[1] not in out
    assert json.loads(out)["public_key"].endswith("k.pub")
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 1  # never overwrites


def test_dry_run_builds_signs_and_keeps_the_snapshot(tmp_path, capsys):
    main(["keygen", "--out", str(tmp_path / "k")])
    (tmp_path / "t.csv").write_text(CSV)
    capsys.readouterr()
    assert main(["list", "publish", "--csv", str(tmp_path / "t.csv"), "--name", "main",
                 "--version", "3", "--signing-key", str(tmp_path / "k"), "--dry-run",
                 "--keep", str(tmp_path / "main.3.idl"), "--issued-ms", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 2 and report["cards"] == 3 and not report["published"]
    lst = open_list(tmp_path / "main.3.idl")
    assert lst.by_card(bytes.fromhex("a1b2c3d4")).status is Status.SUSPENDED
    assert main(["list", "show", str(tmp_path / "main.3.idl")]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 3
    # the next version must be above the previous file's
    assert main(["list", "publish", "--csv", str(tmp_path / "t.csv"), "--name", "main",
                 "--version", "3", "--signing-key", str(tmp_path / "k"), "--dry-run",
                 "--prev", str(tmp_path / "main.3.idl")]) == 1
    assert "need 'main' below v3" in capsys.readouterr().err


def test_plan_orders_chunks_deltas_manifest_then_clears(tmp_path):
    main(["keygen", "--out", str(tmp_path / "k")])
    key = load_private_key(tmp_path / "k")
    pub = load_public_key(tmp_path / "k.pub")
    (tmp_path / "t.csv").write_text(CSV)
    from ops.list_publish import build_from_csv

    v1 = build_from_csv(tmp_path / "t.csv", name="main", version=1, issued_ms=1)
    v2 = build_from_csv(tmp_path / "t.csv", name="main", version=2, issued_ms=2)
    plan = plan_publish(v2, key, prev=v1, chunk_size=100)
    kinds = [m.topic.split("/")[4] if "manifest" not in m.topic else "manifest"
             for m in plan.messages]
    first_manifest = kinds.index("manifest")
    assert set(kinds[:first_manifest]) == {"snapshot", "delta"}
    assert all("/snapshot/1/" in m.topic and m.payload == b""
               for m in plan.messages[first_manifest + 1:])
    assert open_manifest([pub], plan.messages[first_manifest].payload).version == 2
    parts = [m for m in plan.messages if "/delta/" in m.topic]
    assert len(open_delta([pub], b"".join(p.payload for p in parts))) == 0  # same rows


def test_register_hooks_into_an_existing_parser():
    parser = argparse.ArgumentParser(prog="ccus")
    ops = parser.add_subparsers(dest="cmd").add_parser("ops").add_subparsers(dest="ops_cmd")
    register(ops)
    register_keygen(ops)
    args = parser.parse_args(["ops", "list", "publish", "--csv", "x", "--name", "n",
                              "--version", "1", "--signing-key", "k", "--broker", "h:1", "--site-less"])
    assert args.func.__name__ == "_publish" and args.site_less
