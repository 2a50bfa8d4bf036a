# syntax=docker/dockerfile:1
# Lightray images: one application stage on one of two bases (README "Deploy on Kubernetes"):
#   make image       → VARIANT=gpu: CUDA torch, for the pods of k8s/rayservice.yaml and k8s/rayjob-train-lora.yaml
#   make image-cpu   → VARIANT=cpu: CPU torch, the embedded model (configs/serve/local.yaml)
# Both bases are the rayproject/ray image of the cluster's Ray version and Python (tags read
# <ray version>-py<python>-<cuXYZ | cpu>), so the Ray in the image is the cluster's Ray. The repository is installed
# editable at /app: presets, configs/ and models/ resolve against it (lightray/config.py REPO_ROOT).
ARG RAY_VERSION=2.60.0
ARG VARIANT=gpu
# One CUDA for the GPU base image's tag and torch's wheel index (both name it cuXYZ); change both with
# --build-arg CUDA=… if the cluster's driver or PyTorch's index asks for another.
ARG CUDA=cu128

FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA} AS base-gpu
ARG CUDA
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/${CUDA}

FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS base-cpu
# torch's CPU build: no CUDA libraries (as the Makefile's venv).
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# One of the two tagged stages above, chosen by VARIANT (hadolint cannot resolve a stage name from an ARG).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS app
ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
# /app belongs to the image's `ray` user (uid 1000, group `users` 100 in rayproject/ray): the editable install
# writes its metadata there.
USER 0
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app
# torch first, from its own index, so the package install below keeps it instead of pulling another build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users lightray lightray
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users serve_app serve_app
COPY --chown=ray:users jobs jobs
# The base image's Ray satisfies `ray[serve,train]`; the constraint turns a mismatch into an error, not an upgrade.
RUN echo "ray==${RAY_VERSION}" > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -e . \
    && python -c "import ray, torch, serve_app.app; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
# Data last: configs change more often than code, the embedded model (18 MB) rarely.
COPY --chown=ray:users configs configs
COPY --chown=ray:users models models
# Ray Serve's data plane as lightray/ray_env.py's RAY_SERVE_DATA_PLANE sets it (tests/test_settings.py keeps the two
# equal): every pod KubeRay starts from this image runs its replicas that way.
ENV PYTHONPATH=/app \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 \
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
    MALLOC_ARENA_MAX=2
EXPOSE 8000
# KubeRay replaces the command with `ray start`; run alone, the image serves the embedded model (configs/serve/
# local.yaml listens on 127.0.0.1: `docker run --network host`).
CMD ["lightray", "serve"]
