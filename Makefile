# Shortcuts; README.md has the two canonical commands.
PY ?= python3

.PHONY: install test test-fast demo bench bench-gda

install:
	$(PY) -m pip install torch==2.13.0 -e '.[test]'
	$(PY) -m pip install --no-deps vos-benchmark==0.1.0

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

demo:
	$(PY) tools/demo.py

bench:
	$(PY) tools/benchmark.py --model deaott --local_impl ours dense --lt_frames 1 --frames 5 --threads 2

bench-gda:
	$(PY) tools/benchmark.py --model deaott deaott_gda --gda_grid 1 2 4 --lt_frames 1 5 20 --frames 3 --threads 2
