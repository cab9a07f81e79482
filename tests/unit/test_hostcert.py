"""functions.core.hostcert: host keys and names, the host certificate builder and its final check,
SSHSIG proof of possession, names inside the tenant's host namespaces, and the known_hosts lines that
trust a host CA for exactly those names. What is expected is read back with ssh-keygen
(-L for certificates, -Y sign for signatures), not from the code under test."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import ssh

from functions.core.serials import new_serial
from functions.core.errors import IntegrityError, InvalidPublicKey, InvalidRequest, WeakPublicKey
from functions.core.hostcert import (
    RENEW_NAMESPACE,
    HostGrant,
    HostNameRefused,
    ProofRefused,
    build_host_certificate,
    check_host_names,
    kept_host_names,
    parse_host_key,
    verify_host_issued,
    verify_sshsig,
)
from functions.core.namespaces import NOT_AN_ADDRESS, parse_namespace, parse_namespaces, trust_scope
from functions.core.policydoc import policy_from_document
from functions.publicsuffix import is_public_suffix

from tests.realparts import needs_tool

needs_ssh_keygen = needs_tool("ssh-keygen")
NOW = 1_780_000_000


def pub_line(key) -> str:  # type: ignore[no-untyped-def]
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def policy(hosts=("*.example.com", "10.1.0.0/16", "web1")):  # type: ignore[no-untyped-def]
    return policy_from_document({"id": "web", "rules": [{"users": ["*"], "action": "auto"}], "hosts": list(hosts),
                                 "principals": ["alice"]}, tenant_id="t1")


# the tenant's namespaces: all of example.com but one of its subdomains' siblings, and two ranges
NS = parse_namespaces(["*.example.com", "web1", "10.1.0.0/16", "10.9.0.0/16"], is_public_suffix)


def names_ok(names, pol=None, ns=NS):  # type: ignore[no-untyped-def]
    return check_host_names(pol or policy(), names, ns, is_public_suffix)


def grant(names=("web1.example.com", "10.1.2.3"), ttl=30 * 86400) -> HostGrant:  # type: ignore[no-untyped-def]
    return HostGrant("t1", "web", tuple(names), ttl, "token:abc")


CA = ec.generate_private_key(ec.SECP256R1())


# ---- keys -----------------------------------------------------------------------------------


def test_host_key_types() -> None:
    for key in (ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP384R1()),
                rsa.generate_private_key(65537, 3072)):
        assert parse_host_key(pub_line(key)).openssh.split()[1] == pub_line(key).split()[1]
    with pytest.raises(WeakPublicKey, match="3072"):
        parse_host_key(pub_line(rsa.generate_private_key(65537, 2048)))


def test_a_certificate_is_no_host_key() -> None:
    user = ed25519.Ed25519PrivateKey.generate()
    cert = (ssh.SSHCertificateBuilder().public_key(user.public_key()).serial(1).type(ssh.SSHCertificateType.USER)
            .key_id(b"u").valid_principals([b"alice"]).valid_after(0).valid_before(2**40).sign(CA))
    with pytest.raises(InvalidPublicKey, match="certificate"):
        parse_host_key(cert.public_bytes().decode())
    with pytest.raises(InvalidPublicKey):
        parse_host_key("ssh-dss AAAAB3NzaC1kc3MAAACBAP")


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["*.example.com"], ["web?.example.com"], ["a.example.com,b.example.com"],
                                   [""], [], ["web[1].example.com"], ["bad name"]])
def test_wildcards_empty_and_junk_names_are_refused(names) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HostNameRefused):
        names_ok(names)


def test_names_must_be_inside_the_namespaces_and_the_policy_patterns() -> None:
    assert names_ok(["WEB1.example.com.", "10.1.2.3", "web1"]) == ("web1.example.com", "10.1.2.3", "web1")
    for outside in ("web1.example.org", "10.2.0.1", "example.com", "web2"):
        with pytest.raises(HostNameRefused, match="outside"):
            names_ok(["web1.example.com", outside])
    # a policy admin widens the policy to everything: the namespaces still bound what a CA names
    wide = policy(hosts=("*", "0.0.0.0/0"))
    assert names_ok(["db.example.com", "10.9.0.7"], wide) == ("db.example.com", "10.9.0.7")
    for outside in ("github.com", "web2", "8.8.8.8", "com"):
        with pytest.raises(HostNameRefused):
            names_ok([outside], wide)
    # no namespaces declared: no host certificate at all
    with pytest.raises(HostNameRefused, match="no host namespaces"):
        names_ok(["web1.example.com"], ns=())


def test_names_a_host_did_not_choose_keep_what_fits_and_say_what_was_dropped() -> None:
    kept, dropped = kept_host_names(policy(), ["vm7.example.com", "github.com", "vm7", "10.1.0.4", "20.1.1.1"],
                                    NS, is_public_suffix)
    assert kept == ("vm7.example.com", "10.1.0.4")
    assert len(dropped) == 3 and any("github.com" in d for d in dropped) and any("vm7 " in d for d in dropped)
    with pytest.raises(HostNameRefused, match="No name"):
        kept_host_names(policy(), ["github.com", "*"], NS, is_public_suffix)


@pytest.mark.parametrize("entry", ["*", "*.*", "*.com", "*.co.uk", "*.internal", "com", "github.io", "0.0.0.0/0",
                                   "::/0", "*.example.*", "web*", "10.0.0.1/8", "*.10", ""])
def test_namespaces_are_never_everything_or_a_public_suffix(entry: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_namespace(entry, is_public_suffix)


# ---- the certificate ------------------------------------------------------------------------


@needs_ssh_keygen
def test_host_certificate_reads_back_with_ssh_keygen(tmp_path: Path) -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    key = parse_host_key(pub_line(host))
    g = grant()
    serial = new_serial(NOW)
    issued = build_host_certificate(g, key, CA, now=NOW, serial=serial)
    verify_host_issued(issued, g, key, CA.public_key(), now=NOW)
    f = tmp_path / "host-cert.pub"
    f.write_text(issued.openssh + "\n")
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(f)], capture_output=True, text=True, check=True).stdout
    assert "Type: ssh-ed25519-cert-v01@openssh.com host certificate" in out
    assert f"Serial: {serial}" in out
    assert f'Key ID: "ezssh-host/web/web1.example.com"' in out
    principals = out.split("Principals:")[1].split("Critical Options:")[0].split()
    assert principals == ["web1.example.com", "10.1.2.3"]
    assert "Critical Options: (none)" in out and "Extensions: (none)" in out
    assert issued.valid_before - issued.valid_after == 30 * 86400 + 60


def test_builder_refuses_empty_and_wildcard_principals() -> None:
    key = parse_host_key(pub_line(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(InvalidRequest):
        build_host_certificate(grant(names=()), key, CA, now=NOW, serial=5)
    with pytest.raises(InvalidRequest):
        build_host_certificate(grant(names=("*.example.com",)), key, CA, now=NOW, serial=5)


def test_final_check_catches_a_wrong_key_ca_or_grant() -> None:
    key = parse_host_key(pub_line(ed25519.Ed25519PrivateKey.generate()))
    other = parse_host_key(pub_line(ed25519.Ed25519PrivateKey.generate()))
    g = grant()
    issued = build_host_certificate(g, key, CA, now=NOW, serial=9)
    with pytest.raises(IntegrityError, match="not the host's key"):
        verify_host_issued(issued, g, other, CA.public_key(), now=NOW)
    with pytest.raises(IntegrityError, match="unexpected CA"):
        verify_host_issued(issued, g, key, ec.generate_private_key(ec.SECP256R1()).public_key(), now=NOW)
    with pytest.raises(IntegrityError, match="principals"):
        verify_host_issued(issued, replace(g, principals=("web1.example.com",)), key, CA.public_key(), now=NOW)
    # a user certificate in its place
    user = (ssh.SSHCertificateBuilder().public_key(key.key).serial(9).type(ssh.SSHCertificateType.USER)
            .key_id(g.key_id.encode()).valid_principals([p.encode() for p in g.principals])
            .valid_after(issued.valid_after).valid_before(issued.valid_before).sign(CA))
    with pytest.raises(IntegrityError, match="not a host certificate"):
        verify_host_issued(replace(issued, openssh=user.public_bytes().decode()), g, key, CA.public_key(), now=NOW)


# ---- proof of possession --------------------------------------------------------------------


def _write_private(path: Path, key) -> None:  # type: ignore[no-untyped-def]
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def ssh_keygen_sign(tmp_path: Path, key, message: bytes, namespace: str = RENEW_NAMESPACE) -> str:  # type: ignore[no-untyped-def]
    kf = tmp_path / "host_key"
    _write_private(kf, key)
    msg = tmp_path / "challenge"
    msg.write_bytes(message)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(kf), "-n", namespace, str(msg)], check=True,
                   capture_output=True)
    sig = (tmp_path / "challenge.sig").read_text()
    (tmp_path / "challenge.sig").unlink()
    return sig


@needs_ssh_keygen
@pytest.mark.parametrize("make", [ed25519.Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1()),
                                  lambda: ec.generate_private_key(ec.SECP521R1()),
                                  lambda: rsa.generate_private_key(65537, 3072)])
def test_sshsig_made_by_ssh_keygen_verifies(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    key = make()
    vetted = parse_host_key(pub_line(key))
    msg = b"ezssh host renewal\nnonce abc\n"
    sig = ssh_keygen_sign(tmp_path, key, msg)
    verify_sshsig(sig, msg, RENEW_NAMESPACE, vetted)
    # the base64 body alone (what the setup script sends) verifies too
    inner = "".join(sig.strip().splitlines()[1:-1])
    verify_sshsig(inner, msg, RENEW_NAMESPACE, vetted)
    with pytest.raises(ProofRefused, match="does not verify"):
        verify_sshsig(sig, msg + b"x", RENEW_NAMESPACE, vetted)


@needs_ssh_keygen
def test_sshsig_by_another_key_or_namespace_is_refused(tmp_path: Path) -> None:
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    msg = b"challenge"
    with pytest.raises(ProofRefused, match="another key"):
        verify_sshsig(ssh_keygen_sign(tmp_path, other, msg), msg, RENEW_NAMESPACE, parse_host_key(pub_line(key)))
    with pytest.raises(ProofRefused, match="namespace"):
        verify_sshsig(ssh_keygen_sign(tmp_path, key, msg, "file"), msg, RENEW_NAMESPACE,
                      parse_host_key(pub_line(key)))
    with pytest.raises(ProofRefused):
        verify_sshsig("not a signature", msg, RENEW_NAMESPACE, parse_host_key(pub_line(key)))


# ---- known_hosts lines ----------------------------------------------------------------------


def _lines(hosts, ns, ca: str) -> str:  # type: ignore[no-untyped-def]
    scope = trust_scope(hosts, ns)
    groups = [g for g in (list(scope.names), list(scope.ipv6), [*scope.ipv4, *NOT_AN_ADDRESS] if scope.ipv4 else []) if g]
    out = ""
    for g in groups:
        pats = [q for x in g for q in ((x,) if x.startswith("!") else (x, f"[{x}]:*"))]
        out += f"@cert-authority {','.join(pats)} {ca}\n"
    return out


@needs_ssh_keygen
def test_a_host_ca_is_trusted_for_exactly_the_namespaces_within_the_policy(tmp_path: Path) -> None:
    """ssh-keygen -F looks a host up in a known_hosts file with ssh's own matcher (negations too)."""
    ns = parse_namespaces(["*.contoso.internal", "bastion.contoso.com", "127.0.0.0/8", "10.0.0.0/20", "fd00::/124"],
                          is_public_suffix)
    ca = pub_line(CA)
    kh = tmp_path / "known_hosts"

    def found(host: str) -> bool:
        r = subprocess.run(["ssh-keygen", "-F", host, "-f", str(kh)], capture_output=True, text=True)
        return r.returncode == 0 and ca.split()[1] in r.stdout

    # a policy admin's widest policy: `*`, every address, every IPv6 address
    kh.write_text(_lines(["*", "0.0.0.0/0", "::/0", "tag:env=prod"], ns, ca))
    text = kh.read_text()
    assert ",*," not in f",{text.split()[1]}," and "*:*" not in text  # never a bare * or *:*
    inside = ["web1.contoso.internal", "[db.contoso.internal]:2222", "bastion.contoso.com", "127.0.0.1",
              "[127.0.0.1]:2222", "10.0.15.9", "fd00::7", "[fd00::f]:22"]
    outside = ["github.com", "web1", "contoso.internal", "www.contoso.com", "10.0.16.1", "128.0.0.1",
               "127.0.evil.com", "10.0.1.x", "fd00::10", "fe80::1", "[github.com]:22", "[10.0.16.1]:2222"]
    assert all(found(h) for h in inside), [h for h in inside if not found(h)]
    assert not any(found(h) for h in outside), [h for h in outside if found(h)]
    # a narrower policy: only its own patterns within the namespaces
    kh.write_text(_lines(["web*", "10.0.0.0/24", "web[12]"], ns, ca))
    assert found("web7.contoso.internal") and found("[web.contoso.internal]:22") and found("10.0.0.200")
    assert not any(found(h) for h in ("db.contoso.internal", "web7", "10.0.1.1", "bastion.contoso.com", "127.0.0.1"))
    # what can't be written exactly is left out, with a reason
    assert any("web[12]" in m for m in trust_scope(["web[12]"], ns).left_out)
    assert trust_scope(["fd00::/8"], parse_namespaces(["fd00::/16"], is_public_suffix)).left_out


def test_intersections_of_globs_with_a_suffix() -> None:
    ns = parse_namespaces(["*.contoso.internal"], is_public_suffix)
    assert trust_scope(["*"], ns).names == ("*.contoso.internal",)
    assert trust_scope(["*.internal"], ns).names == ("*.contoso.internal",)
    assert trust_scope(["*.prod.contoso.internal"], ns).names == ("*.prod.contoso.internal",)
    assert trust_scope(["web*"], ns).names == ("web*.contoso.internal",)
    # `10.20.*` also matches names such as 10.20.contoso.internal: that one is listed too
    assert set(trust_scope(["10.20.*"], ns).names) == {"10.20.*.contoso.internal", "10.20.contoso.internal"}
    assert trust_scope(["db-*-prod", "github.com", "*.contoso.com"], ns) == trust_scope([], ns)
