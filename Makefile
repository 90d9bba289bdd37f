# `make demo` and `make test` each set everything up from scratch on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
DEEPSPEED_VERSION := 0.19.8
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench gpu-wheels clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	@# libaio-dev: DeepSpeed's async I/O op; gcc/g++: that op, CPU Adam and the fused quantize kernels.
	@if ! dpkg -s libaio-dev >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev gcc g++ >/dev/null) \
	      || echo "libaio-dev/gcc could not be installed: NVMe I/O, CPU Adam and quantize kernels fall back to Python/torch"; \
	  else echo "libaio-dev/gcc missing and apt-get unavailable: NVMe I/O, CPU Adam and quantize kernels fall back to Python/torch"; fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	# DeepSpeed's setup imports torch, so it builds against the torch installed above.
	$(PIP) install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) install -q -e ".[dev,hf,offload,tensorboard]"
	@# Compile DeepSpeed's CPU Adam and libaio ops now (cached in ~/.cache/torch_extensions), not
	@# inside the first training step or test; a failure only means the Python fallbacks run.
	$(PY) -m stalwart.offload.ops
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stalwart demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check stalwart tests bench
	$(VENV)/bin/ruff format --check stalwart tests bench

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b --json runs/bench/$$(basename $$b .py).json || exit 1; done

# Wheels of what PyTorch images usually lack, for bench/gpu_check.sh on a machine without network.
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  --python-version $(GPU_PYTHON_VERSION) --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

clean:
	rm -rf $(VENV) runs .pytest_cache
