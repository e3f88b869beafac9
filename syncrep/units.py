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


#: The decimal suffixes and the binary one a person usually means by them.
_DECIMAL_TO_BINARY = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}


def parse_volume_size(text: str) -> int:
    """A volume's size (``volume create --size``, ``volume resize --size``):
    like :func:`parse_size`, but a decimal suffix (KB, MB, GB, TB: powers of
    1000) is refused with a hint, because ``10GB`` usually means ``10GiB``
    (issue 13). Refusing is the safer choice: a volume made 7% smaller than
    meant cannot be shrunk back and regrown without a new volume, and a decimal
    size is rarely a multiple of the block size anyway. Whoever really wants
    the decimal size passes it in bytes (``10000000000``)."""
    n = parse_size(text)
    m = _RE.match(str(text))
    assert m is not None  # parse_size accepted it
    number, suffix = m.group(1), m.group(2).lower()
    if suffix in _DECIMAL_TO_BINARY:
        binary = _DECIMAL_TO_BINARY[suffix]
        raise ValueError(
            f"size {text!r} uses a decimal unit ({m.group(2)} = 1000^{list(_DECIMAL_TO_BINARY).index(suffix) + 1} "
            f"bytes: {n} bytes); you probably mean {number}{binary} ({int(number) * _SUFFIX[binary.lower()]} bytes). "
            f"Pass {number}{binary}, or the exact number of bytes ({n}) if you really mean the decimal size"
        )
    return n
