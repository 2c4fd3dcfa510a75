# The two commands of the README: `make demo` (the main job) and `make check` (the test suite).
PY ?= python3

.PHONY: setup demo check lint test fuzz bench

setup:
	bash tools/setup.sh

demo: setup
	$(PY) -m virtwire vm --demo

lint:
	$(PY) -m ruff check src tests tools

test:
	$(PY) -m pytest -q

check: setup lint test

fuzz:
	$(PY) -m virtwire fuzz --cases 1000000
	$(PY) -m virtwire fuzz --target vhost-user --cases 1000000
	$(PY) -m virtwire fuzz --target pci-proxy --cases 1000000
	$(PY) -m virtwire fuzz --target net --cases 1000000
