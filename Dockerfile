# syntax=docker/dockerfile:1
# Build stage: a venv with the CPU build of torch and the service's pinned dependencies.
FROM python:3.11-slim AS build
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# The CPU wheel index keeps the multi-GB CUDA build of torch out of the image.
RUN /opt/venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip install flask==3.1.3 gunicorn==27.0.1 pydantic==2.14.3 pydantic-settings==2.16.3 safetensors==0.8.0

# Runtime stage: the venv, the gunicorn config and the committed artifacts; no compilers, no tests.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY gunicorn.conf.py ./
COPY --chown=root:root artifacts ./artifacts
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOST=0.0.0.0 PORT=8000 ARTIFACTS_DIR=/app/artifacts
USER app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/readyz\", timeout=4)"]
CMD ["gunicorn", "-c", "/app/gunicorn.conf.py"]
