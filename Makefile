# Each target builds its own virtual environment (torch pinned through constraints.txt), installs, then runs.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint benchmark benchmark-setokim

$(VENV)/.installed-%: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/setok demo --out setok-demo

test: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests scripts

benchmark: $(VENV)/.installed-dev
	$(VENV)/bin/python scripts/benchmark_tokenizer.py --out benchmark-out

benchmark-setokim: $(VENV)/.installed-dev
	$(VENV)/bin/python scripts/benchmark_setokim.py --threads 1 --tokens-per-image 64 --out benchmark-out
