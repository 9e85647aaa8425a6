"""The Open Inference Protocol (KServe's V2, Triton's HTTP/REST API): the tensors on the wire and what each
model's inputs and outputs are. The routes are `service.api.routes.inference_protocol`."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PROTOCOL_PREFIX = "/v2"
SERVER_NAME = "charlm-serve"
# The protocol's extensions this server implements, by the names Triton gives them.
EXTENSIONS = ["binary_tensor_data", "classification", "generate", "parameters", "sequence"]


def server_version() -> str:
    try:
        return version("charlm-serve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


def is_protocol_path(path: str) -> bool:
    """Whether a request path belongs to the protocol (its errors are `{"error": message}`)."""
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")
