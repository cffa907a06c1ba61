# The two commands (README): `make run` runs the whole pipeline on the built-in data and model; `make test` runs
# the tests. Both set up `.venv` first (torch 2.13.0 CPU wheel first, then the project).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The UI listens on localhost only unless you ask otherwise: make ui UI_HOST=0.0.0.0
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000

.PHONY: setup run test ui clean-state

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/python -m idistill_assets.main --profile profiles/default.yaml

test: setup
	@# the browser test (tests/assets/test_browser.py) drives Debian's Chromium; CI runs as root
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(BIN)/python -m pytest -q

ui: setup
	$(BIN)/python -m idistill_assets.instance --profile profiles/default.yaml
	DAGSTER_HOME=$(CURDIR)/.idistill/dagster_home IDISTILL_PROFILE=profiles/default.yaml \
		$(BIN)/dagster dev -w workspace.yaml -h $(UI_HOST) -p $(UI_PORT)

clean-state:
	rm -rf .idistill/artifacts .idistill/lancedb .idistill/dagster_home
