# syntax=docker/dockerfile:1
# The cyborg gRPC inference server (`cyborg serve`), without torch.
#
#   docker build -t cyborg:gpu .                          # CUDA 13 + cuDNN 9 + TensorRT 10
#   docker build --build-arg VARIANT=cpu -t cyborg:cpu .  # python:3.11-slim, CPU only
#
# Both variants install the same onnxruntime-gpu wheel (the project's `serving` extra): it runs the
# CPU execution provider on hosts without a GPU, and one image never carries two onnxruntime
# packages. The default model is baked in at /models; mount a model repository there to replace it.
# See docs/deploy.md.

ARG VARIANT=gpu
# onnxruntime-gpu 1.31 links CUDA 13 (libcudart.so.13) and cuDNN 9 (libcudnn.so.9).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- base images: the interpreter the builder and the runtime stage share ----
FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu's python3 is not pinned: the archive drops superseded builds, so a pin would break the
# build at the next security update; the CUDA image tag pins the Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# install-serving.sh links the pip-installed TensorRT libraries here; onnxruntime's TensorRT
# execution provider loads libnvinfer.so.10 through this path.
ENV LD_LIBRARY_PATH=/opt/venv/tensorrt_libs:${LD_LIBRARY_PATH}

FROM ${PYTHON_IMAGE} AS base-cpu

# base-gpu or base-cpu: a stage of this file, not a registry image, so it carries no tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---- builder: build the project wheel and install it with the serving extra into /opt/venv ----
FROM base AS builder
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN sh deploy/install-serving.sh /opt/venv "${VARIANT}" /src

# ---- runtime: the virtual environment, the default model and a non-root user ----
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="cyborg" \
      org.opencontainers.image.description="Real vs GAN-generated face detection with CAM explanations: gRPC inference server" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.cyborg.variant="${VARIANT}"
RUN groupadd --system --gid 10001 cyborg \
    && useradd --system --uid 10001 --gid cyborg --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cyborg
COPY --from=builder /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/cyborg/healthcheck.py
COPY models/ /models/
# matplotlib (heatmap colours) keeps its cache under /tmp: the home folder does not exist and the
# root file system may be read-only (Kubernetes mounts an emptyDir at /tmp).
ENV PATH=/opt/venv/bin:${PATH} \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
# 8001: gRPC (cyborg.v1 and the Open Inference Protocol, grpc.health.v1, reflection);
# 8002: Prometheus metrics. The same numbers as Triton's gRPC and metrics ports.
EXPOSE 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/cyborg/healthcheck.py", "--address", "127.0.0.1:8001"]
ENTRYPOINT ["cyborg", "serve", "--model-repository", "/models"]
# The two newest versions: v12 (int8, for CPUs) and v9 (the same networks in fp32). Requests naming
# no version get v12 on a CPU and v9 on a GPU (the fp32 source of an int8 version; docs/serving.md).
CMD ["--version-policy", "latest:2"]
