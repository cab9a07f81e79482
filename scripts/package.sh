#!/usr/bin/env bash
# Builds the zip an Azure Functions deployment takes: function_app.py, host.json, requirements.txt
# and the service package functions/ (sources only: no tests, no client, no caches, no .local), with
# the web page's libraries (functions/web/vendor.json, from node_modules: run `npm ci` first) copied
# to functions/web/vendor/. Python dependencies are not vendored: publish with a remote build, which
# installs requirements.txt.
#
#   scripts/package.sh [OUT.zip]        default: dist/ezssh-functions.zip
#
# Entries are sorted and time-stamped 1980-01-01, so the same sources give the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist/ezssh-functions.zip}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$(dirname "$out")"
"$PY" - "$out" <<'PYEOF'
import json
import os
import sys
import zipfile
from pathlib import Path

out = Path(sys.argv[1])
top = ["function_app.py", "host.json", "requirements.txt"]
skip_dirs = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".local", "tests"}
skip_suffixes = (".pyc", ".pyo")

files = []
for name in top:
    if not Path(name).is_file():
        sys.exit(f"package: {name} is missing")
    files.append(name)
for root, dirs, names in os.walk("functions"):
    dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
    for n in sorted(names):
        if n.endswith(skip_suffixes) or n.startswith("."):
            continue
        files.append(os.path.join(root, n))

# The web page's libraries, pinned in package-lock.json: served from functions/web/vendor/ in the zip.
vendor = {}
for name, spec in json.loads(Path("functions/web/vendor.json").read_text())["files"].items():
    src = Path("node_modules") / spec["from"]
    if not src.is_file():
        sys.exit(f"package: {src} is missing; run `npm ci` (scripts/setup.sh) first")
    vendor[f"functions/web/vendor/{name}"] = src.read_bytes()
files = sorted(set(files) - set(vendor)) + list(vendor)

tmp = out.with_suffix(out.suffix + ".tmp")
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    for f in sorted(files):
        info = zipfile.ZipInfo(f.replace(os.sep, "/"), date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        z.writestr(info, vendor[f] if f in vendor else Path(f).read_bytes())
os.replace(tmp, out)
print(f"package: {out} ({len(files)} files, {out.stat().st_size} bytes)", file=sys.stderr)
PYEOF
