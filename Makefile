# The README's first two commands: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
INSTALL_LOG := $(VENV)/install.log

.PHONY: demo test test-quick test-images lint bench clean

# Installs are quiet: one line here, pip's full output in $(INSTALL_LOG) (shown if pip fails).
define install
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make: installing $(1) into $(VENV) (log: $(INSTALL_LOG))"
	@$(PY) -m pip install --upgrade pip $(1) >$(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
endef

$(STAMP): pyproject.toml  ## everything: the demo's parts and the test tools
	$(call install,-e '.[test]')
	@touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml  ## just what the demo runs: weightsync, its local S3, the example server's libraries
	$(call install,-e '.[demo]')
	@touch $(DEMO_STAMP)

# Azurite, Azure Blob Storage's emulator, for the az:// tests: from npm, where npm is installed (.ci/run installs
# it); without it those tests skip, unless WS_REQUIRE_AZURITE is set.
AZURITE := .cache/azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	@if command -v npm >/dev/null; then echo "make: installing azurite 3.35.0 into .cache/azurite (npm)"; \
	  npm install --silent --no-audit --no-fund --prefix .cache/azurite azurite@3.35.0 >$(INSTALL_LOG) 2>&1 \
	  || { cat $(INSTALL_LOG); exit 1; }; \
	else echo "make: npm not found: the az:// tests will skip (apt-get install npm, or see .ci/run)"; fi

demo: $(DEMO_STAMP)  ## sync a generated model from a local S3 endpoint, exec the example server, ask it once
	@$(PY) scripts/demo.py

test: $(STAMP) $(AZURITE)  ## every test except the image builds (those are `make test-images`)
	$(PY) -m pytest -q --ignore=tests/images

test-quick: $(STAMP) $(AZURITE)  ## skip the slow adversarial tests
	$(PY) -m pytest -q --ignore=tests/images -m "not slow"

test-images: $(STAMP)  ## build and run the container images for real (needs scripts/install-image-tools.sh)
	$(PY) -m pytest -q tests/images

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## benchmarks against the peer tools (see benchmarks/README.md)
	$(PY) benchmarks/run.py

clean:
	rm -rf .demo .bench build dist *.egg-info
