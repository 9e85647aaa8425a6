"""The Open Inference Protocol (KServe's V2, Triton's HTTP/REST API): the tensors on the wire and what each
model's inputs and outputs are. The routes are `service.api.routes.inference_protocol`."""

from __future__ import annotations

PROTOCOL_PREFIX = "/v2"


def is_protocol_path(path: str) -> bool:
    """Whether a request path belongs to the protocol (its errors are `{"error": message}`)."""
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")
