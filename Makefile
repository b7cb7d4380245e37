# Two commands do all set-up: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo toy-corpus pretrain-toy bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/test.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints/test.txt -e ".[dev,phi4mm,demo]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

TOY_PRESET ?= demo

demo: $(STAMP)
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq espeak-ng; } \
	  || { echo "make demo needs espeak-ng: apt-get install espeak-ng (or brew install espeak-ng)"; exit 2; }
	@echo "make demo will synthesize a spoken-meetings corpus (espeak-ng), then run SFT -> on-policy KD -> DPO"
	@echo "on CPU with the same entry points as the A100 recipes, and write results/toy/REPORT.md."
	@echo "Not available yet: the toy pre-training stage does not reach a usable speech alignment on CPU and the"
	@echo "orchestration (data/toy/demo.py) has not landed. What runs today: make toy-corpus, make pretrain-toy,"
	@echo "then python -m train.sft|kd|dpo --config configs/toy/demo_*.toml and python -m eval.run --judge oracle."
	@exit 2

toy-corpus: $(STAMP)
	$(PY) -m data.toy.corpus --preset $(TOY_PRESET)

pretrain-toy: toy-corpus
	$(PY) -m data.toy.pretrain --corpus cache/toy/$(TOY_PRESET) --out cache/toy/models

BENCHES := decoder features long_audio sampler train_step kd_loss

bench: $(STAMP)
	@for name in $(BENCHES); do echo "== bench/$$name.py"; $(PY) bench/$$name.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
