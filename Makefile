# cp_attention: `make test` (CI), `make demo` (the main job), `make bench` (CPU kernel benchmark), `make setup`
# (what they all run first).
PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
DEPS_STAMP  := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES     := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=
# `make demo DEMO_RANKS=2 DEMO_ARGS="--steps 2"`: see `python -m cp_attention.pipeline_demo --help`;
# `make demo-step DEMO_ARGS="--train"`: see `python -m cp_attention.demo --help`.
DEMO_RANKS  ?= 4
DEMO_ARGS   ?=

.PHONY: setup build test demo demo-step bench clean lint

setup: $(BUILD_STAMP)

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install -r requirements-dev.txt
	touch $@

# The extension rebuilds when a kernel source or the build script changes; ninja recompiles only what changed.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES) setup.py pyproject.toml
	@mkdir -p build
	@echo "building cp_attention._C (log: build/build.log)"
	@$(PIP) install --no-build-isolation --no-deps -e . -v > build/build.log 2>&1 \
		|| (tail -n 60 build/build.log; echo "build failed: see build/build.log"; exit 1)
	$(PY) -c "import cp_attention, json; print(json.dumps(cp_attention.build_info()))"
	touch $@

build: $(BUILD_STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Whole pipelines (FLUX; Qwen-Image with true CFG), single-process and parallel (ring, Ulysses, Unified, data,
# CFG), checked, timed and saved as PNG in demo_out/; gloo on CPUs, NCCL on GPUs. --standalone picks a free port.
demo: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(DEMO_RANKS) -m cp_attention.pipeline_demo $(DEMO_ARGS)

# One FLUX-shaped transformer step (or training step with --train), single-process and context-parallel, with
# diffusers' native Ulysses beside ours.
demo-step: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(DEMO_RANKS) -m cp_attention.demo $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/bench_flash_fwd.py

lint: setup
	$(PY) -m ruff check cp_attention tests benchmarks setup.py

clean:
	rm -rf build *.egg-info cp_attention/_C*.so $(BUILD_STAMP)
