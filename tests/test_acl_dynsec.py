"""The dynamic-security file and the CRL check, pure: every identity the ACL names is in the
plugin's file once, only sinks may share; crl_status warns exactly inside its window."""

import datetime as dt
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ops.acl import Inventory, identities, render_acl, render_dynsec
from ops.pki import CA, crl_status

names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
sites = st.from_regex(r"[0-9]{14}", fullmatch=True)


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    devs = draw(st.lists(names, unique=True, max_size=6))
    return Inventory(devices=[(draw(sites), d) for d in devs],
                     operators=draw(st.lists(names, max_size=3)),
                     sinks=draw(st.lists(names, max_size=3)),
                     bridges=draw(st.lists(sites, max_size=3)))


@given(inventories())
@settings(max_examples=60, deadline=None)
def test_dynsec_names_every_acl_user_once_and_only_sinks_share(inv: Inventory) -> None:
    doc = json.loads(render_dynsec(inv))
    acl_users = {line.split(" ", 1)[1] for line in render_acl(inv).splitlines()
                 if line.startswith("user ")}
    users = [c["username"] for c in doc["clients"]]
    assert sorted(users) == sorted(acl_users) == sorted(u for u, _ in identities(inv))
    for c in doc["clients"]:
        role = c["roles"][0]["rolename"]
        assert role == ("sink" if c["username"].startswith("sink:") else "no-shared")
    # no rule but SUBSCRIBE ones: every publish and read is left to acl_file
    assert {a["acltype"] for r in doc["roles"] for a in r["acls"]} == {"subscribePattern"}
    assert not any(doc["defaultACLAccess"][k] for k in
                   ("publishClientSend", "publishClientReceive", "subscribe"))


def test_crl_status_window(tmp_path: Path) -> None:
    ca = CA.init(tmp_path / "pki")
    ca.write_crl(days=10)
    nxt = crl_status(ca.crl_path).next_update
    at = lambda days_before: nxt - dt.timedelta(days=days_before)  # noqa: E731
    assert crl_status(ca.crl_path, now=at(7.5)).problem is None
    assert "lapses in 6.5 days" in (crl_status(ca.crl_path, now=at(6.5)).problem or "")
    assert "lapsed 1.0 days ago" in (crl_status(ca.crl_path, now=at(-1)).problem or "")
    assert crl_status(ca.crl_path, now=at(20), warn_days=30).problem
