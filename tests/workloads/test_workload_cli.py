"""End to end, with no person and no prompt: a CI job with a federated token, a machine with a managed
identity, and a service principal with a certificate each sign the real CLI in through azure-identity,
get a certificate from the API and log in through a real sshd that trusts only their policy's CA."""

from __future__ import annotations

import json

import pytest

from devstack.demo import cli_env, run_cli
from tests.workloads.conftest import LOGIN


def job_env(tmp_path, api_server, oidc, **extra) -> dict:
    env = cli_env(tmp_path / "home", **extra)
    env.pop("EZSSH_ALLOW_DEVICE_LOGIN")  # no device code may be offered: nobody is there to enter it
    r = run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], env)
    assert r.returncode == 0, r.stderr
    return env


def ssh_whoami(env, sshd) -> str:
    r = run_cli(["ssh", f"{LOGIN}@127.0.0.1", "-p", str(sshd.port), "-o", "BatchMode=yes", "whoami"], env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def whoami(env) -> dict:
    r = run_cli(["whoami", "--json"], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_ci_job_with_a_federated_token_logs_in(tmp_path, api_server, oidc, wl_sshd):
    app = oidc.app("deploy-pipeline")
    token_file = tmp_path / "oidc.jwt"  # what the job's first step writes (README: GitHub Actions)
    token_file.write_text(oidc.ci_token(app["federated"][0]["subject"]))
    env = job_env(tmp_path, api_server, oidc, AZURE_FEDERATED_TOKEN_FILE=str(token_file),
                  AZURE_CLIENT_ID=app["client_id"], AZURE_TENANT_ID=app["tid"])
    r = run_cli(["login", "--workload-identity"], env)
    assert r.returncode == 0, r.stderr
    assert whoami(env)["oid"] == app["oid"] and whoami(env)["workload"] == "workload-identity"
    assert ssh_whoami(env, wl_sshd) == LOGIN
    assert f"/app:{app['client_id']}" in wl_sshd.log_text()  # sshd's log names the app by its key id


def test_a_machine_with_a_managed_identity_logs_in(tmp_path, api_server, oidc, wl_sshd):
    app = oidc.app("web1-identity")
    env = job_env(tmp_path, api_server, oidc, IDENTITY_ENDPOINT=oidc.mi_endpoint, IDENTITY_HEADER=oidc.mi_header)
    r = run_cli(["login", "--managed-identity", "--client-id", app["client_id"]], env)
    assert r.returncode == 0, r.stderr
    assert ssh_whoami(env, wl_sshd) == LOGIN
    assert whoami(env)["oid"] == app["oid"]


def test_a_service_principal_with_a_certificate_logs_in(tmp_path, api_server, oidc, wl_sshd):
    app = oidc.app("config-mgmt")
    env = job_env(tmp_path, api_server, oidc)
    r = run_cli(["login", "--service-principal", "--client-id", app["client_id"], "--certificate",
                 str(oidc.app_certificate("config-mgmt")), "--tenant", app["tid"]], env)
    assert r.returncode == 0, r.stderr
    assert ssh_whoami(env, wl_sshd) == LOGIN


def test_a_job_whose_federated_subject_is_not_trusted_fails_without_a_prompt(tmp_path, api_server, oidc):
    app = oidc.app("deploy-pipeline")
    token_file = tmp_path / "oidc.jwt"
    token_file.write_text(oidc.ci_token("repo:contoso/web:pull_request"))  # a fork's PR, not main
    env = job_env(tmp_path, api_server, oidc, AZURE_FEDERATED_TOKEN_FILE=str(token_file),
                  AZURE_CLIENT_ID=app["client_id"], AZURE_TENANT_ID=app["tid"])
    r = run_cli(["login", "--workload-identity"], env, timeout=60)
    assert r.returncode == 3, (r.returncode, r.stderr)  # not signed in
    assert "AADSTS700213" in r.stderr and "Traceback" not in r.stderr
    assert "To sign in, open" not in r.stderr
