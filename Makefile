# `make demo` and `make test` do all set-up on a fresh machine that has only Python.
PYTHON ?= python3
# Installed only when no torch is present. Never an unpinned torch: on a CPU machine that
# would download a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Where make installs when $(PYTHON) is not in a virtual or conda environment: a stock
# Debian/Ubuntu python3 refuses `pip install` (externally-managed-environment), and make should
# not install into a shared interpreter anyway. See scripts/python_env.py.
VENV ?= .venv

.PHONY: setup build test test-long demo bench clean distclean FORCE

# PY: the interpreter every recipe runs ($(PYTHON) itself inside an environment, else
# $(VENV)/bin/python); EXT_SUFFIX: its extension suffix; BUILD_STATE: "stale" when the build in
# the tree is not installed in PY or was made against another torch. The query creates nothing
# (make -n runs it); the clean targets need no Python.
ifneq ($(filter-out clean distclean,$(or $(MAKECMDGOALS),setup)),)
ENV_INFO := $(shell $(PYTHON) scripts/python_env.py --venv $(VENV))
ifneq ($(words $(ENV_INFO)),3)
$(error cannot run "$(PYTHON) scripts/python_env.py" (got "$(ENV_INFO)"): is Python 3 installed? Pass PYTHON=/path/to/python3)
endif
PY := $(word 1,$(ENV_INFO))
EXT_SUFFIX := $(word 2,$(ENV_INFO))
BUILD_STATE := $(word 3,$(ENV_INFO))
endif

# The compiled library, built in place by the editable install below.
EXT := fbfast/_C$(EXT_SUFFIX)
EXT_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

setup:
	@$(PYTHON) scripts/python_env.py --venv $(VENV) --python-name "$(PYTHON)" --create
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -r requirements-dev.txt
	@$(PY) -m pip install -q -r requirements-examples.txt || echo "make: the examples' requirements (requirements-examples.txt) did not install; their tests skip and examples/halfcheetah_dynamics.py and sunspots_narx.py cannot run"

# Editable install: the compiled fbfast/_C*.so lands in the source tree, so tests and examples
# run from here import the same build. --no-build-isolation links against the installed torch.
build: $(EXT)
	@$(PY) -c "import fbfast; [print(s) for s in fbfast.backends().values()]"

# Rebuilt only when a source changed (a full rebuild takes ~60 s on 2 cores), or when
# scripts/python_env.py finds the build stale for PY. setup is order-only: it always runs but
# does not by itself make the library out of date. pip may leave an up-to-date library
# untouched, hence the touch (-c: never create an empty one if the build made none).
$(EXT): $(EXT_SOURCES) | setup
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch -c $@

ifeq ($(BUILD_STATE),stale)
$(EXT): FORCE
endif
FORCE:

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-long: build
	$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

# The main job: learn MuJoCo HalfCheetah's dynamics with an ensemble of delta models, trained
# through 10-step rollouts by the per-step loop and by fbfast side by side (time per epoch,
# speedup, open-loop error against the horizon for a one-step versus the multi-step loss,
# out/halfcheetah.png); then a NARX model of the sunspot numbers (out/sunspots.png), the
# pendulum (out/pendulum.png), the drop-in, streaming and seed examples, and a quick benchmark
# table. requirements-examples.txt (installed by setup) has the simulator and the data.
demo: build
	$(PY) examples/halfcheetah_dynamics.py --quick --out out
	$(PY) examples/sunspots_narx.py --quick --out out
	$(PY) examples/train_pendulum.py --out out
	$(PY) examples/drop_in.py
	$(PY) examples/streaming.py
	$(PY) examples/seed_two_networks.py
	$(PY) examples/seed_in_step.py
	$(PY) examples/seed_delayed.py
	$(PY) -m benchmarks.report --quick

bench: build
	$(PY) -m benchmarks.report --json benchmarks/results/cpu_report.json
	$(PY) -m benchmarks.sweep --out benchmarks/results

# Keeps $(VENV): recreating it reinstalls torch.
clean:
	rm -rf build dist *.egg-info fbfast/_C*.so fbfast/_build_info.py .pytest_cache .benchmarks

distclean: clean
	rm -rf $(VENV)
