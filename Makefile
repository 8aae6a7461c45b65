# qpolicy: `make demo` runs the main job on the bundled default; `make test` runs the tests.
# Both create .venv on first use. CPU-only install: torch 2.13.0 CPU build, jax CPU.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/qpolicy demo --out out/demo

# pytest-xdist: JOBS workers (default 2, the CI machine's cores); JOBS=0 runs in one process
JOBS ?= 2

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -n $(JOBS) --durations=15

# the slow integration tests (Ray Tune sweep, integer execution of a shipped model, searches at full size, export
# targets loaded by the real tools); installs the sweep and export extras into .venv first; QPOLICY_REQUIRE_EXPORT=1
# makes a test whose tool is missing fail instead of skip
test-all: $(STAMP)
	$(BIN)/pip install -q -e ".[test,sweep,export]"
	QPOLICY_REQUIRE_EXPORT=1 WANDB_MODE=offline $(BIN)/python -m pytest -n $(JOBS) -m slow --durations=15

clean:
	rm -rf out .pytest_cache
