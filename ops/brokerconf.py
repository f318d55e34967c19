"""Broker configuration bundles for each place, from broker/templates and the PKI folder.

A bundle is a folder to copy to the broker host as it is (default /etc/mosquitto/ccus):
mosquitto.conf plus what it names: ca.crt, crl.pem, server.crt/.key, acl (a cloud broker
also dynamic-security.json, a site broker bridge.crt/.key). Start mosquitto with
`-c /etc/mosquitto/ccus/mosquitto.conf`, or, with `stock_include=True`, include it from
Debian's stock /etc/mosquitto/mosquitto.conf (a symlink in /etc/mosquitto/conf.d/ccus.conf):
the stock file already sets persistence_location and log_dest, which Mosquitto refuses twice.

Nothing host-specific is hard-coded: user, data folder and log destination are options with
the defaults of Debian's package (HostOpts), so a private broker needs no hand edits.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from broker.launcher import Limits, find_dynsec_plugin, host_settings, render
from ops.acl import render_acl, render_dynsec
from ops.inventory import InventoryFile
from ops.pki import PkiError
from ops.provision import copy_secret

PLACES = ("dev", "site", "cloud")
# what a site broker bridges to: Mosquitto's cloud broker (site.conf) or the NATS cluster's MQTT
# gateway (site-nats.conf: MQTT 3.1.1 without the bridge flag, every node, the watchdog's state)
CLOUD_KINDS = ("mosquitto", "nats")
DYNSEC_FILE = "dynamic-security.json"


@dataclass(frozen=True)
class HostOpts:
    """Where the broker runs. Defaults: Debian's mosquitto package."""
    user: str = "mosquitto"                 # '' = no `user` line (Mosquitto's own default)
    data_dir: str = "/var/lib/mosquitto"    # persistence_location
    log_dest: str = "syslog"                # any Mosquitto log_dest value, e.g. 'file /x.log'
    stock_include: bool = False             # included from Debian's stock mosquitto.conf
    dynsec_plugin: str = ""                 # '' = look for it on this machine
    limits: Limits = field(default_factory=Limits)

    def settings(self) -> str:
        if self.stock_include:  # the stock file sets persistence_location and log_dest
            return host_settings(self.user)
        return host_settings(self.user, self.data_dir, self.log_dest)


def bundle(place: str, pki: str | Path, out: str | Path, *, site: str | None = None,
           cloud_address: str = "", cloud_kind: str = "mosquitto", listener: str = "8883",
           install_dir: str | Path = "/etc/mosquitto/ccus", host: HostOpts | None = None,
           user: str | None = None, data_dir: str | Path | None = None,
           log_dest: str | None = None) -> Path:
    """Write the bundle for `place` into `out`; returns the mosquitto.conf path.

    `user`, `data_dir`, `log_dest` (the keywords of before HostOpts) override `host`."""
    pki, out, host = Path(pki), Path(out), host or HostOpts()
    given = {"user": user, "data_dir": None if data_dir is None else str(data_dir),
             "log_dest": log_dest}
    host = dataclasses.replace(host, **{k: v for k, v in given.items() if v is not None})
    out.mkdir(parents=True, exist_ok=True)
    if place == "dev":
        # loopback and anonymous: for a laptop, never for a site or the cloud
        port = listener.split()[0]
        text = render("dev.conf", port=port, user=host.user, persistence="true",
                      data_dir=host.data_dir, log_file=f"{host.data_dir}/mosquitto.log")
        (out / "mosquitto.conf").write_text(text)
        return out / "mosquitto.conf"
    if place not in PLACES:
        raise PkiError(f"place: one of {', '.join(PLACES)}")
    inst = Path(install_dir)
    values: dict[str, object] = {
        "listener": listener, "persistence": "true", "host_settings": host.settings(),
        "limits": host.limits.render(), "ca_file": inst / "ca.crt", "crl_file": inst / "crl.pem",
        "cert_file": inst / "server.crt", "key_file": inst / "server.key",
        "acl_file": inst / "acl"}
    shutil.copyfile(pki / "ca.crt", out / "ca.crt")
    shutil.copyfile(pki / "crl.pem", out / "crl.pem")
    inv = InventoryFile(pki).inventory()
    if place == "cloud":
        server = pki / "server"
        (out / "acl").write_text(render_acl(inv))
        (out / DYNSEC_FILE).write_text(render_dynsec(inv))
        values.update(dynsec_plugin=host.dynsec_plugin or find_dynsec_plugin(),
                      dynsec_file=inst / DYNSEC_FILE)
    else:
        if not site or not cloud_address:
            raise PkiError("a site bundle needs --site and --cloud HOST:PORT")
        if cloud_kind not in CLOUD_KINDS:
            raise PkiError(f"--cloud-kind: one of {', '.join(CLOUD_KINDS)}")
        server = pki / "sites" / site / "server"
        bridge = pki / "sites" / site / "bridge"
        if not (bridge / "bridge.crt").exists():
            raise PkiError(f"no bridge identity for site {site}: run `ccus ops site add` first")
        shutil.copyfile(bridge / "bridge.crt", out / "bridge.crt")
        copy_secret(bridge / "bridge.key", out / "bridge.key")
        values.update(site=site, cloud_address=cloud_address,
                      cloud_addresses=" ".join(cloud_address.replace(",", " ").split()),
                      bridge_cert=inst / "bridge.crt", bridge_key=inst / "bridge.key")
        # the site-local rights of the bridge identity: the watchdog's and keeper's (a NATS
        # cloud), which run with the bridge certificate on the site broker's machine
        (out / "acl").write_text(render_acl(inv, site=site))
    if not (server / "server.crt").exists():
        raise PkiError(f"no server certificate in {server}: run `ccus ops server` "
                       "(or `ccus ops site add --broker-name`) first")
    shutil.copyfile(server / "server.crt", out / "server.crt")
    copy_secret(server / "server.key", out / "server.key")
    template = "site-nats.conf" if place == "site" and cloud_kind == "nats" else f"{place}.conf"
    (out / "mosquitto.conf").write_text(render(template, **values))
    return out / "mosquitto.conf"
