# Two commands for a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
DATA   ?= $(or $(NORMLAB_DATA),./data)
OUT    ?= runs/latest
SEEDS  ?= 1
JOBS   ?= 1
BIN     = $(VENV)/bin

.PHONY: run test test-quick install install-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files make both targets idempotent: pip runs again only when pyproject.toml or constraints.txt changes.
# constraints.txt pins the versions that produced the published figures; pyproject.toml states ranges.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e . && touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' && touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The three models, 20 epochs each, then the report (resumes an interrupted run).
run: install
	$(BIN)/normlab run --data-dir $(DATA) --out $(OUT) --seeds $(SEEDS) --jobs $(JOBS) --resume

test: install-dev
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (Ray, the notebook, kill-and-resume): the loop of development.
test-quick: install-dev
	$(BIN)/python -m pytest -q -m "not slow"
