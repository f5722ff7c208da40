# Two entry points, each doing all set-up itself: `make demo VIDEO=...` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VIDEO  ?=
NAME   ?= demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint constraints clean-state help

help:
	@echo "make demo VIDEO=path/to/video.mp4   onboard the video as identity '$(NAME)' and print a summary"
	@echo "make test                           run the whole test suite"
	@echo "make lint                           ruff"

setup: $(STAMP)

# torch goes in first so pip takes the local CPU wheel instead of pulling CUDA packages (DESIGN §8).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	@test -n "$(VIDEO)" || { echo "usage: make demo VIDEO=path/to/video.mp4 [NAME=demo]" >&2; exit 2; }
	$(BIN)/anchor onboard $(NAME) --video "$(VIDEO)"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-pin after a deliberate dependency change.
constraints: $(STAMP)
	{ echo "# Exact versions known to work together on the project machines (DESIGN §8). Regenerate with \`make constraints\`."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
