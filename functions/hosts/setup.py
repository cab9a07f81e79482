"""Render the host setup script: a POSIX sh script that makes a host's sshd trust one policy's CA.

`render_setup_script(HostSetup(...))` returns the script text. The same text is served by
`GET /api/policies/{id}/host-setup`, printed by `ezssh policy host-setup ID`, and is what a push to an
Azure VM runs (RunShellScript). The script body lives in setup.sh next to this file; the helper it
installs on the host (fetch and combine KRLs) in krl_update.sh. Only the values below are rendered
into it, each checked so that nothing from a policy can break out of its shell quoting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.ids import is_guid
from ..core.krl import MAGIC
from ..core.policy import POLICY_ID_RE

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "setup.sh"
HELPER = HERE / "krl_update.sh"
HOST_CERT_HELPER = HERE / "hostcert.sh"

URL_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(?::[0-9]+)?(?:/[A-Za-z0-9._~\-/]*)?$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
HOST_CERT_LINE_RE = re.compile(
    r"^(?:# renew-after [0-9]{1,12}|[a-z0-9@.-]{3,64}-cert-v01@openssh\.com "
    r"[A-Za-z0-9+/]+={0,2} ezssh-host/[a-z0-9-]{1,63}/[a-z0-9.:-]{1,253})$"
)
CA_LINE_RE = re.compile(r"^[a-z0-9@.-]{3,64} [A-Za-z0-9+/]+={0,2}(?: [\x21-\x26\x28-\x7e ]{0,200})?$")


class RenderError(ValueError):
    """A value that must not go into a shell script (it would not survive quoting, or is empty)."""


@dataclass(frozen=True)
class HostSetup:
    api_url: str  # where hosts fetch the KRL, e.g. https://ezssh.example.net (no trailing /api)
    tenant_id: str
    policy_id: str
    ca_public_keys: tuple[str, ...]  # OpenSSH lines: current and, during a rotation, previous
    host_token: str  # the policy's capability for unauthenticated KRL fetches
    krl: bytes  # the policy's current KRL, embedded so a first run needs no network
    host_certs: str = ""  # host certificates for this host's keys (Azure VMs): "# renew-after N" + cert lines


def _check(s: HostSetup) -> None:
    if not URL_RE.match(s.api_url.rstrip("/")):
        raise RenderError(f"API URL {s.api_url!r} cannot go into the setup script.")
    if not is_guid(s.tenant_id):
        raise RenderError("The tenant id must be a GUID.")
    if not POLICY_ID_RE.match(s.policy_id):
        raise RenderError(f"Policy id {s.policy_id!r} is not valid.")
    if not TOKEN_RE.match(s.host_token):
        raise RenderError("The host token is malformed.")
    if not s.ca_public_keys:
        raise RenderError(f"Policy {s.policy_id!r} has no CA key to trust.")
    for line in s.ca_public_keys:
        if not CA_LINE_RE.match(line.strip()):
            raise RenderError("A CA public key line is malformed.")
    if not s.krl.startswith(MAGIC):
        raise RenderError("The KRL is not an OpenSSH KRL.")
    for line in s.host_certs.splitlines():
        if not HOST_CERT_LINE_RE.match(line):
            raise RenderError("A host certificate line is malformed.")


def _printf_lines(data: bytes, per_line: int = 48) -> str:
    """Shell lines that write `data` byte for byte with POSIX printf octal escapes."""
    out = []
    for i in range(0, len(data), per_line):
        chunk = "".join(f"\\{b:03o}" for b in data[i : i + per_line])
        out.append(f"    printf '{chunk}'")
    return "\n".join(out)


def rendered_values(s: HostSetup) -> str:
    _check(s)
    helper = HELPER.read_text()
    keys = "\n".join(line.strip() for line in s.ca_public_keys)
    return "\n".join(
        [
            f"EZSSH_API='{s.api_url.rstrip('/')}'",
            f"EZSSH_TENANT='{s.tenant_id.lower()}'",
            f"EZSSH_POLICY='{s.policy_id}'",
            f"EZSSH_HOST_TOKEN='{s.host_token}'",
            "write_ca_keys() {",
            "    cat <<'EZSSH_CA_KEYS'",
            keys,
            "EZSSH_CA_KEYS",
            "}",
            f"write_krl() {{ # {len(s.krl)} bytes",
            _printf_lines(s.krl),
            "}",
            "write_krl_update_helper() {",
            "    cat <<'EZSSH_KRL_UPDATE'",
            helper.rstrip("\n"),
            "EZSSH_KRL_UPDATE",
            "}",
            "write_host_cert_helper() {",
            "    cat <<'EZSSH_HOST_CERT'",
            HOST_CERT_HELPER.read_text().rstrip("\n"),
            "EZSSH_HOST_CERT",
            "}",
            "write_host_certs() {",
            "    cat <<'EZSSH_HOST_CERTS'",
            *s.host_certs.splitlines(),
            "EZSSH_HOST_CERTS",
            "}",
        ]
    )


def render_setup_script(s: HostSetup) -> str:
    """The whole setup script for one policy (text; run it with `sh` as root)."""
    return TEMPLATE.read_text().replace("@@RENDERED@@", rendered_values(s), 1)
