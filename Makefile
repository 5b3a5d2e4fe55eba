# Every target bootstraps its own .venv (torch 2.13.0 first: the CPU wheel, no CUDA downloads).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-slow demo bench bench-quick fuzz lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m mergekit_sdxl.demo demo-out

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py --size full --rounds 2
	$(BIN)/python benchmarks/bench_convert.py --size full
	test ! -f benchmarks/bench_lora.py || $(BIN)/python benchmarks/bench_lora.py
	test ! -f benchmarks/bench_sample.py || $(BIN)/python benchmarks/bench_sample.py
	test ! -f benchmarks/bench_export.py || $(BIN)/python benchmarks/bench_export.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py --size tiny --rounds 1 --skip-mecha

fuzz: $(STAMP)
	FUZZ_SECONDS=$${FUZZ_SECONDS:-120} $(BIN)/python -m pytest -q -m fuzz_long -o timeout=0 tests/test_fuzz_parsers.py tests/test_fuzz_atheris.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo-out bench-out
