# Two entry points, each doing all set-up itself: `make demo [VIDEO=...]` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VIDEO  ?= assets/examples/anchor_seated_hevc.mp4
NAME   ?= demo
PYTEST_ARGS ?=
# pytest-xdist workers, a test file at a time each, one compute thread each (tests/conftest.py); the templates tests
# copy are made once for all of them. Files are handed out longest first, by tests/durations.json (conftest's
# pytest_collection_modifyitems; `python -m tests.durations` remakes it from a `--durations=0` run), not by
# xdist's count of tests, which left the long end-to-end files to the end. 0 runs the suite in one process (as a
# debugger wants it).
TEST_WORKERS ?= 2

.PHONY: setup demo serve test test-fast lint constraints clean-state help

help:
	@echo "make demo [VIDEO=path/to/video.mp4] onboard the video (default: the example clip, assets/examples/) as '$(NAME)', train, render and report its held-out clip"
	@echo "make serve                          the browser UI and HTTP API on http://127.0.0.1:7860 over this workspace (after make demo: its '$(NAME)' identity; docs/service.md)"
	@echo "make test                           run the whole test suite (what CI runs)"
	@echo "make test-fast                      the edit loop: the suite without the tests marked slow"
	@echo "make lint                           ruff"
	@echo "make check-system                   the EGL/Mesa libraries the mesh renderer needs"
	@echo "make check-browser                  Debian's chromium, for the browser test (installed when root)"

setup: check-system $(STAMP)

# torch goes in first, with pip, so it takes the local CPU wheel instead of pulling CUDA packages (a plain `torch`
# requirement resolves to a CUDA build of several GB); then uv installs the rest at the pinned versions (about 25 s
# where pip took over 3 minutes: it resolves and unpacks in parallel). Nothing is byte-compiled up front: a module is
# compiled on its first import, once, and most of torch's never are.
# Then librosa's numba kernels are compiled once, here, into numba's cache: processes compiling one at the same
# moment (two test workers, Dask workers) can leave a mismatched cache that crashes every later process.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt "torch==2.13.0" uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "from models.speech import compile_audio_kernels as c; c()"
	@touch $(STAMP)

# System libraries pip cannot install: the condition renderer (models/render.py) needs headless OpenGL through EGL,
# with Mesa's software rasteriser as the fallback when there is no GPU driver. ldconfig first, then the usual dirs.
.PHONY: check-system
check-system:
	@ldc=$$(command -v ldconfig || echo /sbin/ldconfig); apt="apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri libgl1"; \
	have() { "$$ldc" -p 2>/dev/null | grep -q "^[[:space:]]*$$1 " && return 0; \
	  for f in /usr/lib/*/$$1 /usr/lib64/$$1 /usr/lib/$$1 /lib/*/$$1 /lib64/$$1; do test -e "$$f" && return 0; done; return 1; }; \
	status=0; \
	for pair in libEGL.so.1:libegl1 libEGL_mesa.so.0:libegl-mesa0 libGL.so.1:libgl1; do \
	  lib=$${pair%%:*}; have "$$lib" || { echo "missing $$lib: install the Debian package $${pair#*:} ($$apt)" >&2; status=1; }; \
	done; \
	dri=0; for f in /usr/lib/*/dri/swrast_dri.so /usr/lib64/dri/swrast_dri.so /usr/lib/dri/swrast_dri.so; do \
	  test -e "$$f" && dri=1; done; \
	"$$ldc" -p 2>/dev/null | grep -q "^[[:space:]]*libgallium" && dri=1; \
	test $$dri = 1 || { echo "missing Mesa's swrast DRI driver: install the Debian package libgl1-mesa-dri ($$apt)" >&2; status=1; }; \
	exit $$status

demo: check-system $(STAMP)
	@test -f "$(VIDEO)" || { echo "make demo: no such video: $(VIDEO) (usage: make demo [VIDEO=path/to/video.mp4] [NAME=demo])" >&2; exit 2; }
	$(BIN)/anchor onboard $(NAME) --video "$(VIDEO)"
	$(BIN)/anchor pretrain
	$(BIN)/anchor finetune $(NAME)
	$(BIN)/anchor render $(NAME) --motion $(NAME):test --out data/renders/$(NAME)-test.mp4
	@test -f data/reports/$(NAME)/report.html && echo "report: $(CURDIR)/data/reports/$(NAME)/report.html"

serve: check-system $(STAMP)
	$(BIN)/anchor serve

# The browser test (tests/service/test_ui_browser.py) drives Debian's chromium through Playwright, which never
# downloads a browser of its own: installed here when missing, where apt-get can (as root, as on CI).
.PHONY: check-browser
check-browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "missing chromium for the browser test: install the Debian package chromium (apt-get install chromium)" >&2; exit 1; fi; }

test: check-system check-browser $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: check-system $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-pin after a deliberate dependency change.
constraints: $(STAMP)
	{ echo "# Exact versions known to work together on the project machines. Regenerate with \`make constraints\`."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
