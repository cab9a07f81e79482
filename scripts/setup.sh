#!/usr/bin/env bash
# Installs everything the local stack and the tests need. Idempotent; safe to run again.
#   Debian packages: openssh-server, softhsm2, rsync, git, chromium (apt-get when root; otherwise says
#                    what to install)
#   npm packages:    azurite, oidc-provider and the web page's libraries (npm ci, from package-lock.json),
#                    after checking that Node fits what they declare (scripts/check-node.js)
#   Python:          .venv with requirements-dev.txt and the CLI (./client) installed editable
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v softhsm2-util >/dev/null 2>&1 || need_pkgs+=(softhsm2)
command -v ssh >/dev/null 2>&1 || need_pkgs+=(openssh-client)
command -v node >/dev/null 2>&1 || need_pkgs+=(nodejs npm)
command -v rsync >/dev/null 2>&1 || need_pkgs+=(rsync)  # tests/e2e: rsync -e ssh with ezssh certificates
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)  # tests/web: the web page in a real browser
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_pkgs[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${need_pkgs[*]}" >&2
    echo "setup: install them with: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
fi

# Node against what the pinned npm packages declare (engines.node of each package in package-lock.json):
# when this Node does not fit, a Debian nodejs that does is installed (root), or named; else say what to do.
node_rc=0
node scripts/check-node.js || node_rc=$?
if [ "$node_rc" = 2 ]; then
  echo "setup: install npm (Debian: apt-get install npm), then run make again" >&2
  exit 1
elif [ "$node_rc" != 0 ]; then
  fit=""
  if command -v apt-cache >/dev/null 2>&1; then
    fit=$(node scripts/check-node.js $(apt-cache madison nodejs 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}')) || fit=""
  fi
  if [ -n "$fit" ] && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's nodejs $fit, which fits the pinned npm packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades "nodejs=$fit" >/dev/null
  elif [ -n "$fit" ]; then
    echo "setup: install a Node that fits with: sudo apt-get install nodejs=$fit" >&2
    exit 1
  else
    echo "setup: no Debian nodejs package fits either; install Node $(node -p 'require("./package.json").engines.node')" \
         "(nodejs.org, or NodeSource's packages for Debian), then run make again" >&2
    exit 1
  fi
fi

# A node_modules or .venv that is a symlink belongs to another checkout (e.g. a git worktree sharing
# the main one's): setup leaves it as it is and says so; run setup in that checkout to update it.
if [ -L node_modules ]; then
  if [ package-lock.json -nt node_modules/.stamp ]; then
    echo "setup: node_modules is shared with $(readlink node_modules): not reinstalled here" >&2
  fi
elif [ ! -d node_modules/.bin ] || [ package-lock.json -nt node_modules/.stamp ]; then
  echo "setup: npm ci (azurite, oidc-provider, the web page's libraries)" >&2
  npm ci --no-audit --no-fund --loglevel=error
  touch node_modules/.stamp
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if [ -L .venv ]; then
  if [ requirements.txt -nt .venv/.stamp ] || [ requirements-dev.txt -nt .venv/.stamp ] \
     || [ client/pyproject.toml -nt .venv/.stamp ]; then
    echo "setup: .venv is shared with $(readlink .venv): not reinstalled here" >&2
  fi
elif [ ! -f .venv/.stamp ] || [ requirements.txt -nt .venv/.stamp ] || [ requirements-dev.txt -nt .venv/.stamp ] \
   || [ client/pyproject.toml -nt .venv/.stamp ]; then
  echo "setup: pip install (requirements-dev.txt, ./client)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  # The CLI's distribution was called "ezssh" before (a name PyPI gives to an unrelated project):
  # an editable install of it from this ./client goes, so one distribution owns the `ezssh` command.
  if .venv/bin/python -m pip show ezssh 2>/dev/null | grep -qx "Editable project location: $PWD/client"; then
    .venv/bin/python -m pip uninstall -q -y ezssh
  fi
  .venv/bin/python -m pip install -q -e ./client
  touch .venv/.stamp
fi
echo "setup: ready" >&2
