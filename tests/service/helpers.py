"""The world of the fast service tests: a tenant and its people, policy documents, a movable clock,
and OpenSSH's ssh-keygen as the independent reader of certificates and KRLs."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from functions.core.policy import ADMIN_ROLE, Identity
from tests.realparts import unavailable

TENANT = str(uuid.UUID(int=0xC0))
OTHER_TENANT = str(uuid.UUID(int=0xFA))
# where the tenant's hosts live (EZSSH_HOST_NAMESPACES), as the service tests' settings declare it
HOST_NAMESPACES = ((TENANT, ("*.contoso.test", "10.0.0.0/8")),)
# group object ids of this tenant (GUIDs, as Entra ID writes them; policies match nothing else)
USERS, APPROVERS, ADMINS = (str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{g}.groups")) for g in ("users", "approvers", "admins"))
T0 = 1_780_000_000.0


class Clock:
    """The service's clock. Tests move it on; each reading also moves it by `step` (1 ms unless told),
    as a real clock moves between two readings."""

    def __init__(self, now: float = T0, step: float = 0.001) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def person(name: str, *groups: str, tid: str = TENANT, admin: bool = False) -> Identity:
    """A member of the tenant whose UPN is in its verified domain contoso.test (so {username} is `name`)."""
    return Identity(oid=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.{tid}")), tid=tid, upn=f"{name}@contoso.test",
                    name=name.title(), groups=frozenset(groups), roles=frozenset({ADMIN_ROLE} if admin else ()),
                    domain_verified=True)


ALICE = person("alice", USERS)  # a member
BOB = person("bob", USERS, APPROVERS)  # a member who approves
DAVE = person("dave", APPROVERS)  # approves
PAT = person("pat", ADMINS)  # a policy admin, not a tenant admin
CAROL = person("carol", admin=True)  # tenant admin
ERIN = person("erin", USERS, APPROVERS, ADMINS, tid=OTHER_TENANT, admin=True)  # same group names, other tenant


def policy_doc(pid: str, action: str = "auto", **kw: object) -> dict:
    doc: dict = {
        "id": pid,
        "rules": [{"users": [ALICE.oid], "action": action}, {"groups": [USERS], "action": action}],
        "hosts": ["web*", "10.0.0.0/8"],
        "principals": ["{username}", "deploy"],
        "approvers": {"groups": [APPROVERS]},
        "admins": {"groups": [ADMINS]},
        "default_ttl": 3600,
        "max_ttl": 8 * 3600,
    }
    doc.update(kw)
    return doc


def ssh_keygen(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=10, check=check)
    except FileNotFoundError:
        unavailable("ssh-keygen is not installed")  # fails under CI=true, skips elsewhere
        raise


def cert_fields(cert: str, tmp: Path) -> str:
    """`ssh-keygen -L` of a certificate: OpenSSH's own reading (it also checks the CA signature)."""
    f = tmp / f"c{uuid.uuid4().hex[:8]}-cert.pub"
    f.write_text(cert + "\n")
    return ssh_keygen("-L", "-f", str(f)).stdout


def host_key_file(tmp: Path) -> Path:
    """A host's private ed25519 key in OpenSSH format (its public key beside it, as .pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    f = tmp / f"ssh_host_{uuid.uuid4().hex[:8]}_key"
    f.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()))
    f.chmod(0o600)
    f.with_suffix(".pub").write_text(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + "\n")
    return f


def pub_of(key_file: Path) -> str:
    return " ".join(key_file.with_suffix(".pub").read_text().split()[:2])
