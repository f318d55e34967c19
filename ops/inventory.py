"""The operator's inventory (pki/inventory.json): devices, their sites and certificate serials.

It is what ACLs are generated from; a device removed here loses every right at the next ACL
reload even before its certificate is revoked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge.atomic import write_atomic
from ops.acl import Inventory


class InventoryFile:
    def __init__(self, pki_dir: str | Path) -> None:
        self.path = Path(pki_dir) / "inventory.json"
        self.data: dict[str, Any] = {"devices": {}, "operators": {}, "sinks": {}, "bridges": {},
                                     "consoles": {}}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text()))

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n", mode=0o600)

    def add_device(self, site: str, dev: str, serial: int) -> None:
        entry = self.data["devices"].get(dev)
        if entry and entry["site"] != site:
            raise ValueError(f"device id {dev!r} already belongs to site {entry['site']}: "
                             "device ids are unique across the fleet")
        entry = entry or {"site": site, "serials": []}
        entry["serials"].append(f"{serial:x}")
        self.data["devices"][dev] = entry

    def remove_device(self, dev: str) -> dict[str, Any]:
        try:
            return dict(self.data["devices"].pop(dev))
        except KeyError:
            raise ValueError(f"no device {dev!r} in {self.path}") from None

    def device(self, dev: str) -> dict[str, Any] | None:
        entry = self.data["devices"].get(dev)
        return dict(entry) if entry else None

    def add_identity(self, kind: str, name: str, serial: int) -> None:
        group = self.data[kind + "s"]
        group.setdefault(name, {"serials": []})["serials"].append(f"{serial:x}")

    def inventory(self) -> Inventory:
        return Inventory(
            devices=[(e["site"], dev) for dev, e in self.data["devices"].items()],
            operators=list(self.data["operators"]), sinks=list(self.data["sinks"]),
            bridges=list(self.data["bridges"]), consoles=list(self.data["consoles"]))
