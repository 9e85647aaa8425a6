"""The protocol's `infer` call, whichever wire it came on: REST (JSON or Triton's binary tensors) and gRPC
read their request into an `InferCall`, and `infer` answers it with the tensors asked for. No Flask here:
errors are `ApiError`, which each wire renders its own way.

Request parameters honoured: `timeout` (microseconds), `binary_data_output` (REST), and Triton's
`sequence_id`, `sequence_start` and `sequence_end`, which run the request's one text as the next piece of a
sequence (service.models.sequences): `next_char_probs` is then the distribution after everything the
sequence has read, and `log_likelihood` and `bits_per_char` are of this piece given what came before, so
that the pieces' log-likelihoods add up to the whole text's. `priority` is read before the request runs
(service.server.admission)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from service.api.errors import ApiError
from service.api.inference_protocol.model_tensors import (
    GENERATE_INPUT,
    GENERATE_OUTPUT,
    TEXT_INPUT,
    compute,
    output_specs,
)
from service.api.inference_protocol.tensors import Tensor, classification
from service.api.schemas.native import GenerateRequest
from service.engine.engine import Engine
from service.engine.types import GenerationRequest
from service.metrics import CHARS_SCORED
from service.models.sequences import SequenceError, SequenceStore
from service.models.versions import ModelVersion
from service.settings import Settings

SEQUENCE_OUTPUTS = ("next_char_probs", "log_likelihood", "bits_per_char")
# Request parameters of the protocol (and Triton) itself: the rest of a generation's are its sampling.
PROTOCOL_PARAMETERS = frozenset({
    "timeout", "priority", "binary_data_output", "sequence_id", "sequence_start", "sequence_end",
    "triton_enable_empty_final_response", "headers",
})  # fmt: skip


def bad_request(message: str, code: str = "invalid_tensor") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code=code)


@dataclass(kw_only=True)
class InferCall:
    """An infer request as read from its wire."""

    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: list[Tensor]
    outputs: list[tuple[str, dict[str, Any]]] | None = None  # by name, each with its parameters; None: all


@dataclass(kw_only=True)
class InferAnswer:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[tuple[Tensor, dict[str, Any]]]  # each with the parameters it was asked with


@dataclass(kw_only=True)
class InferContext:
    """What `infer` needs from the server around it."""

    settings: Settings
    principal: bytes  # whom the request's sequences belong to
    sequences: SequenceStore
    deadline: float | None
    version_of: Callable[[int], ModelVersion]  # another loaded version of the model, held for the request
    pinned: bool  # the request named its version


@dataclass(frozen=True)
class SequenceFlags:
    id: int | str
    start: bool
    end: bool


def timeout_seconds(parameters: dict[str, Any]) -> float | None:
    """Triton's `timeout` parameter, in microseconds."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise bad_request("parameter timeout is a positive number of microseconds")
    return min(timeout / 1e6, 3600.0)


def sequence_flags(parameters: dict[str, Any]) -> SequenceFlags | None:
    """Triton's sequence parameters; None for a request outside any sequence (no id, 0 or "")."""
    sequence_id = parameters.get("sequence_id")
    flags = {}
    for name in ("sequence_start", "sequence_end"):
        value = parameters.get(name, False)
        if not isinstance(value, bool):
            raise bad_request(f"parameter {name} is true or false", "invalid_parameter")
        flags[name] = value
    if sequence_id in (None, 0, ""):
        if flags["sequence_start"] or flags["sequence_end"]:
            raise bad_request("sequence_start and sequence_end need a sequence_id", "invalid_parameter")
        return None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise bad_request("parameter sequence_id is an integer or a string", "invalid_parameter")
    if isinstance(sequence_id, str) and len(sequence_id) > 256:
        raise bad_request("parameter sequence_id: at most 256 characters", "invalid_parameter")
    return SequenceFlags(sequence_id, flags["sequence_start"], flags["sequence_end"])


def _texts(inputs: list[Tensor], caps: Settings) -> list[str]:
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
    if len(tensor.data) > caps.max_texts:
        raise bad_request(f"input {TEXT_INPUT!r}: at most {caps.max_texts} texts per request", "too_many_texts")
    for text in tensor.data:
        if len(text) > caps.max_text_chars:
            raise bad_request(f"input {TEXT_INPUT!r}: a text is longer than {caps.max_text_chars} characters",
                              "text_too_long")  # fmt: skip
    return list(tensor.data)


def _requested(asked: list[tuple[str, dict[str, Any]]] | None, engine: Engine) -> list[tuple[str, dict[str, Any]]]:
    """The outputs asked for, each with its parameters, in the request's order; every one when none is."""
    known = [spec.name for spec in output_specs(engine)]
    if asked is None:
        return [(name, {}) for name in known]
    for name, _ in asked:
        if name not in known:
            raise bad_request(f"unknown output {name!r}; this model has {', '.join(known)}")
    return asked


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


def is_generation(call: InferCall) -> bool:
    """A request for generated text: its input is `text_input` (Triton's LLM backends' convention)."""
    return any(tensor.name == GENERATE_INPUT for tensor in call.inputs)


