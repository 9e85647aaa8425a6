"""The Open Inference Protocol's REST routes under /v2: health, server and model metadata, `infer` (JSON
or Triton's binary tensors), and Triton's generate extension. Views stay thin: the tensors are
`service.api.inference_protocol`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import closing
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Blueprint, Response, jsonify, request

from service import lifecycle
from service.api.context import parse, request_deadline, respond, runtime, settings, use_model, validated
from service.api.errors import ApiError
from service.api.inference_protocol import PROTOCOL_PREFIX
from service.api.inference_protocol.model_tensors import TEXT_INPUT, compute, metadata, output_specs
from service.api.inference_protocol.tensors import (
    Tensor,
    TensorError,
    classification,
    encode_binary,
    read_inputs,
    split_body,
)
from service.api.openapi import documented
from service.api.schemas.inference_protocol import (
    GenerateExtensionRequest,
    GenerateExtensionResponse,
    InferResponse,
    LiveResponse,
    ModelMetadata,
    ModelReadyResponse,
    ProtocolError,
    ReadyResponseV2,
    ServerMetadata,
)
from service.api.schemas.native import GenerateRequest
from service.api.sse import sse_response
from service.engine.engine import Engine
from service.metrics import CHARS_SCORED
from service.models.versions import ModelVersion

bp = Blueprint("inference_protocol", __name__, url_prefix=PROTOCOL_PREFIX)

SERVER_NAME = "charlm-serve"
# The protocol's extensions this server implements, by the names Triton gives them.
EXTENSIONS = ["binary_tensor_data", "classification", "generate", "parameters"]
BINARY_HEADER = "Inference-Header-Content-Length"
UNSUPPORTED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
MODEL_NOT_FOUND = "no such model, or no such version of it loaded"


def bad_request(message: str, code: str = "invalid_tensor") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code=code)


def _server_version() -> str:
    try:
        return version("charlm-serve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


@bp.get("")
@documented(
    "Server metadata: name, version and the protocol extensions supported", ServerMetadata, error_model=ProtocolError
)
def server_metadata() -> Response:
    return respond(ServerMetadata(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS))


@bp.get("/health/live")
@documented("Liveness: the server answers", LiveResponse, error_model=ProtocolError)
def live() -> Response:
    return respond(LiveResponse(live=True))


@bp.get("/health/ready")
@documented(
    "Readiness: a model is loaded and the server is not shutting down (503 otherwise)",
    ReadyResponseV2,
    errors={503: "no model is loaded, or the server is shutting down"},
    error_model=ProtocolError,
)
def ready() -> Response:
    if runtime().repository.empty():
        raise ApiError(503, "no model is loaded", "service_unavailable", code="not_ready")
    if lifecycle.draining(time.monotonic()):
        raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
    return respond(ReadyResponseV2(ready=True))


def _model(name: str, model_version: str | None) -> ModelVersion:
    """The version a /v2 path names, leased for the request: the serving one without a version (a version
    that is not a positive integer is a 404 from the repository, as for /v1's NAME@VERSION)."""
    return use_model(name if model_version is None else f"{name}@{model_version}")


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<model_version>")
@documented(
    "Model metadata: its versions, platform, inputs and outputs",
    ModelMetadata,
    errors={404: MODEL_NOT_FOUND},
    error_model=ProtocolError,
)
def model_metadata(name: str, model_version: str | None = None) -> Response:
    mv = _model(name, model_version)
    versions = [str(other.version) for other in runtime().repository.versions(mv.name)]
    body = {"name": mv.name, "versions": versions, "platform": "pytorch", **metadata(mv.engine)}
    return respond(ModelMetadata.model_validate(body))


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<model_version>/ready")
@documented(
    "Whether a model (or one version) is loaded and ready",
    ModelReadyResponse,
    errors={404: MODEL_NOT_FOUND},
    error_model=ProtocolError,
)
def model_ready(name: str, model_version: str | None = None) -> Response:
    mv = _model(name, model_version)
    return respond(ModelReadyResponse(name=mv.name, ready=True))


# --------------------------------------------------------------------------- infer


def _texts(inputs: list[Tensor]) -> list[str]:
    names = [t.name for t in inputs]
    unknown = [n for n in names if n != TEXT_INPUT]
    if unknown:
        raise bad_request(f"unknown input {unknown[0]!r}: this model takes one input, {TEXT_INPUT!r}")
    if len(names) != 1:
        raise bad_request(f"input {TEXT_INPUT!r} given {len(names)} times")
    (tensor,) = inputs
    if tensor.datatype != "BYTES":
        raise bad_request(f"input {TEXT_INPUT!r} is BYTES (UTF-8 text), not {tensor.datatype}")
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
        raise bad_request(f"input {TEXT_INPUT!r} has shape [rows] or [rows, 1], not {tensor.shape}")
    caps = settings()
    if len(tensor.data) > caps.max_texts:
        raise bad_request(f"input {TEXT_INPUT!r}: at most {caps.max_texts} texts per request", "too_many_texts")
    for text in tensor.data:
        if len(text) > caps.max_text_chars:
            raise bad_request(f"input {TEXT_INPUT!r}: a text is longer than {caps.max_text_chars} characters",
                              "text_too_long")  # fmt: skip
    return list(tensor.data)


def _requested(header: dict[str, Any], engine: Engine) -> list[tuple[str, dict[str, Any]]]:
    """The outputs asked for, each with its parameters, in the request's order; every one when none is."""
    known = [spec.name for spec in output_specs(engine)]
    asked = header.get("outputs")
    if asked is None:
        return [(name, {}) for name in known]
    if not isinstance(asked, list):
        raise bad_request("outputs must be a list")
    out = []
    for item in asked:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("each requested output needs a name")
        if item["name"] not in known:
            raise bad_request(f"unknown output {item['name']!r}; this model has {', '.join(known)}")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"output {item['name']}: parameters must be an object")
        out.append((item["name"], parameters))
    return out


