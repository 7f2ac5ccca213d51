# The NCIS kit. First two commands: `make demo` (set up, run the embedded demo) and `make test`.
# Both create .venv when missing and install the pinned set (requirements.txt) plus this package.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= demo
OUT    ?= outputs/$(PRESET)

.PHONY: setup demo run test lab strip clean-venv

setup: $(STAMP)

# Reinstall whenever a requirements file or the package metadata changes.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

# The whole pipeline on the embedded demo world, then the comparison of outlier methods over
# seeds, then notebook 06 again so that it shows the comparison table.
DEMO_SEEDS ?= 0,1,2
demo: setup
	$(BIN)/python -m ncis_core run --preset demo --out outputs/demo
	$(BIN)/python -m ncis_core compare --preset demo --out outputs/demo --methods none,idgen,linear,ncis --seeds $(DEMO_SEEDS)
	$(BIN)/python -m ncis_core run --preset demo --out outputs/demo --stages 6

run: setup
	$(BIN)/python -m ncis_core run --preset $(PRESET) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

lab: setup
	$(BIN)/jupyter lab notebooks/

strip:
	$(BIN)/python -m ncis_core strip-notebooks notebooks

clean-venv:
	rm -rf $(VENV)
