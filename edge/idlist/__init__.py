"""The cached technician ID list: what a device decides against, offline.

Public surface: Status, Entry, IdList (the lookup protocol every implementation serves),
MemoryIdList (a small in-memory list), read_technicians_csv; the mapped v1 file format
(MmapIdList, open_list, build_list, ListFormatError); deltas; ListError, the base of every
error the list raises (`except ListError` catches anything from the ID list); the device-side
ListUpdater and its Outcome/UpdateReason; topics and messages for distribution
(edge.idlist.dist) and the paho adapter (ops.mqttc).

Rule of this file: it imports nothing eagerly. The names are resolved on first use (PEP 562),
so `import edge.idlist.base` (the decision core's one need) does not pull in the codec, the
updater or `cryptography`.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it (in edge.idlist, or a full name)
_WHERE = {
    "ListError": "edge.errors",
    "Entry": "base", "IdList": "base", "MemoryIdList": "base", "Status": "base",
    "read_technicians_csv": "base",
    "ListFormatError": "codec", "MmapIdList": "codec", "build_list": "codec", "load_list": "codec",
    "open_list": "codec",
    "Delta": "delta", "DeltaError": "delta", "apply_delta": "delta", "diff": "delta",
    "ListUpdater": "updater", "Outcome": "updater", "UpdateReason": "updater",
}

__all__ = [
    "Delta", "DeltaError", "Entry", "IdList", "ListError", "ListFormatError", "ListUpdater",
    "MemoryIdList", "MmapIdList", "Outcome", "Status", "UpdateReason", "apply_delta", "build_list", "diff",
    "load_list", "open_list", "read_technicians_csv",
]

if TYPE_CHECKING:  # for type checkers and readers: the same names, eagerly
    from edge.errors import ListError
    from edge.idlist.base import Entry, IdList, MemoryIdList, Status, read_technicians_csv
    from edge.idlist.codec import ListFormatError, MmapIdList, build_list, load_list, open_list
    from edge.idlist.delta import Delta, DeltaError, apply_delta, diff
    from edge.idlist.updater import ListUpdater, Outcome, UpdateReason


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'edge.idlist' has no attribute {name!r}")
    module = where if "." in where else f"edge.idlist.{where}"
    value = getattr(import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