def _parameters(header: dict[str, Any]) -> dict[str, Any]:
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("parameters must be an object")
    for name in UNSUPPORTED_PARAMETERS:
        if parameters.get(name) not in (None, 0, "", False):
            raise bad_request(f"parameter {name}: sequences are not supported; /v1/generate's sessions keep state",
                              "unsupported_parameter")  # fmt: skip
    return parameters


def _timeout_seconds(parameters: dict[str, Any]) -> float | None:
    """Triton's `timeout` parameter, in microseconds."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise bad_request("parameter timeout is a positive number of microseconds")
    return min(timeout / 1e6, 3600.0)


def _shaped(tensor: Tensor, parameters: dict[str, Any], engine: Engine) -> Tensor:
    """The output as asked: Triton's `classification` parameter turns scores into their top-k labels."""
    k = parameters.get("classification")
    if k is None:
        return tensor
    spec = next(s for s in output_specs(engine) if s.name == tensor.name)
    if spec.columns is None:
        raise bad_request(f"output {tensor.name}: classification needs an output of scores per label")
    labels = spec.columns(engine)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(labels):
        raise bad_request(f"output {tensor.name}: classification is a count from 1 to {len(labels)}")
    rows = tensor.shape[0]
    return Tensor(
        name=tensor.name, datatype="BYTES", shape=[rows, k], data=classification(tensor.data, len(labels), labels, k)
    )


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<model_version>/infer")
@documented(
    "Inference on tensors: next-character probabilities, log-likelihood, bits per character, label",
    InferResponse,
    errors={
        400: "tensors that do not parse, or disagree with their shape, datatype or the model's inputs and outputs",
        404: MODEL_NOT_FOUND,
        413: "body larger than MAX_BODY_BYTES",
        504: "the request ran past its timeout",
    },
    error_model=ProtocolError,
)
def infer(name: str, model_version: str | None = None) -> Response:
    try:
        header, binary = split_body(request.get_data(cache=False), request.headers.get(BINARY_HEADER))
        inputs = read_inputs(header, binary)
    except TensorError as exc:
        raise bad_request(str(exc)) from None
    parameters = _parameters(header)
    deadline = request_deadline(_timeout_seconds(parameters))
    binary_default = parameters.get("binary_data_output") is True
    mv = _model(name, model_version)
    texts = _texts(inputs)
    wanted = _requested(header, mv.engine)
    names = [output for output, _ in wanted]
    if {"log_likelihood", "bits_per_char"} & set(names) and any(not text for text in texts):
        raise bad_request("log_likelihood and bits_per_char need texts of at least one character", "empty_text")
    try:
        computed = compute(mv.engine, texts, names, deadline)
    except TimeoutError as exc:
        raise ApiError(504, str(exc) or "the request ran past its timeout", "timeout", code="timeout") from None
    CHARS_SCORED.labels(model=mv.id).inc(sum(len(text) for text in texts))
    outputs, blobs = [], []
    for output, output_parameters in wanted:
        tensor = _shaped(computed[output], output_parameters, mv.engine)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if output_parameters.get("binary_data", binary_default) is True:
            blob = encode_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.data
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": mv.name, "model_version": str(mv.version), "outputs": outputs}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    if not blobs:
        return jsonify(body)
    head = json.dumps(body, allow_nan=False).encode()
    response = Response(head + b"".join(blobs), mimetype="application/octet-stream")
    response.headers[BINARY_HEADER] = str(len(head))
    return response


