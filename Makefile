# The two commands a new user runs: `make serve` and `make test`. Everything else they need is
# set up on the way (virtual environment, packages, the built-in checkpoints, the repository).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SIZE ?= small
DEVICES ?= 2
KIND ?= cpu
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PROTOCOL ?= http
MODE ?= hybrid
FAMILY ?= sdxl
PROMPT ?= a lighthouse on a cliff at sunset, oil painting
OUT ?= out/image.png
export HF_HUB_OFFLINE := 1
# python_backend first: a checkout (or git worktree) always runs its own hybridiff, whatever the venv has.
export PYTHONPATH := $(CURDIR)/python_backend:$(CURDIR)

.PHONY: setup serve test test-fast generate repository checkpoints lint clean bench loadtest train

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

checkpoints: checkpoints/sdxl-$(SIZE)/model_index.json checkpoints/sd3-$(SIZE)/model_index.json

# The trained shape models (docs/training.md): `make train FAMILY=sdxl` reproduces models/sdxl-shapes. Resumable:
# the state lives in checkpoints/train/FAMILY; run the same command again after a stop to continue.
TRAIN_STEPS_sdxl ?= 2464
TRAIN_STEPS_sd3 ?= 8000
TRAIN_ARGS_sd3 ?= --latent-mode mean
train: setup
	$(PY) -m train --family $(FAMILY) --size shapes --state checkpoints/train/$(FAMILY) \
		--out models/$(FAMILY)-shapes --steps $(TRAIN_STEPS_$(FAMILY)) $(TRAIN_ARGS_$(FAMILY))

# The served repository: both families (SDXL and SD3) side by side, SIZE=small on DEVICES=2 CPU cores by
# default (KIND=gpu for GPUs). SDXL_MODEL=models/sdxl-shapes serves the trained model instead (32x32 images).
SDXL_MODEL ?= checkpoints/sdxl-$(SIZE)
SD3_MODEL ?= checkpoints/sd3-$(SIZE)
repository: checkpoints
	$(PY) -m export.make_repository --out model_repository --model sdxl=$(SDXL_MODEL) \
		--model sd3=$(SD3_MODEL) --devices $(DEVICES) --kind $(KIND)

serve: repository
	$(PY) -m hybridiff.tritonserver --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not server"

generate: setup
	$(PY) -m client.generate --family $(FAMILY) --prompt "$(PROMPT)" --mode $(MODE) \
		--protocol $(PROTOCOL) --out $(OUT)

# Latency, speed-ups, efficiency, overhead, bytes moved and fidelity of every mode (small model, 50 steps).
bench: repository
	$(PY) -m client.bench --checkpoint-size $(SIZE) --repository model_repository --out out/bench

# Locust concurrency sweep (1, 2, 4, 8 users per mode and auto) against a server it starts on the small model.
loadtest: repository
	$(PY) -m loadtest.run --repository model_repository --out out/loadtest

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build out .pytest_cache
