"""The cached technician ID list: what a device decides against, offline.

Public surface: Status, Entry, IdList (the lookup protocol every implementation serves),
MemoryIdList (a small in-memory list), read_technicians_csv.
"""

from edge.idlist.base import Entry, IdList, MemoryIdList, Status, read_technicians_csv

__all__ = ["Entry", "IdList", "MemoryIdList", "Status", "read_technicians_csv"]
