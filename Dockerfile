# syntax=docker/dockerfile:1

# ---- build: a venv with the CPU build of torch and the service's pinned dependencies
FROM python:3.11-slim AS build
# Empty by default; on machines whose registries need a local wheel folder or a private CA
# (see docs/deployment.md, "Container"), pass them in. pip reads both from the environment.
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""
# PyTorch's documented way to get the CPU-only build; the default PyPI wheel bundles CUDA (GBs).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
RUN /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0+cpu
COPY pyproject.toml README.md ./
COPY seqmodels ./seqmodels
COPY service ./service
# Installs the service with the pins from pyproject.toml; torch==2.13.0 is already satisfied.
# Headers and CMake files only serve C++ extension builds, which the runtime never does.
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include /opt/venv/lib/python3.11/site-packages/torch/share

# ---- runtime: the venv, the gunicorn config and the committed artifacts
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY gunicorn.conf.py ./
COPY artifacts ./artifacts
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    GRPC_PORT=8001 \
    WORKERS=2 \
    THREADS=32 \
    LOG_LEVEL=INFO \
    ARTIFACTS_DIR=/app/artifacts
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8000'), timeout=4)"]
# gunicorn runs as PID 1 (exec form), so SIGTERM from `docker stop` reaches it and it stops
# gracefully: no new connections, in-flight requests get GRACEFUL_TIMEOUT seconds.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "/app/gunicorn.conf.py"]
