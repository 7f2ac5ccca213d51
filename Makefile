# The NCIS kit. First two commands: `make demo` (set up, run the embedded demo) and `make test`.
# Both create .venv when missing and install the pinned set (requirements.txt) plus this package.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= demo
OUT    ?= outputs/$(PRESET)

.PHONY: setup browser demo run test lab strip clean-venv

setup: $(STAMP)

# Reinstall whenever a requirements file or the package metadata changes.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

# The whole pipeline on the embedded demo world: notebooks 00-05, the comparison of outlier methods
# over seeds (its ncis seed-0 run is stage 5's own training, copied), then notebooks 06 and 07, after
# compare so that they show the comparison table and the linear baseline's images.
DEMO_SEEDS ?= 0,1,2
demo: setup
	@start=$$(date +%s); set -e; \
	$(BIN)/python -m ncis_core run --preset demo --out outputs/demo --stages 0-5; \
	$(BIN)/python -m ncis_core compare --preset demo --out outputs/demo --methods none,idgen,linear,ncis --seeds $(DEMO_SEEDS); \
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

test: setup browser
	$(BIN)/python -m pytest -q

lab: setup
	$(BIN)/jupyter lab notebooks/

strip:
	$(BIN)/python -m ncis_core strip-notebooks notebooks

clean-venv:
	rm -rf $(VENV)
