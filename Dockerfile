# The serving image: the official Triton container of the release that the nvidia-pytriton wheel bundles
# (tritonserver 2.51 = 24.10), with CUDA torch and this package installed at build time, not at start.
#
#   docker build -t hybridiff-serving .
#   docker run --gpus all --shm-size=8g -p 8000-8002:8000-8002 -v /models:/models:ro \
#       -e HYBRIDIFF_MODELS=sdxl=/models/stable-diffusion-xl-base-1.0 hybridiff-serving
#
# docs/deploy.md explains every choice; tests/test_deploy.py checks this file offline.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The image's Python is 3.10 and diffusers 0.42 needs >= 3.11: add 3.12 (with its shared libpython,
# which the Python backend stub links) and serve from a venv of it. The stub for 3.12 comes from the
# nvidia-pytriton wheel (same release as the image's backend); binary and backend from /opt/tritonserver.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /opt/hybridiff
COPY requirements.txt pyproject.toml ./
# torch: the version pinned in requirements.txt, CUDA build. The default index's Linux wheel of torch 2.13.0
# is built for CUDA 13.0 (driver >= 580); for an older driver pass --build-arg TORCH_INDEX_URL=<PyTorch's
# index for your CUDA version> if that index has the version. Empty: pip's default index.
ARG TORCH_INDEX_URL=
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      "$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)" \
 && grep -vE '^(torch|locust|pytest|ruff|matplotlib|kubernetes-validate)==' requirements.txt > /tmp/serve-requirements.txt \
 && python -m pip install --no-cache-dir -r /tmp/serve-requirements.txt

COPY python_backend python_backend
COPY export export
COPY deploy deploy
RUN python -m pip install --no-cache-dir --no-deps . \
 && python -c "import hybridiff.tritonserver, deploy.entrypoint, hybridiff.probe"

# export/ and deploy/ run from the source tree; hybridiff is installed in the venv, where the stubs import it.
ENV PYTHONPATH=/opt/hybridiff \
    HF_HUB_OFFLINE=1 \
    HYBRIDIFF_KIND=gpu \
    HYBRIDIFF_DEVICES=2 \
    HYBRIDIFF_SERVER_ROOT=/opt/tritonserver \
    HYBRIDIFF_REPOSITORY=/tmp/model_repository \
    HYBRIDIFF_BACKEND_DIR=/tmp/triton_backends
EXPOSE 8000 8001 8002
ENTRYPOINT ["python", "-m", "deploy.entrypoint"]
