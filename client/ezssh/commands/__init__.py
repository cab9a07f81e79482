"""One module per noun; each has `register(subparsers, formatter)` adding its own commands.

`COMMANDS` maps every top-level command to its module, so `ezssh <command>` imports and builds the
parser of that one module only (and `ezssh ssh` none at all).
"""

from __future__ import annotations

COMMANDS = {
    "configure": "account",
    "login": "account",
    "logout": "account",
    "whoami": "account",
    "ssh": "ssh",
    "config": "config",
    "requests": "requests",
    "policy": "policy",
    "certs": "certs",
    "cert": "certs",
    "revoke": "certs",
    "hosts": "hosts",
    "audit": "audit",
    "ls": "ls",
    "doctor": "doctor",
    "completion": "completion",
}
