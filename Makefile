# Two commands do all set-up: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/test.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints/test.txt -e ".[dev,phi4mm]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	@echo "make demo will synthesize a spoken-meetings corpus (espeak-ng), then run SFT -> on-policy KD -> DPO"
	@echo "on CPU with the same entry points as the A100 recipes, and print the judge-score table."
	@echo "Not available yet: the toy world (data/toy) and the stage recipes (train/) have not landed."
	@echo "What works today: make test (decoder, LoRA and checkpoint parity with transformers), make bench."
	@exit 2

BENCHES := decoder features long_audio sampler train_step kd_loss

bench: $(STAMP)
	@for name in $(BENCHES); do echo "== bench/$$name.py"; $(PY) bench/$$name.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
