# bssfp2dt BIDS-App image.
#
#   docker build -t bssfp2dt/bssfp2dt:$(cat version) --build-arg VERSION=$(cat version) .
#   docker run --rm --gpus all --read-only -v /data/bids:/data:ro -v /data/out:/out \
#       bssfp2dt/bssfp2dt:$(cat version) /data /out participant
#
# The base only has to provide python3 (with venv) or apt-get to install it. The CUDA default base is
# the small "base" flavour: the PyPI torch wheel brings its own CUDA runtime and cuDNN, so the image
# needs only the NVIDIA container toolkit hooks and the host driver. Without a GPU the app falls back
# to the CPU by itself. Local testing (no registry): docs/containers.md.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04

# ---------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
# Same install as `make install` (Makefile): torch first from TORCH_SPEC, then the package and its
# dependencies. The default is PyPI's Linux wheel (CUDA); a CPU build or a local wheel can be given,
# e.g. --build-arg TORCH_SPEC=/src/.container-wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
ARG TORCH_SPEC=torch==2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions follow whatever the base distribution ships (Ubuntu 24.04 or Debian 12): pinning them would
# tie the Dockerfile to one base.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir "${TORCH_SPEC}" \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/bssfp2dt --version \
    && /opt/venv/bin/python -c "import torch, monai, lightning, nipype, bids, dipy; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG IMAGE_TAG=bssfp2dt/bssfp2dt:${VERSION}
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="bssfp2dt" \
      org.opencontainers.image.description="BIDS-App: diffusion tensor, FA, MD, AD, RD and colour-FA maps predicted from phase-cycled bSSFP (or T1w) MRI with a 3D conditional GAN" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bssfp2dt/bssfp2dt" \
      org.opencontainers.image.url="https://github.com/bssfp2dt/bssfp2dt" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}"
# See the builder stage: the distribution's own python3 versions. MRtrix3 (Debian/Ubuntu package
# mrtrix3) brings mrdegibbs, the Gibbs-ringing removal the app prefers (QSIPrep's default), several times
# faster than dipy's; without it the app uses dipy's. --no-install-recommends keeps its GUI out.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null || ! command -v mrdegibbs >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 ca-certificates mrtrix3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin bssfp2dt
COPY --from=builder /opt/venv /opt/venv
COPY version /version
# Everything the app and its libraries write outside the mounted output and work folders goes under
# /tmp, so the image runs with --read-only (docker: /tmp is the VOLUME below; podman/apptainer: tmpfs
# or the host /tmp). Nothing is downloaded at run time: the models are inside the package, nipype's
# online version check is off.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    TORCH_HOME=/tmp/.cache/torch \
    TEMPLATEFLOW_HOME=/tmp/.cache/templateflow \
    DENO_DIR=/tmp/.cache/deno \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    BSSFP2DT_CONTAINER_TYPE=docker \
    BSSFP2DT_CONTAINER_TAG=${IMAGE_TAG}
VOLUME ["/tmp"]
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["bssfp2dt"]
CMD ["--help"]
