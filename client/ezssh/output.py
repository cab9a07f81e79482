"""What every command prints with: messages to stderr, data to stdout, times and tables. Stdlib only."""

from __future__ import annotations

import json
import sys
import time


def err(msg: str) -> None:
    """One message for people, on stderr, flushed at once."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def out_json(data: object) -> None:
    """Data for scripts, on stdout: stable key order."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def fmt_time(t: object, *, seconds: bool = True) -> str:
    """A UNIX time as `2026-01-31 12:00:00 UTC`; `-` for anything that is not a time."""
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC", time.gmtime(t))


def fmt_left(t: object, now: float | None = None) -> str:
    """Time left until `t`: `1h05m`, `4m09s`, `expired`."""
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "-"
    s = int(t - (time.time() if now is None else now))
    if s <= 0:
        return "expired"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_table(cols: tuple | list, rows) -> None:
    """Left-aligned columns separated by two spaces, header first, no trailing blanks."""
    rows = [tuple(str(v) for v in r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=False)]
    for row in (tuple(cols), *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


def group_label(gid: object, names: object = None) -> str:
    """A group as people know it: `web-admins (<object id>)` where a display name is known (a
    `group_names` map the service may send with a policy or request), else the object id."""
    name = names.get(gid) if isinstance(names, dict) else None
    return f"{name} ({gid})" if isinstance(name, str) and name and name != gid else str(gid)


def person_label(name: object, upn: object) -> str:
    """A person as the service names them: `Bob Brandt (bob@contoso.test)`, or whichever is known."""
    if name and upn and name != upn:
        return f"{name} ({upn})"
    return str(name or upn or "someone")