# --------------------------------------------------------------------------- generate extension


def _generation(name: str, model_version: str | None) -> tuple[ModelVersion, GenerateExtensionRequest, Any]:
    """The request as /v1/generate's (the same fields, caps and checks), and the engine's request."""
    ext = parse(GenerateExtensionRequest)
    try:
        fields = ext.generate_fields()
    except ValueError as exc:
        raise bad_request(str(exc), "invalid_parameter") from None
    native = validated(GenerateRequest, fields, where="parameters")
    deadline = request_deadline(native.timeout)
    mv = _model(name, model_version)
    return mv, ext, native.generation_request(deadline)


@bp.post("/models/<name>/generate")
@bp.post("/models/<name>/versions/<model_version>/generate")
@documented(
    "Triton's generate extension: text_input and sampling parameters in, text_output out",
    GenerateExtensionResponse,
    GenerateExtensionRequest,
    errors={404: MODEL_NOT_FOUND},
    error_model=ProtocolError,
)
def generate(name: str, model_version: str | None = None) -> Response:
    mv, req, gen = _generation(name, model_version)
    (choice,) = mv.engine.generate(gen).choices
    body = {"model_name": mv.name, "model_version": str(mv.version), "text_output": choice.text,
            "finish_reason": choice.finish_reason}  # fmt: skip
    if req.id is not None:
        body["id"] = req.id
    return respond(GenerateExtensionResponse.model_validate(body))


@bp.post("/models/<name>/generate_stream")
@bp.post("/models/<name>/versions/<model_version>/generate_stream")
@documented(
    "Triton's generate extension, streamed: one server-sent event per piece of text",
    GenerateExtensionResponse,
    GenerateExtensionRequest,
    stream_chunk=GenerateExtensionResponse,
    content_type="text/event-stream",
    errors={404: MODEL_NOT_FOUND},
    error_model=ProtocolError,
)
def generate_stream(name: str, model_version: str | None = None) -> Response:
    mv, req, gen = _generation(name, model_version)

    def events() -> Iterator[dict[str, Any]]:
        with closing(mv.engine.stream(gen)) as deltas:
            for delta in deltas:
                event = {"model_name": mv.name, "model_version": str(mv.version), "text_output": delta.text,
                         "finish_reason": delta.finish_reason}  # fmt: skip
                if req.id is not None:
                    event["id"] = req.id
                yield event

    return sse_response(events(), done_marker=False)
