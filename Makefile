# The two commands a new user runs: `make serve` and `make test`. Everything else they need is
# set up on the way (virtual environment, packages, the built-in checkpoints, the repository).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The built-in models (SIZE=shapes): the trained shape models where a family has one (docs/training.md), else the
# random `small` checkpoint. SIZE=small or SIZE=tiny serves the random checkpoints of that size for both families.
SIZE ?= shapes
TRAINED_sdxl := models/sdxl-shapes
TRAINED_sd3 := models/sd3-shapes
builtin = $(if $(filter shapes,$(SIZE)),$(or $(TRAINED_$(1)),checkpoints/$(1)-small),checkpoints/$(1)-$(SIZE))
SDXL_MODEL ?= $(call builtin,sdxl)
SD3_MODEL ?= $(call builtin,sd3)
# Speed measurements (make bench's latencies, the load tests of issue 11: SDXL small, 256 px) stay on the random
# checkpoints of this size: a 64x64 shape model's steps are too short to measure anything but overhead.
SPEED_SIZE ?= small
DEVICES ?= 2
KIND ?= cpu
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# Address HTTP, gRPC and metrics listen on: this machine only, unless told (LISTEN=0.0.0.0 in a container).
LISTEN ?= 127.0.0.1
# The admin key (logging, trace, shared-memory and model-repository APIs) is HYBRIDIFF_ADMIN_KEY if set,
# else generated at start; either way written here, readable by its owner only (docs/operations.md).
ADMIN_KEY_FILE ?= build/admin-key
CHAOS_ROUNDS ?= 2
CHAOS_USERS ?= 4
# The repository make chaos serves: the built-in models (make speed-repository for the random small ones).
CHAOS_REPOSITORY ?= model_repository
SOAK_REQUESTS ?= 4300
SOAK_WARMUP ?= 3300
SOAK_SIZE ?= tiny
PROTOCOL ?= http
MODE ?= hybrid
FAMILY ?= sdxl
PROMPT ?= a red circle on the left
OUT ?= out/image.png
# Admission (docs/overload.md): requests that may wait per family, their start deadline, the orchestrator gate.
QUEUE_SIZE ?= 4
START_TIMEOUT_US ?= 60000000
MAX_PER_DEVICE ?= 0
# 1: refuse at once a request that cannot finish within its timeout on the current load (docs/overload.md).
ADMIT_BY_DEADLINE ?= 1
export HF_HUB_OFFLINE := 1
# python_backend first: a checkout (or git worktree) always runs its own hybridiff, whatever the venv has.
export PYTHONPATH := $(CURDIR)/python_backend:$(CURDIR)

.PHONY: setup serve test test-fast generate repository checkpoints lint clean bench loadtest loadtest-open \
	gpu-check gpu-wheels chaos ready train soak speed-repository

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

checkpoints/sdxl-%/model_index.json: | setup
	$(PY) -m export.build_checkpoint --family sdxl --size $* --out checkpoints/sdxl-$*

checkpoints/sd3-%/model_index.json: | setup
	$(PY) -m export.build_checkpoint --family sd3 --size $* --out checkpoints/sd3-$*

checkpoints: $(SDXL_MODEL)/model_index.json $(SD3_MODEL)/model_index.json

# The trained shape models (docs/training.md): `make train FAMILY=sdxl` reproduces models/sdxl-shapes. Resumable:
# the state lives in checkpoints/train/FAMILY; run the same command again after a stop to continue.
TRAIN_STEPS_sdxl ?= 2000
TRAIN_STEPS_sd3 ?= 1916
TRAIN_ARGS_sdxl ?= --mislabel 0.3
TRAIN_ARGS_sd3 ?= --latent-mode mean --mislabel 0.3
train: setup
	$(PY) -m train --family $(FAMILY) --size shapes --state checkpoints/train/$(FAMILY) \
		--out models/$(FAMILY)-shapes --steps $(TRAIN_STEPS_$(FAMILY)) $(TRAIN_ARGS_$(FAMILY))

# The served repository: both families (SDXL and SD3) side by side, the built-in models on DEVICES=2 CPU cores by
# default (KIND=gpu for GPUs); SDXL_MODEL / SD3_MODEL (set at the top) name any other checkpoint folder.
make_repository = $(PY) -m export.make_repository --out $(1) --model sdxl=$(2) --model sd3=$(3) \
	--devices $(DEVICES) --kind $(KIND) \
	--queue-size $(QUEUE_SIZE) --start-timeout-us $(START_TIMEOUT_US) --max-per-device $(MAX_PER_DEVICE) \
	$(if $(filter 0,$(ADMIT_BY_DEADLINE)),--no-admit-by-deadline,--admit-by-deadline)
