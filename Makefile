# qp2p: `make demo` and `make test` set everything up from scratch (a .venv, the
# compiled fast path, test tools) and run. Other targets: lint, docs, bench, bench-check, wheel,
# fuzz (atheris, FUZZ_SECONDS), soak (SOAK_MINUTES), scale (1,000 connections).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXT    := qp2p/_fastpath$(shell $(PYTHON) -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))")

.PHONY: all demo test test-fast test-unit lint docs bench bench-check wheel sysdeps clean fuzz soak scale

FUZZ_SECONDS ?= 600
SOAK_MINUTES ?= 10

all: build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip "setuptools>=77" wheel "Cython>=3,<4"
	$(BIN)/pip install -q --no-build-isolation -e '.[test,uvloop,cli,dev,qh3,portmap]'
	touch $(STAMP)

$(EXT): $(STAMP) qp2p/_fastpath.pyx qp2p/_fastpath.pxd
	QP2P_REQUIRE_EXTENSIONS=1 $(BIN)/python setup.py -q build_ext --inplace
	@touch $@

build: $(EXT)

sysdeps:
	@bash tools/ensure-system-deps.sh

demo: build
	$(BIN)/python examples/demo.py

test: build sysdeps
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory lint

test-fast: build
	$(BIN)/python -m pytest -q -x -m "not netns"

test-unit: build
	$(BIN)/python -m pytest -q -x tests/unit

lint: $(STAMP)
	$(BIN)/ruff check qp2p tests bench examples tools docs conftest.py setup.py
	$(BIN)/mypy --strict qp2p
	$(BIN)/python tools/check_structure.py  # no import cycles, no new private reaches

# the API reference from the docstrings (docs/api.rst); tests/loopback/test_docs.py builds it too
docs: $(STAMP)
	$(BIN)/python -m sphinx -q -W --keep-going -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"

bench: build
	$(BIN)/python bench/compare.py

bench-check: build
	$(BIN)/python bench/compare.py --check

fuzz: build
	bash fuzz/run.sh $(FUZZ_SECONDS)

soak: build sysdeps
	$(BIN)/python -m tests.support.soak --minutes $(SOAK_MINUTES)

scale: build
	$(BIN)/python bench/scale.py

wheel: $(STAMP)
	rm -rf dist
	QP2P_REQUIRE_EXTENSIONS=1 $(BIN)/python -m build --no-isolation
	@ls -l dist  # qp2p's sdist and wheel only: build fetches no dependency wheels

clean:
	rm -rf $(VENV) build dist docs/_build *.egg-info qp2p/*.so qp2p/_fastpath.c
