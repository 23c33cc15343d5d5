# syntax=docker/dockerfile:1
# The demo app (Gradio UI + REST API, every model under models/) on port 7860, offline.
# Research and education demo, not a medical device.
#
#   docker build -t melanoma-app . && docker run -p 7860:7860 melanoma-app
#
# BASE: any Debian-like image; the official slim Python image by default. A bare Debian base
# (CI bootstraps one with debootstrap, .ci/container.sh) gets python3 and venv from apt.
# TORCH: "cpu" (default) keeps only what CPU inference loads of PyPI's CUDA build of PyTorch (the
# only Linux x86_64 torch on PyPI); "cuda" keeps the whole CUDA build for GPU hosts.
# Behind a TLS-inspecting proxy, pass its CA bundle as the build secret `ca`:
#   podman build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 1000 app \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Dependencies in their own layer: a code change does not reinstall them. Only the runtime list
# (requirements.txt, what Spaces installs); pyproject's `test` extra stays out.
# With TORCH=cpu, PyTorch's CUDA libraries are cut down to the ones its binaries link against
# (ldd: libcudnn.so.9 and friends must be there for `import torch`, though CPU inference never
# calls them); cuDNN's kernels, the other NVIDIA libraries, their headers and Triton go.
ARG TORCH=cpu
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,required=false \
    set -e; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install -r /tmp/requirements.txt; \
    if [ "$TORCH" = cpu ]; then \
        site=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))"); \
        pip uninstall -y triton; \
        ldd "$site"/torch/lib/*.so* "$site"/torchvision/*.so | awk '$3 ~ "/nvidia/" {print $3}' \
            | xargs realpath | sort -u > /tmp/linked; \
        find "$site/nvidia" -type f ! -name "*.py" | sort | comm -23 - /tmp/linked | xargs rm -f; \
        find "$site/nvidia" -type d -empty -delete; \
        python -c "import torch, torchvision; assert not torch.cuda.is_available()"; \
    fi; \
    rm -f /tmp/requirements.txt /tmp/linked

WORKDIR /app
COPY . .
RUN python -m compileall -q app.py model webapp hub_cards

# The code stays root-owned and read-only to the app; Gradio's uploads and the app's batch CSVs go
# to /tmp, matplotlib and Hugging Face caches to the app user's home.
USER app
ENV HF_HUB_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_TEMP_DIR=/tmp/gradio
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/public_models' % os.environ['GRADIO_SERVER_PORT'], timeout=8)"]
CMD ["python", "app.py"]
