"""The protocol's gRPC service, `inference.GRPCInferenceService`: health, metadata, `ModelInfer`, and Triton's
`ModelStreamInfer`, on the same models, limits and keys as the REST routes. No Flask here: the server
(service.server.grpc_server) runs it beside the HTTP app of each worker.

Messages are read into the wire-independent `InferCall` and answered by `inference_protocol.infer`, as the
REST routes do. Outputs go back as `raw_output_contents` (what Triton sends and `tritonclient.grpc`
reads); inputs come as typed `contents` or as `raw_input_contents`. Errors are gRPC status codes, with the
message the REST route would give: 400 is INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 413
RESOURCE_EXHAUSTED, 503 UNAVAILABLE and 504 DEADLINE_EXCEEDED."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any, TypeVar

import grpc

from service import lifecycle
from service.api.errors import ApiError
from service.api.inference_protocol import EXTENSIONS, SERVER_NAME, server_version
from service.api.inference_protocol.grpc import open_inference_grpc_pb2 as pb
from service.api.inference_protocol.grpc import open_inference_grpc_pb2_grpc as pb_grpc
from service.api.inference_protocol.grpc import stream_infer_pb2 as stream_pb
from service.api.inference_protocol.infer import (
    InferAnswer,
    InferCall,
    InferContext,
    generation_request,
    infer,
    is_generation,
    text_output,
    timeout_seconds,
)
from service.api.inference_protocol.model_tensors import metadata
from service.api.inference_protocol.tensors import (
    Tensor,
    TensorError,
    check_elements,
    checked_count,
    decode_binary,
    encode_binary,
)
from service.api.quotas import KeyPolicy, KeyRing
from service.engine import usage
from service.engine.types import Delta
from service.metrics import GRPC_REQUEST_LATENCY, GRPC_REQUESTS, MODEL_REQUESTS
from service.models.runtime import ModelRuntime
from service.models.sessions import principal_of
from service.models.versions import ModelNotFound, ModelVersion

log = logging.getLogger("service")

SERVICE = "inference.GRPCInferenceService"
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The typed `contents` field of each datatype.
CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
Reply = TypeVar("Reply")


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters_of(message: Any) -> dict[str, Any]:
    return {name: parameter_value(value) for name, value in message.parameters.items()}


def _input(message: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name, datatype, shape = message.name, message.datatype, list(message.shape)
    if not name:
        raise TensorError("each input needs a name")
    count = checked_count(name, datatype, shape)
    if raw is not None:
        data = decode_binary(memoryview(raw), datatype, count, name)
    else:
        values = list(getattr(message.contents, CONTENTS[datatype]))
        if datatype == "BYTES":
            try:
                values = [value.decode("utf-8") for value in values]
            except UnicodeDecodeError:
                raise TensorError(f"input {name}: a BYTES element is not UTF-8 text") from None
        data = check_elements(values, datatype, name)
        if len(data) != count:
            raise TensorError(f"input {name}: shape {shape} holds {count} elements, its contents have {len(data)}")
    return Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters_of(message))


def read_call(request: pb.ModelInferRequest) -> InferCall:
    """A ModelInferRequest as the wire-independent call (TensorError for tensors that do not add up)."""
    if not request.inputs:
        raise TensorError("the request needs `inputs`, a list of tensors")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
                          "it carries every input or none")  # fmt: skip
    inputs = [_input(message, raw[i] if raw else None) for i, message in enumerate(request.inputs)]
    outputs = [(o.name, parameters_of(o)) for o in request.outputs] if request.outputs else None
    return InferCall(id=request.id or None, parameters=parameters_of(request), inputs=inputs, outputs=outputs)


def write_answer(answer: InferAnswer) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version,
                                     id=answer.id or "")  # fmt: skip
    for tensor, _ in answer.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(encode_binary(tensor))
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: ModelRuntime, keys: KeyRing) -> None:
        self.models = models
        self.keys = keys
        self._policy = threading.local()  # the key of the call on this thread

    # ----------------------------------------------------------------- the call around each method

    def _authorized(self, context: grpc.ServicerContext) -> bytes:
        """The caller's principal; UNAUTHENTICATED without one of the keys (`authorization: Bearer <key>`).
        The key's policy is kept for the call (its models and its limits)."""
        self._policy.value = None
        if not self.keys.enabled():
            return principal_of(None)
        policy = self.keys.authorize(str(dict(context.invocation_metadata()).get("authorization", "")))
        if policy is None:
            raise ApiError(401, "missing or invalid API key; send authorization: Bearer <key>",
                           "invalid_request_error", code="invalid_api_key")  # fmt: skip
        self._policy.value = policy
        return principal_of(policy.key)

    @contextmanager
    def _within_quota(self) -> Iterator[None]:
        """Hold the caller's key within its limits for one request (service.api.quotas), as REST does."""
        policy: KeyPolicy | None = self._policy.value
        if policy is None or not policy.limited:
            yield
            return
        quota = self.keys.admit(policy)
        if quota.refused is not None:
            raise quota.error()
        usage.reset()
        try:
            yield
        finally:
            self.keys.counters.finish(policy, usage.generated())

    def _answer(self, method: str, context: grpc.ServicerContext, work: Callable[[], Reply]) -> Reply:
        """Run one unary method: its metric, and its ApiError as the matching status."""
        start, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return work()
        except ApiError as exc:
            code = STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, exc.message)
        except TensorError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(exc))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("gRPC %s failed", method)
            context.abort(code, "internal error")
        finally:
            GRPC_REQUESTS.labels(method=method, code=code.name).inc()
            GRPC_REQUEST_LATENCY.labels(method=method).observe(time.monotonic() - start)
        raise AssertionError("unreachable")  # context.abort raises

    @contextmanager
    def _leased(self, name: str, version: str) -> Iterator[tuple[ModelVersion, Callable[[int], ModelVersion]]]:
        """The version a request names (the serving one without a version), and a way to hold others of the
        same model, all released at the end."""
        repository = self.models.repository
        if repository.empty():
            raise ApiError(503, "no model is loaded", "service_unavailable", code="not_ready")
        if lifecycle.draining(time.monotonic()):
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        held: list[ModelVersion] = []

        def acquire(model: str) -> ModelVersion:
            try:
                mv = repository.acquire(model)
            except ModelNotFound as exc:
                raise ApiError(404, str(exc), "invalid_request_error", code="model_not_found") from None
            held.append(mv)
            return mv

        try:
            mv = acquire(f"{name}@{version}" if version else name)
            policy: KeyPolicy | None = self._policy.value
            if policy is not None and policy.models is not None and mv.name not in policy.models:
                raise ApiError(403, f"this API key may not use the model `{mv.name}`", "invalid_request_error",
                               code="model_not_allowed")  # fmt: skip
            yield mv, lambda other: acquire(f"{name}@{other}")
            MODEL_REQUESTS.labels(model=held[-1].id).inc()
        finally:
            for lease in held:
                repository.release(lease)

    def _context(self, call: InferCall, principal: bytes, pinned: bool, context: grpc.ServicerContext,
                 version_of: Callable[[int], ModelVersion]) -> InferContext:  # fmt: skip
        timeout = timeout_seconds(call.parameters)
        remaining = context.time_remaining()  # the client's deadline, if it set one
        if remaining is not None and remaining < 3600:
            timeout = remaining if timeout is None else min(timeout, remaining)
        settings = self.models.settings
        return InferContext(
            settings=settings,
            principal=principal,
            sequences=self.models.sequences,
            deadline=lifecycle.request_deadline(settings.request_deadline_seconds, timeout),
            version_of=version_of,
            pinned=pinned,
        )

    # ----------------------------------------------------------------- health and metadata

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return self._answer("ServerLive", context, lambda: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        def ready() -> pb.ServerReadyResponse:
            serving = not self.models.repository.empty() and not lifecycle.draining(time.monotonic())
            return pb.ServerReadyResponse(ready=serving)

        return self._answer("ServerReady", context, ready)

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            self._authorized(context)
            with self._leased(request.name, request.version):
                return pb.ModelReadyResponse(ready=True)

        return self._answer("ModelReady", context, ready)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        def server() -> pb.ServerMetadataResponse:
            self._authorized(context)
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

        return self._answer("ServerMetadata", context, server)

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        def model() -> pb.ModelMetadataResponse:
            self._authorized(context)
            with self._leased(request.name, request.version) as (mv, _):
                versions = [str(other.version) for other in self.models.repository.versions(mv.name)]
                tensors = metadata(mv.engine)
                return pb.ModelMetadataResponse(name=mv.name, versions=versions, platform="pytorch",
                                                inputs=tensors["inputs"], outputs=tensors["outputs"])  # fmt: skip

        return self._answer("ModelMetadata", context, model)

    # ----------------------------------------------------------------- inference

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        def run() -> pb.ModelInferResponse:
            principal = self._authorized(context)
            call = read_call(request)
            with self._within_quota(), self._leased(request.model_name, request.model_version) as (mv, version_of):
                answer = infer(mv, call, self._context(call, principal, bool(request.model_version), context,
                                                       version_of))  # fmt: skip
            return write_answer(answer)

        return self._answer("ModelInfer", context, run)

    def ModelStreamInfer(
        self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[stream_pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: each request answered in turn, a failed one with its error_message
        (the stream goes on). A `text_input` request streams its generation, a response per piece of text,
        the last with the parameter `triton_final_response`; any other is one response."""
        try:
            principal = self._authorized(context)
        except ApiError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        for request in requests:
            start, code = time.monotonic(), "OK"
            try:
                yield from self._stream_one(request, principal, context)
            except (ApiError, TensorError) as exc:
                code = "INVALID_ARGUMENT"
                message = exc.message if isinstance(exc, ApiError) else str(exc)
                yield stream_pb.ModelStreamInferResponse(error_message=message)
            except Exception:
                code = "INTERNAL"
                log.exception("gRPC ModelStreamInfer failed")
                yield stream_pb.ModelStreamInferResponse(error_message="internal error")
            finally:
                GRPC_REQUESTS.labels(method="ModelStreamInfer", code=code).inc()
                GRPC_REQUEST_LATENCY.labels(method="ModelStreamInfer").observe(time.monotonic() - start)

    def _stream_one(
        self, request: pb.ModelInferRequest, principal: bytes, context: grpc.ServicerContext
    ) -> Iterator[stream_pb.ModelStreamInferResponse]:
        call = read_call(request)
        with self._within_quota(), self._leased(request.model_name, request.model_version) as (mv, version_of):
            infer_context = self._context(call, principal, bool(request.model_version), context, version_of)
            if not is_generation(call):
                answer = infer(mv, call, infer_context)
                response = write_answer(answer)
                response.parameters["triton_final_response"].bool_param = True
                yield stream_pb.ModelStreamInferResponse(infer_response=response)
                return
            generation = generation_request(call, infer_context)
            empty_final = call.parameters.get("triton_enable_empty_final_response") is True
            # Each piece goes out when the next arrives, so that the last carries triton_final_response (and
            # the finish reason); with triton_enable_empty_final_response, at once, and an empty one ends.
            pending: Delta | None = None
            with closing(mv.engine.stream(generation)) as deltas:
                for delta in deltas:
                    if not context.is_active():
                        return  # the client went away: closing the stream takes its rows out of the batch
                    if empty_final:
                        yield self._piece(mv, call, delta.text, None)
                    elif pending is not None:
                        yield self._piece(mv, call, pending.text, None)
                    pending = delta
            reason = (pending.finish_reason if pending else None) or "length"
            yield self._piece(mv, call, None if empty_final else (pending.text if pending else ""), reason)

    @staticmethod
    def _piece(mv: ModelVersion, call: InferCall, text: str | None, finish_reason: str | None
               ) -> stream_pb.ModelStreamInferResponse:  # fmt: skip
        """A response of a streamed generation; the last has a finish reason."""
        answer = InferAnswer(model_name=mv.name, model_version=str(mv.version), id=call.id,
                             outputs=[] if text is None else [(text_output(text), {})])  # fmt: skip
        response = write_answer(answer)
        response.parameters["triton_final_response"].bool_param = finish_reason is not None
        if finish_reason is not None:
            response.parameters["finish_reason"].string_param = finish_reason
        return stream_pb.ModelStreamInferResponse(infer_response=response)


def stream_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """ModelStreamInfer under the protocol's service name: the published proto has no such method, so it is
    registered apart from the generated handlers."""
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=stream_pb.ModelStreamInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelStreamInfer": method})
