# syntax=docker/dockerfile:1
# convserve: CNN image models served from ONNX Runtime by BentoML.
#
#   docker build -t convserve .        # trains the default LeNet-5, stores EfficientNet-Lite0 (ImageNet)
#   docker build --build-arg MODEL_SOURCE=dir --build-arg MODEL_DIR=build/store -t convserve .
#                                          # serves an exported store (a BENTOML_HOME's models/)
#   docker build --target gpu -t convserve:gpu .                  # CUDA / TensorRT providers
#   docker run --read-only --tmpfs /tmp -p 3000:3000 convserve
#
# Stages: source; base (python) -> model (trained, or copied from MODEL_DIR); deps (serving venv)
# -> runtime.
ARG BASE_IMAGE=debian:bookworm-slim
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# The sources every Python stage installs from, copied from the context once.
FROM scratch AS source
COPY pyproject.toml constraints.txt README.md /src/
COPY convserve /src/convserve
COPY models /src/models
COPY export /src/export
COPY service /src/service
COPY loadtest /src/loadtest

FROM ${BASE_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# --- the served model ---------------------------------------------------------------------
# One stage, the source chosen inside RUN: `FROM model-${MODEL_SOURCE}` is not resolved alike
# by every builder (buildah takes it for an image name), a shell `if` is.
FROM base AS model
ARG MODEL_SOURCE=train
# dir: a directory of exported models as the model store keeps them, <name>/<version>/...
ARG MODEL_DIR=convserve
# train: where pip finds the CPU build of torch (empty: pip's own configuration), and extra
# `convserve train` arguments (a quick smoke build: --epochs 2 --train-limit 6000).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TRAIN_ARGS=""
ENV BENTOML_HOME=/opt/convserve/bentoml BENTOML_DO_NOT_TRACK=true
COPY ${MODEL_DIR} /tmp/model-dir
COPY --from=source /src /src
WORKDIR /src
# hadolint ignore=SC2086
RUN set -eu; mkdir -p "$BENTOML_HOME/models"; \
    case "$MODEL_SOURCE" in \
    dir) cp -r /tmp/model-dir/. "$BENTOML_HOME/models/" ;; \
    train) \
      apt-get update; \
      apt-get install -y --no-install-recommends dataset-fashion-mnist; \
      rm -rf /var/lib/apt/lists/*; \
      python3 -m venv /opt/train; \
      /opt/train/bin/pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
        -c constraints.txt "torch==2.13.0"; \
      /opt/train/bin/pip install -c constraints.txt ".[train]"; \
      /opt/train/bin/convserve train lenet5 --out /tmp/run $TRAIN_ARGS; \
      /opt/train/bin/convserve export /tmp/run/best.pt --output /tmp/run/model.onnx \
        --name fashion-lenet5; \
      /opt/train/bin/convserve prepare imagenet-efficientnet-lite0 ;; \
    *) echo "MODEL_SOURCE must be train or dir, not $MODEL_SOURCE" >&2; exit 1 ;; \
    esac; \
    rm -rf /tmp/model-dir /src/runs; \
    ls "$BENTOML_HOME"/models/*/latest >/dev/null  # at least one model; all are served

# --- serving dependencies, no torch, no compilers in the final image ------------------------
FROM base AS deps
WORKDIR /src
COPY --from=source /src ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt . \
 && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None" \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools

# --- load generator for compose.yaml: locust + the test images, no torch ---------------------
FROM base AS loadtest
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY --from=source /src ./
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install -c constraints.txt ".[loadtest]"
USER 10001
ENTRYPOINT ["/opt/venv/bin/locust", "-f", "loadtest/locustfile.py"]

# --- GPU variant: CUDA runtime base, onnxruntime-gpu (build with --target gpu) --------------
FROM ${CUDA_BASE_IMAGE} AS gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin convserve \
 && mkdir -p /opt/convserve/bentoml/bentos /opt/convserve/bentoml/envs /opt/convserve/bentoml/tmp
WORKDIR /src
COPY --from=source /src ./
# onnxruntime-gpu replaces the CPU wheel (both provide the onnxruntime module).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install ".[gpu]" \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.22" \
 && rm -rf /src
WORKDIR /
COPY --from=model /opt/convserve/bentoml/models /opt/convserve/bentoml/models
# The store writes its files owner-only; the server's user must read, never write, them.
RUN chmod -R a+rX,go-w /opt/convserve/bentoml/models
ENV PATH=/opt/venv/bin:$PATH \
    BENTOML_HOME=/opt/convserve/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    PYTHONUNBUFFERED=1 \
    CONVSERVE_MODELS=* \
    CONVSERVE_PROVIDERS=tensorrt,cuda,cpu
USER 10001
# 3000: HTTP (REST and the Open Inference Protocol); 8001: the Open Inference Protocol over gRPC
EXPOSE 3000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2)"]
CMD ["bentoml", "serve", "convserve.service.app:Classifier", "--host", "0.0.0.0", "--port", "3000"]

# --- runtime (the default target: last) ------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin convserve \
 && mkdir -p /opt/convserve/bentoml/bentos /opt/convserve/bentoml/envs /opt/convserve/bentoml/tmp
COPY --from=deps /opt/venv /opt/venv
COPY --from=model /opt/convserve/bentoml/models /opt/convserve/bentoml/models
# The store writes its files owner-only; the server's user must read, never write, them.
RUN chmod -R a+rX,go-w /opt/convserve/bentoml/models
# Nothing the server writes lives outside /tmp, so the root filesystem may be read-only (BentoML
# only checks that its home's folders exist; they are made above, owned by root).
ENV PATH=/opt/venv/bin:$PATH \
    BENTOML_HOME=/opt/convserve/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    CONVSERVE_MODELS=*
USER 10001
# 3000: HTTP (REST and the Open Inference Protocol); 8001: the Open Inference Protocol over gRPC
EXPOSE 3000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2)"]
CMD ["bentoml", "serve", "convserve.service.app:Classifier", "--host", "0.0.0.0", "--port", "3000"]
