# Every target bootstraps its own .venv (torch 2.13.0 first: the CPU wheel, no CUDA downloads).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-slow test-portable demo bench bench-quick fuzz lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow
	$(MAKE) test-portable

# The portability test mode (tests/portable/sitecustomize.py): the I/O, engine, LoRA, export and hardening suites
# again with os.pread/os.preadv/os.pwrite, signal.SIGHUP and glibc's symbols hidden, as on Windows/macOS.
PORTABLE_SUITES = tests/test_io_*.py tests/test_engine_*.py tests/test_lora_*.py tests/test_export*.py \
	tests/test_hardening_*.py tests/test_platform.py tests/test_layers.py
test-portable: $(STAMP)
	PYTHONPATH=tests/portable MERGEKIT_TEST_HIDE_POSIX=1 $(BIN)/python -m pytest -q $(PORTABLE_SUITES)

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
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-out bench-out
