"""Log formats (issue 13): time-zone-aware timestamps, and JSON lines with volume/epoch/seq fields."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path

from syncrep import logfmt

REPO = Path(__file__).resolve().parent.parent


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("syncrep.node", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_text_lines_carry_the_utc_offset() -> None:
    line = logfmt.TextFormatter("primary").format(_record("volume %s degraded", "vol0"))
    ts, rest = line.split(" ", 1)
    parsed = dt.datetime.fromisoformat(ts)
    assert parsed.tzinfo is not None and parsed.utcoffset() is not None, ts
    assert rest.startswith("WARNING primary[") and rest.endswith("syncrep.node: volume vol0 degraded")


def test_json_lines_have_the_fields_from_the_record_or_the_message() -> None:
    f = logfmt.JsonFormatter("secondary")
    doc = json.loads(f.format(_record("volume %s demoted to secondary at epoch %d; seq 10..42 acked", "db1", 7)))
    assert doc["volume"] == "db1" and doc["epoch"] == 7 and (doc["seq_first"], doc["seq_last"]) == (10, 42)
    assert doc["role"] == "secondary" and doc["level"] == "WARNING" and doc["logger"] == "syncrep.node"
    assert dt.datetime.fromisoformat(doc["ts"]).tzinfo is not None
    # Fields passed by the call win over the text.
    doc = json.loads(f.format(_record("volume other at epoch 1", volume="vol9", epoch=3)))
    assert (doc["volume"], doc["epoch"]) == ("vol9", 3)
    # An exception is one field, the line stays one line.
    try:
        raise ValueError("boom")
    except ValueError:
        r = _record("failed")
        r.exc_info = sys.exc_info()
    line = f.format(r)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def test_log_format_flag_on_a_real_command() -> None:
    r = subprocess.run([sys.executable, "-m", "syncrep", "--log-level", "DEBUG", "status", "--coordinator",
                        "127.0.0.1:1", "--insecure", "--log-format", "json"],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO))
    docs = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    assert docs and all(d["role"] == "client" for d in docs), r.stderr
    assert r.stderr.splitlines()[-1].startswith("syncrep: error: cannot reach coordinator")
