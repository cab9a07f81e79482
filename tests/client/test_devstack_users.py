"""The demo's and tests' unix users: created only when missing (with the password field '*'), an
existing account is never changed, and what was created is removed again (at `make down`, and when a
test sshd stops). A throwaway user name of the test's own is created and removed; an account the test
made beforehand, with a password, stands for someone's existing account."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid

import pytest

from devstack.sshd import ensure_unix_users, remove_unix_users
from tests.realparts import unavailable


@pytest.fixture()
def root():
    if os.geteuid() != 0 or not shutil.which("useradd"):
        unavailable("creating unix users needs root and useradd")


def shadow(name: str) -> str:
    return subprocess.run(["getent", "shadow", name], capture_output=True, text=True).stdout.strip()


def exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def throwaway() -> str:
    return f"ezt{uuid.uuid4().hex[:8]}"


def test_a_missing_user_is_created_and_removed_again(root):
    name = throwaway()
    created = ensure_unix_users([name])
    try:
        assert [u["name"] for u in created] == [name] and exists(name)
        assert shadow(name).split(":")[1] == "*"  # no password, yet not locked for key logins
        home = pwd.getpwnam(name).pw_dir
        assert os.path.isdir(home)
        assert ensure_unix_users([name]) == []  # now it exists: nothing more is created
    finally:
        assert remove_unix_users(created) == [name]
    assert not exists(name) and not os.path.exists(home)


def test_an_existing_account_is_left_exactly_as_it_is(root):
    name = throwaway()
    subprocess.run(["useradd", "--create-home", "-p", "$6$salt$notarealhashbutafixedvalue", name], check=True)
    try:
        before = (shadow(name), pwd.getpwnam(name))
        assert ensure_unix_users([name]) == []
        assert (shadow(name), pwd.getpwnam(name)) == before  # the password field is still its own
        # and a removal of records that are not its own leaves it too
        assert remove_unix_users([{"name": name, "uid": pwd.getpwnam(name).pw_uid + 1}]) == []
        assert exists(name)
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def test_the_demo_users_of_this_machine_are_left_alone(root):
    """alice, bob, carol and dave exist here: ensure creates none of them, so nothing is removed later."""
    from devstack.stack import DEMO_USERS

    present = [n for n in DEMO_USERS if exists(n)]
    before = {n: shadow(n) for n in present}
    created = ensure_unix_users(present)
    assert created == [] and {n: shadow(n) for n in present} == before


def test_make_down_removes_the_users_up_created_and_status_reads_as_text(root, tmp_path):
    import json

    from devstack import stack

    name = throwaway()
    created = ensure_unix_users([name])
    try:
        (tmp_path / "stack.json").write_text(json.dumps({
            "ports": {"api": 7071}, "processes": [], "api_url": "http://127.0.0.1:7071",
            "ca_bundle": str(tmp_path / "ca.pem"), "created_users": created}))
        text = stack.describe(stack.status(tmp_path))
        assert f"unix users created by `up` (removed by `make down`): {name}" in text and "{" not in text
        stopped = stack.down(tmp_path)
        assert stopped == [f"unix users it created ({name})"] and not exists(name)
        assert stack.describe(stack.status(tmp_path)).startswith("The local stack is not running")
    finally:
        remove_unix_users(created)
