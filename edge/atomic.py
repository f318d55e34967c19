"""`write_atomic()`: the one way this project replaces a file (config state, ID lists, PKI files,
the operator's inventory, ACLs).

Rules: the data goes to a temp file in the SAME folder (a rename is atomic only within one file
system), created with its final mode (a private key is never readable by others, not even for
a moment), fsync'ed, renamed over the target, and the folder fsync'ed so the rename itself
survives a power cut. A reader sees the old file or the new one, never a part. Imports nothing
of ours: edge/ and ops/ both use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) all or nothing; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    # pid in the name: two processes replacing the same file never share a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask (systemd units set 0077)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> Path:
    """Create `path` with `data`, never replacing a file that exists (FileExistsError): a new
    private key. Created with `mode` (0600: not readable by others for a moment), fsync'ed,
    and its folder fsync'ed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path
