"""Durations as people write them: `90s`, `30m`, `8h`, `1d`, `1h30m`, or plain seconds. Stdlib only."""

from __future__ import annotations

import re
from typing import Any

_PART = re.compile(r"(\d+)([dhms]?)")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}
HELP = "a duration: 90s, 30m, 8h, 1d, 1h30m, or seconds"


def parse_duration(text: str | int) -> int:
    """Seconds from `3600`, `90s`, `30m`, `8h`, `1d` or a combination such as `1h30m`."""
    if isinstance(text, bool):
        raise ValueError("a duration is not true/false")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"duration {text} must be positive")
        return text
    s = str(text).strip().lower()
    pos, total = 0, 0
    units: list[str] = []
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        pos = m.end()
        if m.group(2) in units or (not m.group(2) and units):
            raise ValueError(f"{text!r} is not a duration")
        units.append(m.group(2))
        total += int(m.group(1)) * _UNIT[m.group(2)]
    if not s or pos != len(s) or ("" in units and len(units) > 1):
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 30m, 8h, 1h30m, 1d (or seconds)")
    if total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return total


def duration_arg(text: str) -> int:
    """argparse `type=` for a duration option."""
    import argparse

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fmt_duration(seconds: Any) -> str:
    """`1h30m` for 5400; anything that is not a positive number of seconds as it is."""
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
        return str(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out
