# Everything is set up into a local virtual environment (.venv) on first use; idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on GPU machines install the CUDA build you need before `make`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup smoke test lint bench gpu-wheels clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# mpi4py (extra "mpi") is a binary wheel; it loads the system's MPI library at run time.
	$(PY) -m pip install --quiet -e ".[test,mpi]"
	touch $(STAMP)

smoke: setup
	rm -rf runs/smoke
	$(PY) -m pretrain.launch --standalone --nproc-per-node 2 -m pretrain.train --config configs/smoke.yaml

# Unit and HF tests (single-process, mostly interpreter start-up) run on two workers; the
# multi-rank, launcher and SLURM tests, which use both cores themselves, run one at a time after them.
# Both parts always run; the target fails if either failed.
test: setup
	$(PY) -m pytest tests/unit tests/hf -q -n 2 --durations=15; a=$$?; \
	$(PY) -m pytest tests -q --ignore=tests/unit --ignore=tests/hf --durations=40; b=$$?; \
	test $$a -eq 0 && test $$b -eq 0

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m benchmarks.run

# Wheels that benchmarks/gpu_check.sh installs on a GPU machine without network access (the
# machine's Python version: GPU_PYTHON_VERSION). Carry .whl/ with the tree.
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
	    --python-version $(GPU_PYTHON_VERSION) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	    "megatron-core==$$($(PY) -c 'import megatron.core; print(megatron.core.__version__)')"

clean:
	rm -rf $(VENV) runs *.egg-info .whl