repository: setup checkpoints
	$(call make_repository,model_repository,$(SDXL_MODEL),$(SD3_MODEL))

# The repository the speed measurements serve: the random SPEED_SIZE checkpoints of both families.
SPEED_REPOSITORY := build/speed-repository
speed-repository: setup checkpoints/sdxl-$(SPEED_SIZE)/model_index.json checkpoints/sd3-$(SPEED_SIZE)/model_index.json
	$(call make_repository,$(SPEED_REPOSITORY),checkpoints/sdxl-$(SPEED_SIZE),checkpoints/sd3-$(SPEED_SIZE))

serve: repository
	$(PY) -m hybridiff.tritonserver --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		--listen $(LISTEN) --admin-key-file $(ADMIN_KEY_FILE)

# Readiness probe (exit 0 only while the server and every model of the repository are ready).
ready:
	$(PY) -m hybridiff.readiness --model-repository model_repository --url 127.0.0.1:$(HTTP_PORT)

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not server"

generate: setup
	$(PY) -m client.generate --family $(FAMILY) --prompt "$(PROMPT)" --mode $(MODE) \
		--protocol $(PROTOCOL) --out $(OUT)

# Latency, speed-ups, efficiency, overhead, bytes moved of every mode on the SPEED_SIZE models (50 steps, 512 px),
# then fidelity and prompt adherence per mode, tau sources and the k ablation on the trained models (and, for SD3,
# the reference code's frozen stage-1 feed against the correct one).
bench: speed-repository
	$(PY) -m bench --checkpoint-size $(SPEED_SIZE) --repository $(SPEED_REPOSITORY) --out out/bench
	$(PY) -m bench.fidelity --family sdxl --checkpoint $(SDXL_MODEL) --random checkpoints/sdxl-$(SPEED_SIZE) \
		--out out/bench/fidelity-sdxl
	$(PY) -m bench.fidelity --family sd3 --checkpoint $(SD3_MODEL) --random checkpoints/sd3-$(SPEED_SIZE) \
		--frozen-feed --out out/bench/fidelity-sd3

# Locust concurrency sweep (1, 2, 4, 8 users per mode and auto) against a server it starts on the SPEED_SIZE models.
loadtest: speed-repository
	$(PY) -m loadtest.run --repository $(SPEED_REPOSITORY) --out out/loadtest

# Open-loop SLO test (Poisson and bursty arrivals at 0.2-1.5x the serial capacity, every mode, ABBA halves).
loadtest-open: speed-repository
	$(PY) -m loadtest.openloop --repository $(SPEED_REPOSITORY) --out out/openloop

# GPU check: in-process parity on CUDA fp16 and the real server on a KIND_GPU repository (docs/deploy.md).
# Without CUDA it reports those parts as skipped and runs the in-process checks on CPU instead. On a GPU
# machine without this venv it uses python3 and, if diffusers/tritonclient/pytriton are missing, installs
# the wheels `make gpu-wheels` put in $(GPU_WHEELS) into build/gpu-site (never into that Python).
GPU_WHEELS ?= gpu-wheels
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	@if ! $(GPU_PYTHON) -c "import diffusers, tritonclient.http, pytriton" 2>/dev/null && ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
		echo "installing $(GPU_WHEELS)/*.whl into build/gpu-site"; \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target build/gpu-site $(GPU_WHEELS)/*.whl; \
	fi
	HF_HUB_OFFLINE=1 PYTHONPATH=$(PYTHONPATH):$(CURDIR)/build/gpu-site $(GPU_PYTHON) -m tools.gpu_check $(GPU_CHECK_ARGS)

# The wheels gpu-check needs on a GPU machine without internet (prints the folder's size; not committed).
gpu-wheels: setup
	$(PY) -m tools.gpu_wheels --out $(GPU_WHEELS)

# Fault injection under a mixed load of both families: kills every kind of stub CHAOS_ROUNDS times and
# writes out/chaos/chaos.{md,csv} (faults, requests, failures by reason, time to recover per fault).
chaos: repository
	$(PY) -m loadtest.chaos --repository $(CHAOS_REPOSITORY) --devices $(DEVICES) --rounds $(CHAOS_ROUNDS) \
		--users $(CHAOS_USERS) --out out/chaos

# Soak: SOAK_REQUESTS requests of both families, every mode, mixed sizes, HTTP and gRPC, on the SOAK_SIZE
# checkpoints; writes out/soak/soak.{md,csv} with each process's RSS after SOAK_WARMUP requests and at the end
# (tritonserver's memory fills over its first thousand or so requests: docs/soak.md).
soak: setup
	$(PY) -m loadtest.soak --size $(SOAK_SIZE) --requests $(SOAK_REQUESTS) --warmup $(SOAK_WARMUP) --out out/soak

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build out .pytest_cache
