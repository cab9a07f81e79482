"""Bring your own key: a policy names an existing Key Vault key (a customer's own vault). The service
proves it can read and sign with it before saving, and otherwise says which permission is missing.

The service runs in-process with the Key Vault backend (the real azure-keyvault-keys client against
the HTTPS stand-in in tests/standins/keyvault.py) and the real Azurite store."""

from __future__ import annotations

from dataclasses import replace

import pytest

from devstack.stack import identity_of
from functions.core.errors import Forbidden, InvalidRequest, NotFound
from functions.core.evaluation import AccessRequest
from functions.service import Service
from functions.signing.keyvault import KeyVaultKeyStore
from tests.standins.keyvault import KeyVaultStandIn, StaticTokenCredential


@pytest.fixture(scope="module")
def kv():
    standin = KeyVaultStandIn(token="byok-token").start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def kv_service(kv, context):
    keys = KeyVaultKeyStore(kv.url, StaticTokenCredential("byok-token"), connection_verify=kv.ca_path,
                            verify_challenge_resource=False)
    return Service(context.service.store, keys, replace(context.service.base.config, signer_backend="keyvault"))


def doc(oidc, pid: str, kid: str) -> dict:
    return {"id": pid, "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
            "hosts": ["byok-*"], "principals": ["{username}"], "ca_key_id": kid}


def test_a_policy_signs_with_the_customers_own_key(kv, kv_service, oidc, pub):
    kid = kv.add_key("customer-ca")
    carol, alice = identity_of(oidc, "carol"), identity_of(oidc, "alice")
    p = kv_service.policies.create(carol, doc(oidc, "byok-ok", kid))
    assert p.current_ca.key_ref == kid and p.current_ca.backend == "keyvault" and p.current_ca.customer_owned
    signs_before = kv.count("POST", "/sign")
    out = kv_service.issuance.request_access(alice, AccessRequest(host="byok-1", principal="alice"), pub())
    assert out.status == "issued" and out.certificate.ca_fingerprint == p.current_ca.fingerprint
    assert kv.count("POST", "/sign") == signs_before + 1  # exactly one Key Vault call per certificate


@pytest.mark.parametrize("op,needle", [("sign", "Key Vault Crypto User"), ("get", "Key Vault Reader")])
def test_a_missing_permission_is_named_and_nothing_is_saved(kv, kv_service, oidc, op, needle):
    name = f"customer-no-{op}"
    kid = kv.add_key(name)
    kv.deny(op, name)
    try:
        with pytest.raises(Forbidden) as err:
            kv_service.policies.create(identity_of(oidc, "carol"), doc(oidc, f"byok-no-{op}", kid))
        assert needle in err.value.message
    finally:
        kv.allow(op, name)
    with pytest.raises(NotFound):
        kv_service.store.get_policy(oidc.tenant_id("contoso"), f"byok-no-{op}")


def test_a_disabled_or_unknown_key_is_refused(kv, kv_service, oidc):
    disabled = kv.add_key("customer-disabled", enabled=False)
    with pytest.raises(InvalidRequest):
        kv_service.policies.create(identity_of(oidc, "carol"), doc(oidc, "byok-disabled", disabled))
    with pytest.raises(InvalidRequest):
        kv_service.policies.create(identity_of(oidc, "carol"), doc(oidc, "byok-missing",
                                                                  f"{kv.url}/keys/nope/" + "0" * 32))


def test_bring_your_own_key_needs_the_key_vault_backend(context, oidc, kv):
    with pytest.raises(InvalidRequest) as err:
        context.service.policies.create(identity_of(oidc, "carol"), doc(oidc, "byok-pkcs11", kv.add_key("x")))
    assert "Key Vault" in err.value.message


def test_deleting_a_byok_policy_stops_issuance_but_leaves_the_customers_key(kv, kv_service, oidc, pub):
    kid = kv.add_key("customer-keep")
    carol, alice = identity_of(oidc, "carol"), identity_of(oidc, "alice")
    p = kv_service.policies.create(carol, doc(oidc, "byok-del", kid))
    kv_service.policies.delete(carol, "byok-del", p.etag)
    from functions.core.errors import NoPolicyForHost

    with pytest.raises(NoPolicyForHost):
        kv_service.issuance.request_access(alice, AccessRequest(host="byok-1", principal="alice", policy_id="byok-del"), pub())
    assert kv_service.keys.verify_key(kid).key_ref == kid  # still enabled: it is the customer's key


def test_the_host_ca_may_be_the_customers_own_key_too(kv, kv_service, oidc, tmp_path):
    """`host_ca_key_id` names the customer's key for host certificates; it must differ from the user CA."""
    import subprocess

    from devstack.stack import enrol_with_token

    carol = identity_of(oidc, "carol")
    user_kid, host_kid = kv.add_key("customer-user-ca"), kv.add_key("customer-host-ca")
    with pytest.raises(InvalidRequest, match="another key"):
        kv_service.policies.create(carol, {**doc(oidc, "byok-same", user_kid), "host_ca_key_id": user_kid})
    p = kv_service.policies.create(carol, {**doc(oidc, "byok-host", user_kid), "host_ca_key_id": host_kid})
    assert p.current_host_ca.key_ref == host_kid and p.current_host_ca.customer_owned
    token, _ = kv_service.hostcerts.mint_token(carol, "byok-host", ["byok-7.contoso.example"])
    key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    issued = enrol_with_token(kv_service, carol.tid, "byok-host", token, [key])
    cert = issued.certificates[0][0]
    assert cert.ca_fingerprint == p.current_host_ca.fingerprint
    f = tmp_path / "byok-7-cert.pub"
    f.write_text(cert.openssh + "\n")
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(f)], capture_output=True, text=True, check=True).stdout
    assert "host certificate" in out and "byok-7" in out
