"""The error bases of edge/: one root for the package, one per family under it.

`except EdgeError` catches anything the device side raises on purpose; `except ListError`
anything from the ID list (format, delta, merge, manifest). The concrete classes live beside
the code that raises them and keep their older bases (ValueError ...) so no caller breaks.
Imports nothing.
"""


class EdgeError(Exception):
    """Anything edge/ raises on purpose (config, board, ID list, reader, signatures)."""


class ListError(EdgeError):
    """Anything from the ID list: ListFormatError, DeltaError, MergeConflict, ManifestError."""


class ReaderError(EdgeError):
    """A reader or card that stopped answering (PcscDown, LinkLost)."""
