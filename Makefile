# One-command set-up: `make demo` and `make test` create .venv if missing and install mnemo into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mnemo-installed
# Two workers, one per core (tests/conftest.py: the integration tests run in order on one of them); the
# 25 slowest tests are listed at the end of every run: the suite must stay under CI's budget.
PYTEST_ARGS ?= --durations=25 -n 2 --dist loadscope --no-loadscope-reorder

.PHONY: install demo test test-unit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in corpus (stdlib sources): tokenizer, shards, 2-rank
# ZeRO-2 training of a memory model and a no-memory baseline, evaluation.
demo: install
	$(BIN)/python -m mnemo.demo

# Many facts at a distance (multi-key NIAH, MQAR, variable tracking): memory model vs no-memory
# baseline trained the same steps, 100 documents per task and distance, within 20 minutes (docs/many_facts.md).
.PHONY: many-facts
many-facts: install
	$(BIN)/python benchmarks/many_facts.py

# The whole suite. pytest's exit code 5 (no tests collected) is a failure.
test: install
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf runs .pytest_cache
