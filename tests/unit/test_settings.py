"""Settings are read once and validated; a bad value fails start-up with a message naming it."""

from __future__ import annotations

import pytest

from functions.settings import SETTINGS, SettingsError, load_settings

T1, T2 = "1ff8d19a-512a-4382-b7c7-72836fd919c4", "a6ae0ceb-e286-4cc3-96fe-ec3438ee7715"
SUB = "5c0a3e9d-6f42-4b7e-9d1c-2a8f7e6b4c31"


def env(**over: str) -> dict[str, str]:
    base = {
        "EZSSH_TENANTS": T1,
        "EZSSH_API_CLIENT_ID": "0e2d7f4c-6a1b-4c3e-9a57-5d2b8e0c1a01",
        "EZSSH_CLI_CLIENT_ID": "0e2d7f4c-6a1b-4c3e-9a57-5d2b8e0c1a02",
        "EZSSH_STORAGE_ACCOUNT_URL": "https://st.table.core.windows.net",
        "EZSSH_SIGNER_BACKEND": "keyvault",
        "EZSSH_KEYVAULT_URL": "https://kv.vault.azure.net",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_a_good_azure_configuration_loads():
    s = load_settings(env())
    assert s.tenants == (T1,) and s.signer_backend == "keyvault" and s.authority_type == "entra"
    assert s.issuer_for(T1) == f"https://login.microsoftonline.com/{T1}/v2.0"
    assert s.scopes == ["api://0e2d7f4c-6a1b-4c3e-9a57-5d2b8e0c1a01/access_as_user"]


@pytest.mark.parametrize("over,needle", [
    ({"EZSSH_TENANTS": None}, "EZSSH_TENANTS"),
    ({"EZSSH_TENANTS": "contoso"}, "EZSSH_TENANTS"),
    ({"EZSSH_API_CLIENT_ID": None}, "EZSSH_API_CLIENT_ID"),
    ({"EZSSH_STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"}, "exactly one"),
    ({"EZSSH_STORAGE_ACCOUNT_URL": "http://st.table.core.windows.net"}, "EZSSH_STORAGE_ACCOUNT_URL"),
    ({"EZSSH_SIGNER_BACKEND": "vault"}, "EZSSH_SIGNER_BACKEND"),
    ({"EZSSH_KEYVAULT_URL": None}, "EZSSH_KEYVAULT_URL"),
    ({"EZSSH_CA_KEY_KIND": "DSA"}, "EZSSH_CA_KEY_KIND"),
    ({"EZSSH_MAX_TTL_CEILING": "a day"}, "EZSSH_MAX_TTL_CEILING"),
    ({"EZSSH_ISSUER_TEMPLATE": "https://login.example/common"}, "EZSSH_ISSUER_TEMPLATE"),
    ({"EZSSH_ENROL_SCOPES": "/subscriptions/not-a-guid"}, "EZSSH_ENROL_SCOPES"),
    ({"EZSSH_ENROL_SCOPES": f"{T2}=/subscriptions/{SUB}"}, "EZSSH_ENROL_SCOPES"),  # a tenant not served
])
def test_a_bad_setting_fails_start_up_naming_it(over, needle):
    with pytest.raises(SettingsError) as err:
        load_settings(env(**over))
    assert needle in err.value.message


def test_with_several_tenants_every_enrolment_scope_names_its_tenant():
    two = {"EZSSH_TENANTS": f"{T1},{T2}"}
    with pytest.raises(SettingsError, match="each scope must name the tenant"):
        load_settings(env(**two, EZSSH_ENROL_SCOPES=f"/subscriptions/{SUB}"))
    s = load_settings(env(**two, EZSSH_ENROL_SCOPES=f"{T1}=/subscriptions/{SUB}/resourceGroups/rg-a,"
                                                     f"{T2}=/subscriptions/{SUB}/resourceGroups/rg-b"))
    from functions.service.enrolment import EnrolConfig

    cfg = EnrolConfig(scopes=s.enrol_scopes, tenants=s.tenants)
    assert cfg.scopes_for(T1) == (f"/subscriptions/{SUB}/resourceGroups/rg-a",)
    assert cfg.scopes_for(T2) == (f"/subscriptions/{SUB}/resourceGroups/rg-b",)
    assert len(cfg.all_scopes) == 2


def test_every_setting_read_is_documented():
    assert all(meaning.strip() for meaning in SETTINGS.values())


# ---- who may log in as whom, and how much one user may ask ------------------------------------


def test_verified_domains_per_tenant():
    s = load_settings(env(EZSSH_TENANTS=f"{T1},{T2}",
                          EZSSH_VERIFIED_DOMAINS=f"{T1}=Contoso.com, contoso.net.;{T2.upper()}=fabrikam.com"))
    assert s.verified_domains_for(T1) == ("contoso.com", "contoso.net")
    assert s.verified_domains_for(T2) == ("fabrikam.com",)
    assert s.verified_domains_for("00000000-0000-0000-0000-000000000000") == ()


def test_verified_domains_default_to_none_and_need_no_tenant_with_one_tenant():
    assert load_settings(env()).verified_domains_for(T1) == ()
    assert load_settings(env(EZSSH_VERIFIED_DOMAINS="contoso.com")).verified_domains_for(T1) == ("contoso.com",)


@pytest.mark.parametrize("value,needle", [
    ("contoso.com", "several tenants"),  # two tenants: each entry names its tenant
    (f"{SUB}=contoso.com", "not in EZSSH_TENANTS"),
    (f"{T1}=contoso", "not a domain"),
    (f"{T1}=*.contoso.com", "not a domain"),
    (f"{T1}=contoso.com/x", "not a domain"),
])
def test_bad_verified_domains(value, needle):
    with pytest.raises(SettingsError) as info:
        load_settings(env(EZSSH_TENANTS=f"{T1},{T2}", EZSSH_VERIFIED_DOMAINS=value))
    assert "EZSSH_VERIFIED_DOMAINS" in info.value.message and needle in info.value.message


def test_limits_and_the_loopback_webhook_flag():
    s = load_settings(env())
    assert (s.max_pending_requests, s.request_rate, s.webhook_allow_loopback_http) == (5, 30, False)
    s = load_settings(env(EZSSH_MAX_PENDING_REQUESTS="2", EZSSH_REQUEST_RATE="100",
                          EZSSH_WEBHOOK_ALLOW_LOOPBACK_HTTP="1"))
    assert (s.max_pending_requests, s.request_rate, s.webhook_allow_loopback_http) == (2, 100, True)
    for name, bad in (("EZSSH_MAX_PENDING_REQUESTS", "0"), ("EZSSH_MAX_PENDING_REQUESTS", "101"), ("EZSSH_REQUEST_RATE", "x"),
                      ("EZSSH_WEBHOOK_ALLOW_LOOPBACK_HTTP", "yes")):
        with pytest.raises(SettingsError) as info:
            load_settings(env(**{name: bad}))
        assert name in info.value.message


@pytest.mark.parametrize("url", ["https://a'b.example", "https://ezssh.example/path", "ftp://x", "https://x y",
                                 "https://x;rm -rf /", "https://$(id).example"])
def test_public_url_cannot_break_a_setup_script(url):
    with pytest.raises(SettingsError) as info:
        load_settings(env(EZSSH_PUBLIC_URL=url))
    assert "EZSSH_PUBLIC_URL" in info.value.message


def test_public_url_is_kept_without_its_trailing_slash():
    assert load_settings(env(EZSSH_PUBLIC_URL="https://ezssh.example.net/")).public_url == "https://ezssh.example.net"
