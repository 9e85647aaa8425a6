"""The Open Inference Protocol's response models (its infer request is read as tensors, not as a model:
see service.api.inference_protocol.tensors), and Triton's generate extension."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.engine.types import FinishReason

GENERATE_RESERVED = ("prompt", "stream", "n", "session", "return_session", "model")


class ProtocolError(BaseModel):
    """The protocol's error envelope, which its clients read."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponseV2(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension that varies (the rows)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the loaded versions, newest (serving) first")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="row-major; absent when sent as binary data")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: its bytes after the JSON")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class GenerateExtensionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = Field(None, max_length=256, description="echoed in the response")
    text_input: str = Field(description="the prompt")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="/v1/generate's fields: max_tokens, temperature, top_k, top_p, seed, stop, timeout, priority",
    )

    def generate_fields(self) -> dict[str, Any]:
        """The body of the equivalent /v1/generate request (ValueError for a field this extension cannot carry)."""
        reserved = [name for name in GENERATE_RESERVED if name in self.parameters]
        if reserved:
            raise ValueError(f"parameters.{reserved[0]} is not a generate parameter here")
        return {"prompt": self.text_input, **self.parameters}


class GenerateExtensionResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    text_output: str
    finish_reason: FinishReason | None = Field(None, description="on the last piece: why the text ended")
