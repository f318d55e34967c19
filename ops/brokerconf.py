"""Broker configuration bundles for each place, from broker/templates and the PKI folder.

A bundle is a folder to copy to the broker host as it is (default /etc/mosquitto/ccus):
mosquitto.conf plus what it names: ca.crt, crl.pem, server.crt/.key, acl (and for a site
broker bridge.crt/.key). Include it from /etc/mosquitto/mosquitto.conf or start mosquitto
with `-c /etc/mosquitto/ccus/mosquitto.conf`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from broker.launcher import render
from ops.acl import render_acl
from ops.inventory import InventoryFile
from ops.pki import PkiError
from ops.provision import copy_secret

PLACES = ("dev", "site", "cloud")


def bundle(place: str, pki: str | Path, out: str | Path, *, site: str | None = None,
           cloud_address: str = "", listener: str = "8883",
           install_dir: str = "/etc/mosquitto/ccus", user: str = "mosquitto",
           data_dir: str = "/var/lib/mosquitto", log_dest: str = "syslog") -> Path:
    """Write the bundle for `place` into `out`; returns the mosquitto.conf path."""
    pki, out = Path(pki), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if place == "dev":
        # loopback and anonymous: for a laptop, never for a site or the cloud
        port = listener.split()[0]
        text = render("dev.conf", port=port, user=user, persistence="true", data_dir=data_dir,
                      log_file=f"{data_dir}/mosquitto.log")
        (out / "mosquitto.conf").write_text(text)
        return out / "mosquitto.conf"
    if place not in PLACES:
        raise PkiError(f"place: one of {', '.join(PLACES)}")
    inst = Path(install_dir)
    values: dict[str, object] = {
        "listener": listener, "user": user, "persistence": "true", "data_dir": data_dir,
        "log_dest": log_dest, "ca_file": inst / "ca.crt", "crl_file": inst / "crl.pem",
        "cert_file": inst / "server.crt", "key_file": inst / "server.key",
        "acl_file": inst / "acl"}
    shutil.copyfile(pki / "ca.crt", out / "ca.crt")
    shutil.copyfile(pki / "crl.pem", out / "crl.pem")
    inv = InventoryFile(pki).inventory()
    if place == "cloud":
        server = pki / "server"
        (out / "acl").write_text(render_acl(inv))
    else:
        if not site or not cloud_address:
            raise PkiError("a site bundle needs --site and --cloud HOST:PORT")
        server = pki / "sites" / site / "server"
        bridge = pki / "sites" / site / "bridge"
        if not (bridge / "bridge.crt").exists():
            raise PkiError(f"no bridge identity for site {site}: run `ccus ops site add` first")
        shutil.copyfile(bridge / "bridge.crt", out / "bridge.crt")
        copy_secret(bridge / "bridge.key", out / "bridge.key")
        values.update(site=site, cloud_address=cloud_address,
                      bridge_cert=inst / "bridge.crt", bridge_key=inst / "bridge.key")
        (out / "acl").write_text(render_acl(inv, site=site))
    if not (server / "server.crt").exists():
        raise PkiError(f"no server certificate in {server}: run `ccus ops server` "
                       "(or `ccus ops site add --broker-name`) first")
    shutil.copyfile(server / "server.crt", out / "server.crt")
    copy_secret(server / "server.key", out / "server.key")
    (out / "mosquitto.conf").write_text(render(f"{place}.conf", **values))
    return out / "mosquitto.conf"
