# The two commands: `make demo` (local stack, then a real SSH login with an ezssh certificate)
# and `make test` (the test suite). Both install what they need first.
.PHONY: soak setup demo up down status login test test-fast check screenshot bench bench-cli bench-scale package clean

PY := .venv/bin/python
DEVSTACK := cd infra/local && ../../$(PY) -m devstack

setup:
	@scripts/setup.sh

demo: setup
	@$(DEVSTACK) demo

up: setup
	@$(DEVSTACK) up

down:
	@$(DEVSTACK) down

status:
	@$(DEVSTACK) status

# Sign a dev user in to the running stack without a browser (DEV_USER=bob; the CLI's directory is
# .local/my-home unless EZSSH_HOME is set).
login:
	@$(DEVSTACK) login --user $(or $(DEV_USER),alice) --home $(or $(EZSSH_HOME),$(CURDIR)/.local/my-home)

test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS)

# Lint, format check and type check of the service and the CLI (ruff.toml, mypy.ini); all three run
# and any failure fails. The formatter itself: `.venv/bin/ruff format functions client/ezssh`.
CHECKED := functions client/ezssh
check: setup
	@rc=0; \
	.venv/bin/ruff check $(CHECKED) || rc=1; \
	.venv/bin/ruff format --check $(CHECKED) || rc=1; \
	.venv/bin/mypy || rc=1; \
	exit $$rc

# The pure core and the use cases over the in-memory store: no stand-in is started.
test-fast: setup
	@$(PY) -m pytest -q tests/unit tests/service $(PYTEST_ARGS)

# The README's picture of the approvals page at phone width (docs/approvals-phone.png), taken by the
# browser test that checks it.
screenshot: setup
	@EZSSH_UPDATE_SCREENSHOT=1 $(PY) -m pytest -q tests/web/test_approvals.py -k phone

soak: setup
	@$(PY) bench/soak.py $(SOAK_ARGS)

bench: setup
	@$(PY) bench/issue.py $(BENCH_ARGS)

bench-cli: setup
	@$(PY) bench/cli.py $(BENCH_ARGS)

# What every read, list and timer costs at two tenant sizes (BENCH_ARGS="--sizes 1000,100000").
bench-scale: setup
	@$(PY) bench/scale.py $(BENCH_ARGS)

clean: down
	rm -rf .local

package:
	@scripts/package.sh $(PACKAGE_OUT)
