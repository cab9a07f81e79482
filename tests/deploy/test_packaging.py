"""The Functions package: what scripts/package.sh puts in the zip, and that the zip's
requirements.txt alone, in a clean venv, is enough to import function_app and register every
function, with no EZSSH_* setting present (settings are read on the first request, not at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest

from . import REPO

EXPECTED_FUNCTIONS = {
    "http_app_func": "httpTrigger",  # the FastAPI app through func.AsgiFunctionApp
    "expire_requests": "timerTrigger",  # approval expiry
    "revoke_leavers": "timerTrigger",  # leavers lose their certificates (Microsoft Graph)
    "enrol_vm_event": "eventGridTrigger",  # auto-enrolment of new VMs
    "reconcile_enrolments": "timerTrigger",  # enrolment reconciliation
    "enrol_job": "queueTrigger",  # one VM of an enrolment job (Run Command)
    "enrol_job_poison": "queueTrigger",  # an enrolment message that failed every delivery
}
TOP_LEVEL = {"function_app.py", "host.json", "requirements.txt"}


def build(out: Path) -> Path:
    r = subprocess.run(["bash", str(REPO / "scripts" / "package.sh"), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"package.sh failed:\n{r.stdout}\n{r.stderr}"
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("pkg") / "ezssh-functions.zip")


def test_zip_holds_the_app_and_nothing_else(package: Path):
    names = zipfile.ZipFile(package).namelist()
    assert TOP_LEVEL <= set(names)
    assert "functions/__init__.py" in names and "functions/settings.py" in names and "functions/wiring.py" in names
    for n in names:
        assert n in TOP_LEVEL or n.startswith("functions/"), f"unexpected entry {n}"
        for bad in ("__pycache__", ".pyc", "/tests/", "tests/", "client/", ".local", "node_modules", ".venv"):
            assert bad not in n, f"{n} should not be packaged"
    on_disk = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "functions").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    }
    assert on_disk <= set(names), f"sources left out: {sorted(on_disk - set(names))}"


def test_zip_serves_the_web_page_without_node_modules(package: Path, tmp_path: Path):
    """The page's libraries travel in the zip (functions/web/vendor/, from vendor.json): unpacked
    where no node_modules exists, the app builds the same files, so the same version."""
    from functions.api.web import assets

    spec = json.loads((REPO / "functions" / "web" / "vendor.json").read_text())["files"]
    names = set(zipfile.ZipFile(package).namelist())
    assert {f"functions/web/vendor/{n}" for n in spec} <= names
    assert "functions/web/index.html" in names and "functions/web/app/main.js" in names
    app_dir = tmp_path / "site" / "wwwroot"
    zipfile.ZipFile(package).extractall(app_dir)
    assert not (app_dir.parent / "node_modules").exists() and not (app_dir / "node_modules").exists()
    r = subprocess.run([sys.executable, "-c", "from functions.api.web import assets; a = assets(); "
                        "print(a.version, len(a.files))"], cwd=app_dir, env={**os.environ, "PYTHONPATH": str(app_dir)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    here = assets()
    assert r.stdout.split() == [here.version, str(len(here.files))]


def test_zip_is_reproducible(package: Path, tmp_path: Path):
    assert build(tmp_path / "again.zip").read_bytes() == package.read_bytes()


def test_package_target_in_makefile():
    mk = (REPO / "Makefile").read_text()
    assert "\npackage:" in mk and "scripts/package.sh" in mk


@pytest.fixture(scope="module")
def registered(package: Path, tmp_path_factory) -> dict[str, list[str]]:
    """Unzip, make a clean venv, pip install the zip's requirements.txt, import function_app there."""
    root = tmp_path_factory.mktemp("clean")
    app_dir = root / "app"
    zipfile.ZipFile(package).extractall(app_dir)
    env_dir = root / "venv"
    started = time.monotonic()
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-r", str(app_dir / "requirements.txt")], capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    assert r.returncode == 0, f"pip install -r requirements.txt failed in a clean venv:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"\nclean venv + pip install -r requirements.txt: {took:.1f} s", file=sys.stderr)

    probe = (
        "import json, function_app\n"
        "fs = function_app.app.get_functions()\n"  # may be called once per app object
        "print(json.dumps({'file': function_app.__file__,"
        " 'functions': {f.get_function_name(): [b.type for b in f.get_bindings()] for f in fs}}))\n"
    )
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}  # no EZSSH_*, no AZURE_*, no PYTHONPATH
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    r = subprocess.run([str(py), "-c", probe], cwd=app_dir, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"import function_app failed in the clean venv:\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().parent == app_dir.resolve(), "imported function_app from outside the package"
    return out["functions"]


def test_function_app_imports_without_settings(registered):
    assert isinstance(registered, dict) and registered


def test_registered_functions(registered):
    missing = sorted(set(EXPECTED_FUNCTIONS) - set(registered))
    extra = sorted(set(registered) - set(EXPECTED_FUNCTIONS))
    assert not missing and not extra, f"functions missing: {missing}; unexpected: {extra}; registered: {registered}"


def test_trigger_types(registered):
    for name, trigger in EXPECTED_FUNCTIONS.items():
        if name in registered:
            assert trigger in registered[name], f"{name} should have a {trigger}; has {registered[name]}"


def test_the_docs_install_the_cli_by_its_own_distribution_name():
    """`ezssh` on PyPI is an unrelated project: the CLI is `ezssh-cli`, and every install, uninstall
    and wheel the docs name is that distribution at the version client/pyproject.toml declares."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    assert project["name"] == "ezssh-cli" and project["scripts"]["ezssh"]
    wheel = f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"
    docs = {p: p.read_text() for p in (REPO / "README.md", REPO / "client" / "README.md", REPO / "docs" / "DEPLOY.md")}
    for path, text in docs.items():
        assert not re.search(r"pip install (-U )?ezssh\b(?![-_])(?!` does not)|published ezssh package", text), path
        for m in re.finditer(r"pipx uninstall ([\w.-]+)", text):
            assert m[1].strip("`") == project["name"], (path, m[0])
        for m in re.finditer(r"ezssh_cli-[0-9][^\s`]*\.whl", text):
            assert m[0] == wheel, (path, m[0])
    assert any(wheel in t for t in docs.values()) and any("pipx install ./client" in t for t in docs.values())
