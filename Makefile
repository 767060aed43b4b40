# The README's first two commands: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-images lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## sync a generated model from a local S3 endpoint, exec the example server, ask it once
	$(PY) scripts/demo.py

test: $(STAMP)  ## every test except the image builds (those are `make test-images`)
	$(PY) -m pytest -q --ignore=tests/images

test-quick: $(STAMP)  ## skip the slow adversarial tests
	$(PY) -m pytest -q --ignore=tests/images -m "not slow"

test-images: $(STAMP)  ## build and run the container images for real (needs scripts/install-image-tools.sh)
	$(PY) -m pytest -q tests/images

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## benchmarks against the peer tools (see benchmarks/README.md)
	$(PY) benchmarks/run.py

clean:
	rm -rf .demo .bench build dist *.egg-info
