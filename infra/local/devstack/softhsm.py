"""SoftHSM2: the local stand-in for the HSM that holds CA keys (Key Vault / Managed HSM in Azure).

`ensure_token(state_dir)` gives a ready, logged-in-able token under the state dir:

- writes `state_dir/softhsm/softhsm2.conf` (tokens in `state_dir/softhsm/tokens`, file object
  store, log level ERROR) and points `SOFTHSM2_CONF` at it in THIS process's environment;
- initialises a token with the label asked for unless one already exists (the label is how the
  service finds it: SoftHSM gives every token a new random slot id);
- returns where libsofthsm2.so is, the label, the PIN and the config path.

SoftHSM reads SOFTHSM2_CONF when the PKCS#11 module is first initialised in a process (python-
pkcs11 does that once per module path per process). So call `ensure_token` BEFORE the first
`Pkcs11KeyStore`/`pkcs11.lib(...)` in the process, and use one state dir per process. Child
processes (the API under uvicorn, e2e tools) need `token.env()` in their environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devstack.proc import StandInError

_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

# The config the PKCS#11 module in this process was (or will be) initialised with.
_conf_in_process: Path | None = None


@dataclass(frozen=True)
class SoftHsmToken:
    module_path: str
    label: str
    pin: str
    conf_path: Path
    so_pin: str = ""

    def env(self) -> dict[str, str]:
        """What a child process needs in its environment to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}


def find_module() -> str:
    """Path of libsofthsm2.so, or StandInError if SoftHSM2 is not installed."""
    for cand in _MODULE_CANDIDATES:
        if os.path.isfile(cand):
            return cand
    try:
        out = subprocess.run(
            ["dpkg", "-L", "softhsm2", "libsofthsm2"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.endswith("/libsofthsm2.so") and os.path.isfile(line):
            return line
    raise StandInError("softhsm2 is not installed: apt-get install softhsm2")


def _module_loaded(module: str) -> bool:
    """Has this process already loaded (and so configured) the SoftHSM module?"""
    signing = sys.modules.get("functions.signing.pkcs11_module")
    return True if signing is None and "pkcs11" in sys.modules else bool(signing and signing.is_loaded(module))


def _util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise StandInError("softhsm2 is not installed: apt-get install softhsm2")
    return util


def _run(args: list[str], conf: Path) -> str:
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    try:
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise StandInError(f"{Path(args[0]).name} failed to run: {e}") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise StandInError(f"{' '.join(args[:2])} failed: {msg[-1] if msg else f'exit {res.returncode}'}")
    return res.stdout


def token_labels(conf: Path) -> list[str]:
    """Labels of the initialised tokens that the config `conf` holds."""
    out = _run([_util(), "--show-slots"], conf)
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Label:")]


def write_conf(state_dir: Path) -> Path:
    base = Path(state_dir).resolve() / "softhsm"
    tokens = base / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    os.chmod(tokens, 0o700)
    conf = base / "softhsm2.conf"
    text = (
        "# written by infra/local/devstack/softhsm.py\n"
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return conf


def ensure_token(
    state_dir: Path, label: str = "ezssh-dev", pin: str = "1234", so_pin: str = "5678"
) -> SoftHsmToken:
    """A SoftHSM token labelled `label` under `state_dir`, created on first use (idempotent)."""
    global _conf_in_process
    module = find_module()
    util = _util()
    conf = write_conf(Path(state_dir))

    if _conf_in_process is not None and _conf_in_process != conf and _module_loaded(module):
        # The PKCS#11 module is already initialised with the other config; it would never see
        # this token. Refuse loudly rather than fail later with "no token labelled ...".
        raise StandInError(
            f"SoftHSM is already configured in this process with {_conf_in_process}; "
            f"use one state dir per process (asked for {conf})"
        )

    if label not in token_labels(conf):
        _run([util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin], conf)
        if label not in token_labels(conf):
            raise StandInError(f"softhsm2-util did not create a token labelled {label!r}")

    os.environ["SOFTHSM2_CONF"] = str(conf)
    _conf_in_process = conf
    return SoftHsmToken(module_path=module, label=label, pin=pin, conf_path=conf, so_pin=so_pin)
