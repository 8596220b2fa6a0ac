# Each target builds its own virtual environment, installs, then runs. The stack is pinned: constraints.txt holds the
# tested versions (the top of each range in pyproject.toml), constraints-oldest.txt the bottom of each range.
PYTHON ?= python3
VENV ?= .venv
QUIET = -q --disable-pip-version-check

.PHONY: demo test test-oldest test-latest lint benchmark benchmark-setokim

$(VENV)/.installed-%: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(QUIET) -c constraints.txt torch==2.13.0
	$(VENV)/bin/python -m pip install $(QUIET) -c constraints.txt -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/setok demo --out setok-demo

# DeepSpeed compiles a small C++ op at its first launch (about a minute): built once per environment, kept in it.
test: $(VENV)/.installed-dev
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(VENV)/bin/python -m pytest -q

# The oldest supported versions (transformers 5.23.0 and the lower bound of every other range), in their own venv.
.venv-oldest/.installed: pyproject.toml constraints-oldest.txt
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install $(QUIET) -c constraints-oldest.txt torch==2.13.0
	.venv-oldest/bin/python -m pip install $(QUIET) -c constraints-oldest.txt -e ".[dev]"
	touch $@

test-oldest: .venv-oldest/.installed
	TORCH_EXTENSIONS_DIR=$(abspath .venv-oldest)/torch_extensions .venv-oldest/bin/python -m pytest -q

# The newest releases of the stack, past the upper bounds (pip warns that they are outside the ranges): run this
# before raising a bound, then raise it and the pins together.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	echo "torch==2.13.0" > .venv-latest/torch.txt
	.venv-latest/bin/python -m pip install $(QUIET) -c .venv-latest/torch.txt torch==2.13.0
	.venv-latest/bin/python -m pip install $(QUIET) -c .venv-latest/torch.txt -e ".[dev]"
	.venv-latest/bin/python -m pip install $(QUIET) -c .venv-latest/torch.txt -U \
		transformers trl peft accelerate diffusers datasets huggingface_hub
	.venv-latest/bin/python -m pip list | grep -i -E "^(transformers|trl|peft|accelerate|diffusers|datasets|huggingface)"
	TORCH_EXTENSIONS_DIR=$(abspath .venv-latest)/torch_extensions .venv-latest/bin/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests scripts

benchmark: $(VENV)/.installed-dev
	$(VENV)/bin/python scripts/benchmark_tokenizer.py --out benchmark-out

benchmark-setokim: $(VENV)/.installed-dev
	$(VENV)/bin/python scripts/benchmark_setokim.py --threads 1 --tokens-per-image 64 --out benchmark-out
