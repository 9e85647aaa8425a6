# Both targets set themselves up: a virtual environment in .venv and the pinned installs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# KServe's SDK, for tests/test_kserve.py, in an environment apart (tests/kserve/requirements.txt says why)
KSERVE_VENV := .venv-kserve

.PHONY: serve test lint train bench protos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.serve-installed

$(KSERVE_VENV)/.installed: tests/kserve/requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV) || python3 -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet -r tests/kserve/requirements.txt
	touch $@

## serve: the committed artifacts on 127.0.0.1:8000 under gunicorn
serve: $(VENV)/.serve-installed
	$(BIN)/gunicorn -c gunicorn.conf.py

## test: lint, format check, type-check, the layers' import rule, Dockerfile lint, the docs site and the pytest suite
test: $(VENV)/.test-installed $(KSERVE_VENV)/.installed
	$(BIN)/ruff check seqmodels service training tests benchmarks gunicorn.conf.py docs/hooks
	$(BIN)/ruff format --check seqmodels service training tests benchmarks gunicorn.conf.py docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/pytest

## protos: regenerate the gRPC code of the Open Inference Protocol from its .proto files
protos: $(VENV)/.test-installed
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		service/api/inference_protocol/grpc/open_inference_grpc.proto \
		service/api/inference_protocol/grpc/stream_infer.proto

## train: retrain on the default corpus (about an hour on 2 cores)
train: $(VENV)/.test-installed
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m training.run

## bench: serving, weight-precision, matmul, connection-balance, session-handle, slow-client, rollout, chunked-body, reference-server, concurrency, inference-protocol, traffic, warmup and tracing benchmarks (about an hour; write benchmarks/*.json and *.md; concurrency needs Debian's wrk)
bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks.serve
	$(BIN)/python -m benchmarks.precision
	$(BIN)/python -m benchmarks.matmul
	$(BIN)/python -m benchmarks.balance --off
	$(BIN)/python -m benchmarks.balance
	$(BIN)/python -m benchmarks.sessions
	$(BIN)/python -m benchmarks.slow_clients
	$(BIN)/python -m benchmarks.rollout
	$(BIN)/python -m benchmarks.rollout --sighup
	$(BIN)/python -m benchmarks.reference
	$(BIN)/python -m benchmarks.chunked
	$(BIN)/python -m benchmarks.concurrency
	$(BIN)/python -m benchmarks.inference_protocol
	$(BIN)/python -m benchmarks.traffic
	$(BIN)/python -m benchmarks.warmup
	$(BIN)/python -m benchmarks.tracing
