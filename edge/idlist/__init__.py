"""The cached technician ID list: what a device decides against, offline.

Public surface: Status, Entry, IdList (the lookup protocol every implementation serves),
MemoryIdList (a small in-memory list), read_technicians_csv; the mapped v1 file format
(MmapIdList, open_list, build_list, ListFormatError); deltas; the device-side ListUpdater
and its Outcome/UpdateReason; topics and messages for distribution (edge.idlist.dist) and the
paho adapter (ops.mqttc).
"""

from edge.idlist.base import Entry, IdList, MemoryIdList, Status, read_technicians_csv
from edge.idlist.codec import ListFormatError, MmapIdList, build_list, load_list, open_list
from edge.idlist.delta import Delta, DeltaError, apply_delta, diff
from edge.idlist.updater import ListUpdater, Outcome, UpdateReason

__all__ = [
    "Delta", "DeltaError", "Entry", "IdList", "ListFormatError", "ListUpdater", "MemoryIdList",
    "MmapIdList", "Outcome", "Status", "UpdateReason", "apply_delta", "build_list", "diff",
    "load_list", "open_list", "read_technicians_csv",
]
