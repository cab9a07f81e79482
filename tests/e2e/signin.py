"""A dev user's CLI, configured for the test API and signed in through the real device flow."""

from __future__ import annotations

from pathlib import Path

from devstack.demo import cli_env, run_cli


def sign_in(env: dict, api_server: str, oidc, user: str) -> dict:  # type: ignore[no-untyped-def]
    r = run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["login"], env, username=user, ca_path=oidc.ca_path)
    assert r.returncode == 0, r.stderr
    return env


def signed_in_home(tmp_path_factory, api_server: str, oidc, user: str, name: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    home: Path = tmp_path_factory.mktemp(name or f"{user}-home")
    return sign_in(cli_env(home), api_server, oidc, user)
