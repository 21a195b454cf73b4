# Two commands on a fresh machine: `make demo` and `make test`. Both (re)build .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv demo test test-bf16 test-fast check-commits bench clean

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the 2.13.0 CPU wheel is on local disk; a bare `torch` would pull a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install -e examples/synfer-example-plugin

SYNFER := $(VENV)/bin/synfer

demo: venv
	# small FEText sets: train identities for layout initialization, held-out ones as the FID reference
	$(SYNFER) fetext build recipes/fetext-procedural.yaml output=out/fetext-quick sources.0.num_images=1024
	$(SYNFER) fetext build recipes/fetext-procedural.yaml output=out/fetext-quick-test sources.0.split=test sources.0.num_images=512 sources.0.seed=1
	$(SYNFER) run recipes/quickstart.yaml

test: venv
	$(VENV)/bin/pytest -q -x --durations=15

# What a CPU with native bfloat16 (AVX512-BF16 or AMX) sees: `generator.forward_dtype: auto` picks bfloat16 there.
# SYNFER_NATIVE_BF16=1 makes the auto rule answer as such a CPU would, so an AVX2 machine (CI) runs those paths too.
BF16_TESTS := tests/test_sampling.py tests/test_generator.py tests/test_chunks.py tests/test_pipeline.py tests/test_sd15_topology.py
test-bf16: venv
	SYNFER_NATIVE_BF16=1 $(VENV)/bin/pytest -q -x $(BF16_TESTS)

# The quick loop while editing: everything but the tests marked `slow` (subprocess runs, real
# trainings). `make test` still runs everything; `-m "not network"` also skips PyPI fetches.
test-fast: venv
	$(VENV)/bin/pytest -q -x -m "not slow" --durations=10

# Before pushing: every commit subject since BASE (default: the upstream branch, else the last 20) fits 72 characters;
# the why goes in the body. e.g. `make check-commits BASE=origin/main`
BASE ?= $(shell git rev-parse -q --verify @{upstream} 2>/dev/null || git rev-parse -q --verify HEAD~20 2>/dev/null || git rev-list --max-parents=0 HEAD)
check-commits:
	@git log --format='%h %s' $(BASE)..HEAD | awk '{ n = length($$0) - length($$1) - 1; if (n > 72) { print "subject of " n " characters (max 72): " $$0; bad = 1 } } END { exit bad }'
	@echo "commit subjects since $(BASE): all within 72 characters"

clean:
	rm -rf $(VENV) out build *.egg-info
