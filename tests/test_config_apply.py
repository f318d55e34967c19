"""Signed config on the device: the envelope codec, the apply decision, atomic apply and acks."""

import time
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import config_apply as ca
from edge.config import from_dict
from edge.signing import generate_key, seal
from protocol import topics

SITE, DEV = "12345678901234", "gate-01"
KEY = generate_key()
OTHER = generate_key()
KEYS = [KEY.public_key()]
NOW = int(time.time() * 1000)  # the applier's clock is the wall clock: fresh configs


def base(tmp: Path | None = None) -> dict:
    return {"device": {"id": DEV, "site": SITE, "data_dir": str(tmp or "/nonexistent")},
            "mqtt": {"tls": False}}


def env(version: int, body: dict, dev: str = DEV, key=KEY, site: str = SITE) -> bytes:
    return ca.encode(key, version=version, site=site, dev=dev, body=body, issued_ms=NOW)


# -- codec -----------------------------------------------------------------------------------
def test_roundtrip() -> None:
    doc = ca.decode(KEYS, env(7, {"gate": {"anti_passback": True}}))
    assert (doc.version, doc.site, doc.dev, doc.scope) == (7, SITE, DEV, "device")
    assert doc.body == {"gate": {"anti_passback": True}}
    assert ca.decode(KEYS, env(3, {}, dev="_site")).scope == "site"


@pytest.mark.parametrize("payload, reason", [
    (cbor2.dumps({"version": 9, "target": {"site": SITE, "dev": DEV}, "issued_ms": 1,
                  "body": {}}), "unsigned"),
    (env(9, {}, key=OTHER), "unknown_key"),
    (b"\xff\x00garbage", "malformed"),
    (b"", "malformed"),
    (seal(KEY, "idlist-manifest", {"version": 9, "target": {"site": SITE, "dev": DEV},
                                   "issued_ms": 1, "body": {}}), "bad_signature"),
    (seal(KEY, "config", {"version": 0, "target": {"site": SITE, "dev": DEV},
                          "issued_ms": 1, "body": {}}), "out_of_range"),
    (seal(KEY, "config", {"version": 1, "target": {"site": "1", "dev": DEV},
                          "issued_ms": 1, "body": {}}), "malformed"),
])
def test_refusals(payload: bytes, reason: str) -> None:
    with pytest.raises(ca.ConfigRefused) as exc:
        ca.decode(KEYS, payload)
    assert exc.value.reason == reason


def test_tampered_body_is_bad_signature() -> None:
    outer = cbor2.loads(env(5, {"gate": {"anti_passback": False}}))
    doc = cbor2.loads(outer["body"])
    doc["version"] = 6
    outer["body"] = cbor2.dumps(doc, canonical=True)
    with pytest.raises(ca.ConfigRefused) as exc:
        ca.decode(KEYS, cbor2.dumps(outer))
    assert exc.value.reason == "bad_signature"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_refused_with_own_error(data: bytes) -> None:
    with pytest.raises(ca.ConfigRefused):
        ca.decode(KEYS, data)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                    | st.binary(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                        max_size=3),
                    max_leaves=10))
def test_arbitrary_cbor_refused_with_own_error(obj: object) -> None:
    with pytest.raises(ca.ConfigRefused):
        ca.decode(KEYS, cbor2.dumps(obj))


# -- decision ----------------------------------------------------------------------------------
def doc(version: int, body: dict, dev: str = DEV) -> ca.ConfigDoc:
    return ca.decode(KEYS, env(version, body, dev=dev))


def test_apply_merges_site_then_device() -> None:
    d1 = ca.decide(ca.Applied(), doc(10, {"gate": {"anti_passback": True},
                                         "idlist": {"max_age_h": 10}}, "_site"), base(), SITE, DEV)
    assert d1.result == "applied" and d1.config and d1.config.gate.anti_passback
    d2 = ca.decide(d1.state, doc(5, {"idlist": {"max_age_h": 3}}), base(), SITE, DEV)
    assert d2.result == "applied" and d2.config
    assert d2.config.idlist.max_age_h == 3.0 and d2.config.gate.anti_passback  # both layers
    assert d2.config.version == 10  # the newer of the two scopes


@pytest.mark.parametrize("body, reason", [
    ({"device": {"id": "gate-99"}}, "protected"),
    ({"device": {"site": "99999999999999"}}, "protected"),
    ({"device": {"data_dir": "/tmp/elsewhere"}}, "protected"),
    ({"version": 99}, "protected"),
    ({"mqtt": {"inflight": 0}}, "schema"),
    ({"nonsense": 1}, "schema"),
    ({"gate": {"anti_passback": "yes"}}, "schema"),
])
def test_refused_bodies_keep_state(body: dict, reason: str) -> None:
    d = ca.decide(ca.Applied(), doc(3, body), base(), SITE, DEV)
    assert (d.result, d.reason) == ("refused", reason)
    assert d.state == ca.Applied() and d.config is None


