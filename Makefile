# `make demo` and `make test` do all set-up on a fresh machine that has only Python.
PYTHON ?= python3
# Installed only when no torch is present. Never an unpinned torch: on a CPU machine that
# would download a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup build test test-long demo bench clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	@$(PYTHON) -m pip install -q -r requirements-dev.txt

# Editable install: the compiled fbfast/_C*.so lands in the source tree, so tests and examples
# run from here import the same build. --no-build-isolation links against the installed torch.
build: setup
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	@$(PYTHON) -c "import fbfast; [print(s) for s in fbfast.backends().values()]"

test: build
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

test-long: build
	$(PYTHON) -m pytest tests -m slow $(PYTEST_ARGS)

# The main job: train a FeedbackMLP on a simulated pendulum with the seed-style loop and with
# fbfast side by side (losses, time per epoch, speedup, out/pendulum.png), then the drop-in,
# streaming and seed examples, and a quick benchmark table.
demo: build
	$(PYTHON) examples/train_pendulum.py --out out
	$(PYTHON) examples/drop_in.py
	$(PYTHON) examples/streaming.py
	$(PYTHON) examples/seed_two_networks.py
	$(PYTHON) examples/seed_in_step.py
	$(PYTHON) examples/seed_delayed.py
	$(PYTHON) -m benchmarks.report --quick

bench: build
	$(PYTHON) -m benchmarks.report --json benchmarks/results/cpu_report.json
	$(PYTHON) -m benchmarks.sweep --out benchmarks/results

clean:
	rm -rf build *.egg-info fbfast/_C*.so .pytest_cache .benchmarks
