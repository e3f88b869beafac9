"""Human-friendly sizes and durations for the command line."""

from __future__ import annotations

import re

_SUFFIX = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``64MiB``, ``1GiB``, ``4096``, ``1g`` into bytes.

    Raises ValueError naming the bad text and the accepted forms.
    """
    m = _RE.match(str(text))
    if not m or m.group(2).lower() not in _SUFFIX:
        raise ValueError(
            f"invalid size {text!r}: expected a whole number with an optional suffix "
            "(B, KiB, MiB, GiB, TiB, or KB/MB/GB/TB for powers of 1000), e.g. 64MiB"
        )
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable
