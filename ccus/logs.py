"""Log output for every `ccus` command: plain text, journald, or JSON Lines.

Rules:
- `journal`: under systemd (`JOURNAL_STREAM` names our stderr) the journal stamps the time and
  the unit itself, so a line carries no timestamp of ours, only an sd-daemon priority prefix
  `<N>` (syslog levels: 3 error, 4 warning, 6 info, 7 debug) on EVERY line, traceback lines
  included, so `journalctl -p warning -u ccus-agent` shows exactly the problems.
  What is written to stderr outside logging (a command's one-line error, an uncaught
  traceback) goes through `PriorityStream` and carries `<3>` (error) on every line too.
- `json`: one object per line (ts, level, priority, logger, msg, and exc when there is one), for
  log shippers.
- `text`: a timestamped line, for a terminal.
- `auto` (the default) picks `journal` when stderr is the journal stream, else `text`.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

FORMATS = ("auto", "text", "journal", "json")

# logging level -> syslog priority (sd-daemon(3): <3> error ... <7> debug)
PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    for floor, prio in PRIORITY:
        if levelno >= floor:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, the prefix repeated on every line of a multi-line record."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def under_journal(stream: TextIO, env: Mapping[str, str] = os.environ) -> bool:
    """True when `stream` is the journal stream systemd connected (JOURNAL_STREAM=dev:inode).

    Checking the device and inode, as sd-daemon advises, keeps a child whose stderr was
    redirected to a file from writing `<N>` prefixes into that file.
    """
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class PriorityStream(io.TextIOBase):
    """A text stream that puts `<prio>` before every line written to it (sd-daemon style)."""

    def __init__(self, raw: TextIO, prio: int = 3) -> None:
        self.raw, self.prefix, self._mid_line = raw, f"<{prio}>", False

    def write(self, s: str) -> int:
        out = []
        for part in s.splitlines(keepends=True):
            if not self._mid_line:
                out.append(self.prefix)
            out.append(part)
            self._mid_line = not part.endswith("\n")
        self.raw.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True


def resolve(fmt: str, stream: TextIO) -> str:
    if fmt == "auto":
        return "journal" if under_journal(stream) else "text"
    return fmt


def formatter(fmt: str, stream: TextIO) -> logging.Formatter:
    fmt = resolve(fmt, stream)
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def setup_logging(level: int, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record at `level` and above to `stream` (stderr) in format `fmt`.

    As `logging.basicConfig`: when the root logger already has handlers that are not ours (a
    test harness calling `ccus.cli.main()` in-process), logging is left as it is.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "ccus_handler", False)]
    if root.handlers and not ours:
        return
    for h in ours:
        root.removeHandler(h)
    stream = stream or sys.stderr
    if isinstance(stream, PriorityStream):
        stream = stream.raw  # set up twice in one process: log to the raw stream again
    if resolve(fmt, stream) == "journal" and stream is sys.stderr:
        # everything else written to stderr is an error line (print(..., file=sys.stderr),
        # tracebacks): `<3>` on each, so none of them hides below `journalctl -p warning`
        sys.stderr = PriorityStream(stream)  # type: ignore[assignment]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt, stream))
    handler.ccus_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
