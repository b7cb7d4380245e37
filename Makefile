# Two commands do all set-up: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# make demo installs only what the demo needs (no transformers, peft, tensorboard, pytest): a minute less
DEMO_STAMP := $(VENV)/.installed-demo
# transformers 4.x in its own environment: the tests load our checkpoints with both majors
TF4_VENV := .venv-tf4
TF4_STAMP := $(TF4_VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo toy-corpus pretrain-toy bench clean

setup: $(STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PY) -m pip install --quiet -c constraints/test.txt -e ".[dev,phi4mm,demo]"
	touch $(STAMP)

$(DEMO_STAMP): setup.py constraints/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/test.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints/test.txt -e ".[demo]"
	touch $(DEMO_STAMP)

$(TF4_STAMP): constraints/test.txt
	test -x $(TF4_VENV)/bin/python || $(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -m pip install --quiet -c constraints/test.txt torch==2.13.0 "transformers==4.57.6" \
	  safetensors numpy
	touch $(TF4_STAMP)

test: $(STAMP) $(TF4_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

TOY_PRESET ?= demo

DEMO_ARGS ?=

# The whole method on the toy world (toy/demo.py): results/toy/REPORT.md, results.json, results.png.
demo: $(DEMO_STAMP)
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq espeak-ng; } \
	  || { echo "make demo needs espeak-ng: apt-get install espeak-ng (or brew install espeak-ng)"; exit 2; }
	$(PY) -m toy.demo $(DEMO_ARGS)

toy-corpus: $(DEMO_STAMP)
	$(PY) -m toy.corpus --preset $(TOY_PRESET)

pretrain-toy: toy-corpus
	$(PY) -m toy.pretrain --corpus cache/toy/$(TOY_PRESET) --out toy/checkpoints

BENCHES := decoder features long_audio sampler train_step kd_loss

bench: $(STAMP)
	@for name in $(BENCHES); do echo "== bench/$$name.py"; $(PY) bench/$$name.py || exit 1; done

clean:
	rm -rf $(VENV) $(TF4_VENV) .pytest_cache
