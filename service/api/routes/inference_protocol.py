"""The Open Inference Protocol's REST routes under /v2: health, server and model metadata, `infer` (JSON
or Triton's binary tensors), and Triton's generate extension. Views stay thin: the tensors are
`service.api.inference_protocol`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

from flask import Blueprint, Response, jsonify, request

from service import lifecycle
from service.api.context import (
    parse,
    principal,
    request_deadline,
    respond,
    runtime,
    settings,
    use_model,
    validated,
)
from service.api.errors import ApiError
from service.api.inference_protocol import EXTENSIONS, PROTOCOL_PREFIX, SERVER_NAME, server_version
from service.api.inference_protocol.infer import InferCall, InferContext, bad_request, timeout_seconds
from service.api.inference_protocol.infer import infer as run_infer
from service.api.inference_protocol.model_tensors import metadata
from service.api.inference_protocol.tensors import TensorError, encode_binary, read_inputs, split_body
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
from service.models.versions import ModelVersion

bp = Blueprint("inference_protocol", __name__, url_prefix=PROTOCOL_PREFIX)

BINARY_HEADER = "Inference-Header-Content-Length"
MODEL_NOT_FOUND = "no such model, or no such version of it loaded"


@bp.get("")
@documented(
    "Server metadata: name, version and the protocol extensions supported", ServerMetadata, error_model=ProtocolError
)
def server_metadata() -> Response:
    return respond(ServerMetadata(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS))


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


def _outputs(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    asked = header.get("outputs")
    if asked is None:
        return None
    if not isinstance(asked, list):
        raise bad_request("outputs must be a list")
    out = []
    for item in asked:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("each requested output needs a name")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"output {item['name']}: parameters must be an object")
        out.append((item["name"], parameters))
    return out


def _call(header: dict[str, Any], binary: memoryview) -> InferCall:
    try:
        inputs = read_inputs(header, binary)
    except TensorError as exc:
        raise bad_request(str(exc)) from None
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("parameters must be an object")
    request_id = header.get("id")
    return InferCall(id=request_id if isinstance(request_id, str) else None, parameters=parameters, inputs=inputs,
                     outputs=_outputs(header))  # fmt: skip


def infer_context(name: str, pinned: bool, timeout: float | None) -> InferContext:
    return InferContext(
        settings=settings(),
        principal=principal(),
        sequences=runtime().sequences,
        deadline=request_deadline(timeout),
        version_of=lambda version: use_model(f"{name}@{version}"),
        pinned=pinned,
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
    except TensorError as exc:
        raise bad_request(str(exc)) from None
    call = _call(header, binary)
    context = infer_context(name, model_version is not None, timeout_seconds(call.parameters))
    answer = run_infer(_model(name, model_version), call, context)
    binary_default = call.parameters.get("binary_data_output") is True
    outputs, blobs = [], []
    for tensor, output_parameters in answer.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if output_parameters.get("binary_data", binary_default) is True:
            blob = encode_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.data
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outputs}
    if answer.id is not None:
        body["id"] = answer.id
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
