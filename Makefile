# The two commands of the README: `make demo` and `make test`.
# Each creates .venv on first use, so a fresh clone needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,hf]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m ''

# Packages with a `tiny` reproduction (`python -m PKG reproduce --preset tiny --run-dir DIR`).
DEMOS := lir internal_rl spatia
DEMO_DIR := runs/demo

demo: $(STAMP)
	@set -e; for pkg in $(DEMOS); do \
	  echo "== $$pkg: tiny reproduction"; \
	  $(BIN)/python -m $$pkg reproduce --preset tiny --run-dir $(DEMO_DIR)/$$pkg; \
	done; \
	echo "== internal_rl: tiny reproduction on the point-mass pinpad (MJX, Hawk base model)"; \
	$(BIN)/python -m internal_rl reproduce --env point --preset tiny \
	  --run-dir $(DEMO_DIR)/internal_rl_point; \
	for pkg in $(DEMOS) internal_rl_point; do echo "report: $(DEMO_DIR)/$$pkg/report.md"; done

bench: $(STAMP)
	@for f in benchmarks/*.py; do \
	  case $$f in benchmarks/timing.py) continue;; esac; \
	  echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check common lir internal_rl spatia tests benchmarks
	$(BIN)/ruff format --check common lir internal_rl spatia tests benchmarks

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
