# Two entry points on a fresh machine: `make demo` and `make test` (both build .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test bench samples clean

setup: $(VENV)/.installed

# torch first: a CPU build where there is no NVIDIA GPU, so pip never pulls GBs of CUDA wheels
# (a local CPU wheel when pip's find-links has one, else PyTorch's CPU index).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q "torch>=2.8"; \
	elif $(PIP) install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then \
		$(PIP) install -q "torch==2.13.0"; \
	else \
		$(PIP) install -q "torch>=2.8" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -q -e ".[test,ray]"
	@touch $@

samples: setup
	$(PY) data_samples/make_samples.py

demo: setup
	$(VENV)/bin/medgen run pipelines/demo.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) demo_out mlflow.db mlartifacts
