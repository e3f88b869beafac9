"""Log line formats for every process and command (``--log-format text|json``).

* ``text`` (the default): ``2026-12-02T03:58:00.123+00:00 INFO primary[4242]
  syncrep.node: message``: ISO 8601 with the UTC offset of the host's time
  zone, so lines from hosts in different zones sort and compare.
* ``json``: one JSON object per line with ``ts`` (as above), ``level``,
  ``role``, ``pid``, ``logger``, ``msg``, an ``exc`` text when an exception
  is logged, and the structured fields ``volume``, ``epoch``, ``seq_first`` /
  ``seq_last`` -- taken from the record when the call passed them
  (``log.info(..., extra={"volume": v, "epoch": e})``), else read from the
  message text the way syncrep writes it ("volume NAME", "epoch N",
  "seq A..B"), so existing log calls get the fields too.

Pure standard library: the formatters are installed by ``syncrep.cli``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any, Final

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "iso_time"]

FORMATS: Final = ("text", "json")

_VOLUME_RE: Final = re.compile(r"\bvolume '?([A-Za-z0-9][A-Za-z0-9_.-]{0,63})'?")
_EPOCH_RE: Final = re.compile(r"\bepoch (\d+)")
_SEQ_RE: Final = re.compile(r"\bseqs? (\d+)(?:\s*(?:\.\.|-|to)\s*(\d+))?")


def iso_time(created: float) -> str:
    """``created`` (a record's unix time) as local ISO 8601 with milliseconds and the UTC offset."""
    t = dt.datetime.fromtimestamp(created).astimezone()
    return t.isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL role[pid] logger: message`` with a time-zone-aware time."""

    def __init__(self, role: str) -> None:
        super().__init__(f"%(levelname)s {role}[%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"{iso_time(record.created)} {super().format(record)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        doc: dict[str, Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname,
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "msg": msg,
        }
        fields = _fields(record, msg)
        doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def _fields(record: logging.LogRecord, msg: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("volume", "epoch", "seq_first", "seq_last"):
        v = getattr(record, key, None)
        if v is not None:
            out[key] = v
    if "volume" not in out and (m := _VOLUME_RE.search(msg)):
        out["volume"] = m.group(1)
    if "epoch" not in out and (m := _EPOCH_RE.search(msg)):
        out["epoch"] = int(m.group(1))
    if "seq_first" not in out and (m := _SEQ_RE.search(msg)):
        out["seq_first"] = int(m.group(1))
        out["seq_last"] = int(m.group(2) or m.group(1))
    return out