def generation_request(call: InferCall, context: InferContext) -> GenerationRequest:
    """A `text_input` request as the engine's generation: one prompt, and /v1/generate's sampling fields
    (max_tokens, temperature, top_k, top_p, seed, stop) as request parameters, with the same caps."""
    if len(call.inputs) != 1:
        raise bad_request(f"a generation takes one input, {GENERATE_INPUT!r}")
    (tensor,) = call.inputs
    if tensor.datatype != "BYTES" or len(tensor.data) != 1:
        raise bad_request(f"input {GENERATE_INPUT!r} is one text: BYTES, shape [1] or [1, 1]")
    if call.outputs is not None and [name for name, _ in call.outputs] != [GENERATE_OUTPUT]:
        raise bad_request(f"a generation has one output, {GENERATE_OUTPUT!r}")
    if sequence_flags(call.parameters) is not None:
        raise bad_request("a generation does not take part in a sequence; /v1/generate's sessions keep state",
                          "unsupported_parameter")  # fmt: skip
    fields = {name: value for name, value in call.parameters.items() if name not in PROTOCOL_PARAMETERS}
    for name in ("prompt", "n", "stream", "session", "return_session", "model"):
        if name in fields:
            raise bad_request(f"parameter {name} is not a generation parameter here", "invalid_parameter")
    try:
        native = GenerateRequest.model_validate({**fields, "prompt": tensor.data[0]},
                                                context={"settings": context.settings})  # fmt: skip
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request(f"parameter {where}: {first['msg'].removeprefix('Value error, ')}",
                          "invalid_parameter") from None  # fmt: skip
    assert context.deadline is not None
    return native.generation_request(context.deadline)


def text_output(text: str) -> Tensor:
    return Tensor(name=GENERATE_OUTPUT, datatype="BYTES", shape=[1], data=[text])


def infer(mv: ModelVersion, call: InferCall, context: InferContext) -> InferAnswer:
    """Answer `call` on version `mv` (or, for a sequence that started on another loaded version of the same
    model, on that one)."""
    if is_generation(call):
        (choice,) = mv.engine.generate(generation_request(call, context)).choices
        return InferAnswer(model_name=mv.name, model_version=str(mv.version), id=call.id,
                           outputs=[(text_output(choice.text), {})])  # fmt: skip
    sequence = sequence_flags(call.parameters)
    texts = _texts(call.inputs, context.settings)
    wanted = _requested(call.outputs, mv.engine)
    names = [name for name, _ in wanted]
    scored = {"log_likelihood", "bits_per_char"} & set(names)
    if scored and any(not text for text in texts):
        raise bad_request("log_likelihood and bits_per_char need texts of at least one character", "empty_text")
    try:
        if sequence is None:
            computed = compute(mv.engine, texts, names, context.deadline)
        else:
            mv, computed = _sequence_step(mv, texts, names, sequence, context)
    except TimeoutError as exc:
        raise ApiError(504, str(exc) or "the request ran past its timeout", "timeout", code="timeout") from None
    CHARS_SCORED.labels(model=mv.id).inc(sum(len(text) for text in texts))
    outputs = [(_shaped(computed[name], parameters, mv.engine), parameters) for name, parameters in wanted]
    return InferAnswer(model_name=mv.name, model_version=str(mv.version), id=call.id, outputs=outputs)


def _sequence_step(
    mv: ModelVersion, texts: list[str], names: list[str], flags: SequenceFlags, context: InferContext
) -> tuple[ModelVersion, dict[str, Tensor]]:
    if len(texts) != 1:
        raise bad_request(f"a request in a sequence carries one text, not {len(texts)}", "invalid_parameter")
    (text,) = texts
    try:
        with context.sequences.step(context.principal, mv.name, flags.id, flags.start, flags.end) as slot:
            if slot.version is not None and slot.version != mv.version:
                if context.pinned:
                    raise bad_request(f"sequence {flags.id} runs on version {slot.version} of {mv.name}, "
                                      f"not {mv.version}", "sequence_version")  # fmt: skip
                mv = context.version_of(slot.version)
            state, score = mv.engine.continue_sequence(slot.state, text)
            slot.save(mv.version, state)
    except SequenceError as exc:
        status = 503 if exc.code == "too_many_sequences" else 400
        raise ApiError(status, str(exc), "invalid_request_error", code=exc.code) from None
    out: dict[str, Tensor] = {}
    vocab = mv.engine.vocab.size
    probs = torch.softmax(state.logits.double(), dim=-1).tolist()
    out["next_char_probs"] = Tensor(name="next_char_probs", datatype="FP32", shape=[1, vocab], data=probs)
    out["log_likelihood"] = Tensor(name="log_likelihood", datatype="FP32", shape=[1], data=[score.logprob])
    out["bits_per_char"] = Tensor(name="bits_per_char", datatype="FP32", shape=[1], data=[score.bits_per_char])
    rest: Sequence[str] = [name for name in names if name not in SEQUENCE_OUTPUTS]
    if rest:  # the vocabulary, and the classifier's outputs (of this request's text alone)
        out.update(compute(mv.engine, texts, list(rest), context.deadline))
    return mv, {name: out[name] for name in names}
