# The NCIS kit. First two commands: `make demo` (set up, run the embedded demo) and `make test`.
# Both create .venv when missing and install what they need from the one pinned set
# (requirements.txt, used as pip constraints) plus this package in editable mode: `make demo` the
# runtime dependencies, `make test` the `[test]` extra, `make lab` the `[lab]` extra.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= demo
OUT    ?= outputs/$(PRESET)
# pip with requirements.txt's pins as constraints: an extra installs exactly the pinned versions
PIP    := $(BIN)/python -m pip install -c requirements.txt

.PHONY: setup setup-test setup-lab browser demo run test check lab strip clean-venv

setup: $(STAMP)
setup-test: $(STAMP)-test
setup-lab: $(STAMP)-lab

# Reinstall whenever a requirements file or the package metadata changes (the extras' stamps
# depend on this one, so they follow).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(PIP) -e .
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m ncis_core compile-kernels
	touch $(STAMP)

$(STAMP)-test: $(STAMP)
	$(PIP) -e ".[test]"
	touch $@

$(STAMP)-lab: $(STAMP)
	$(PIP) -e ".[lab]"
	touch $@

# The whole pipeline on the embedded demo world: notebooks 00-05, the comparison of outlier methods
# over seeds (its ncis seed-0 run is stage 5's own training, copied), then notebooks 06 and 07, after
# compare so that they show the comparison table and the other methods' images.
DEMO_SEEDS ?= 0,1,2,3,4,5,6,7,8,9
DEMO_METHODS ?= none,idgen,linear,ncis,knn_boundary
demo: setup
	@start=$$(date +%s); set -e; \
	$(BIN)/python -m ncis_core run --preset demo --out outputs/demo --stages 0-5; \
	$(BIN)/python -m ncis_core compare --preset demo --out outputs/demo --methods $(DEMO_METHODS) --seeds $(DEMO_SEEDS); \
	$(BIN)/python -m ncis_core run --preset demo --out outputs/demo --stages 6-7; \
	echo "make demo: finished in $$(( $$(date +%s) - start )) s; the comparison: outputs/demo/compare/table.md"

run: setup
	$(BIN)/python -m ncis_core run --preset $(PRESET) --out $(OUT)

# Debian's chromium and chromedriver for the explorer's browser test (a browser is never
# downloaded). Installs them when missing and we are root; otherwise says what to install (the
# test then skips, or fails where NCIS_REQUIRE_BROWSER=1, as in CI). Nothing to do when present.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; \
	else \
	  echo "the browser test needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; \
	fi

test: setup-test browser
	$(BIN)/python -m pytest -q

# The fast tier, for every edit: unit and contract tests, no test marked heavy (notebooks through
# papermill, the browser, subprocess and multi-process runs, anything over a few seconds).
check: setup-test
	$(BIN)/python -m pytest -q -m "not heavy"

# JupyterLab on notebooks/ (as root, as in a container, Jupyter needs --allow-root)
lab: setup-lab
	$(BIN)/jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) notebooks/

strip:
	$(BIN)/python -m ncis_core strip-notebooks notebooks

clean-venv:
	rm -rf $(VENV)
