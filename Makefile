# Two entry points on a fresh machine: `make demo` and `make test` (each creates .venv).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test test-slow ci bench demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject: pip takes the CPU wheel from local disk here.
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The whole pipeline on the bundled corpus (demo/run_demo.py; reruns reuse finished stages).
demo: $(STAMP)
	$(BIN)/python demo/run_demo.py --out demo_out

# The tests marked slow (`make test` deselects them; .ci/run runs both). pytest exits 5 when
# no test is marked slow: nothing failed, so that is success here (never for `make test`).
test-slow: $(STAMP)
	@status=0; $(BIN)/python -m pytest -q -m slow || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test-slow: no test is marked slow, nothing to run"; \
	exit 0; fi; exit $$status

# What CI runs (.ci/run): `make test`, then `make test-slow`, and one summary line.
ci:
	./.ci/run

bench: $(STAMP)
	$(BIN)/python bench/store_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