def test_wrong_target() -> None:
    d = ca.decide(ca.Applied(), doc(3, {}, dev="gate-02"), base(), SITE, DEV)
    assert (d.result, d.reason) == ("refused", "wrong_target")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([DEV, "_site"]), st.integers(1, 20)), max_size=12))
def test_decision_versions_only_move_forward(pushes: list[tuple[str, int]]) -> None:
    state = ca.Applied()
    for dev, version in pushes:
        d = ca.decide(state, doc(version, {"idlist": {"max_age_h": version}}, dev), base(),
                      SITE, DEV)
        scope = "site" if dev == "_site" else "device"
        before = getattr(state, scope)[0]
        if version > before:
            assert d.result == "applied" and getattr(d.state, scope)[0] == version
            assert d.config and d.config.version == d.state.version
        elif version == before:
            assert d.result == "unchanged"  # same signed bytes: a retained redelivery
        else:
            assert d.result == "refused" and d.reason == "replay" and d.state == state
        state = d.state


# -- the applier: persistence and acks -------------------------------------------------------------
def applier(tmp_path: Path, state: ca.Applied | None = None):
    cfg = from_dict(base(tmp_path))
    acks: list[tuple[str, dict, bool]] = []
    applied: list = []
    a = ca.ConfigApplier(cfg, KEYS, state or ca.Applied(),
                         lambda t, p, r: acks.append((t, cbor2.loads(p), r)), applied.append)
    return a, acks, applied


def test_applier_applies_persists_and_acks(tmp_path: Path) -> None:
    a, acks, applied = applier(tmp_path)
    payload = env(4, {"gate": {"anti_passback": True}})
    d = a.handle(topics.config(SITE, DEV), payload)
    assert d and d.result == "applied"
    saved = tmp_path / "config" / "device.cbor"
    assert saved.read_bytes() == payload
    assert not list((tmp_path / "config").glob("*.tmp"))
    assert acks[-1][0] == topics.config_ack(SITE, DEV) and acks[-1][2] is True
    assert acks[-1][1]["result"] == "applied" and acks[-1][1]["version"] == 4
    assert applied and applied[0].gate.anti_passback

    # replay, forgery: refused, reported, file untouched
    for bad, reason in [(env(3, {}), "replay"), (env(9, {}, key=OTHER), "unknown_key")]:
        d = a.handle(topics.config(SITE, DEV), bad)
        assert d and (d.result, d.reason) == ("refused", reason)
        assert acks[-1][1]["result"] == "refused" and acks[-1][1]["reason"] == reason
        assert saved.read_bytes() == payload and a.state.device[0] == 4

    # a reboot comes back with what was applied
    cfg, state = ca.boot_config(from_dict(base(tmp_path)), KEYS)
    assert cfg.version == 4 and cfg.gate.anti_passback and state == a.state
    # ...and without the trusted key, with the file config only
    cfg, state = ca.boot_config(from_dict(base(tmp_path)), [OTHER.public_key()])
    assert cfg.version == 0 and state == ca.Applied()


def test_applier_refuses_envelope_moved_to_another_topic(tmp_path: Path) -> None:
    a, acks, _ = applier(tmp_path)
    d = a.handle(topics.config(SITE, "_site"), env(4, {}))  # signed for gate-01, sent site-wide
    assert d and d.reason == "wrong_target"
    assert not (tmp_path / "config" / "device.cbor").exists()


def test_applier_io_failure_refuses(tmp_path: Path) -> None:
    a, acks, _ = applier(tmp_path)
    (tmp_path / "config").write_text("a file where the folder should be")
    d = a.handle(topics.config(SITE, DEV), env(4, {}))
    assert d and (d.result, d.reason) == ("refused", "io") and a.state == ca.Applied()


def test_empty_retained_message_is_ignored(tmp_path: Path) -> None:
    a, acks, _ = applier(tmp_path)
    assert a.handle(topics.config(SITE, DEV), b"") is None and acks == []


def test_write_atomic_replaces(tmp_path: Path) -> None:
    p = tmp_path / "x" / "f"
    ca.write_atomic(p, b"one")
    ca.write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and [q.name for q in p.parent.iterdir()] == ["f"]


def test_merge_replaces_lists() -> None:
    merged = ca.merge({"readers": [{"name": "a"}], "t": {"x": 1, "y": 2}},
                      {"readers": [{"name": "b"}], "t": {"y": 3}})
    assert merged == {"readers": [{"name": "b"}], "t": {"x": 1, "y": 3}}
