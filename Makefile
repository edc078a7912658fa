# Two commands for a fresh machine:  make run  |  make test   (each creates .venv when missing)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The torch pin lives in constraints.txt; install it first so that nothing else pulls a different build.
TORCH  := $(shell grep -E '^torch==' constraints.txt)
PYTEST_ARGS ?=

.PHONY: install run test bench gpu-wheels clean

install: $(STAMP)

# deepspeed is installed without build isolation: its setup.py must see the torch installed just before it.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e ".[train,hf,triton,mpi,test]"
	@touch $(STAMP)

# The embedded default through the deepspeed launcher: 2 CPU ranks (GPUs hidden), ZeRO-2 AdamHD, the nano model on
# Python's own sources (no download). Each run writes a new folder under runs/ (RUN_DIR=... to choose it).
RUN_DIR     ?= runs/embedded-$(shell date +%Y%m%d-%H%M%S)
# MASTER_PORT=... picks rank 0's port (default: the deepspeed launcher's own).
run: install
	CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 2 --master_addr 127.0.0.1 $(if $(MASTER_PORT),--master_port $(MASTER_PORT)) \
		launch/pretrain_gpt3.py --deepspeed ds_configs/zero2_adamhd.json --out-dir $(RUN_DIR)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# One run, every x86 ISA this CPU executes side by side (avx2, avx512; generic elsewhere), each against
# DeepSpeedCPUAdam built for the same ISA; writes bench/results/optimizer_step.json.
bench: install
	$(BIN)/python bench/optimizer_step.py --cpu-isa auto

# The GPU check (bench/gpu_check.sh) runs on a CUDA machine that has torch and triton but may not reach an index:
# this folder carries DeepSpeed (built here as a wheel) and the pure-Python packages it needs beyond those, for the
# GPU machine's Python ($(GPU_PY)). The versions are those the test suite runs with.
GPU_PY    ?= 3.12
GPU_WHEELS = hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
             einops==0.8.2 msgpack==1.2.4 psutil==7.2.2 py-cpuinfo==9.0.0 packaging==26.4 \
             $(shell grep -E '^(ninja|tqdm)==' constraints.txt)
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -c constraints.txt -w .whl deepspeed
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	@ls .whl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
