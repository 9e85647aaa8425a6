"""Run by tests/test_kserve.py in the virtual environment with KServe's SDK (tests/kserve/requirements.txt):
loads deploy/kserve's manifests into the SDK's models, then calls a running server with KServe's own
`InferenceRESTClient` (protocol v2). Prints what it found as JSON for the test to check."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import kserve.models
import kubernetes.client.models
import yaml
from kserve import ApiClient, InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

KINDS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}


class _SdkClient(ApiClient):
    """KServe's ApiClient, reading the type names of Kubernetes' models too: the SDK's models refer to them
    (V1ObjectMeta, V1Container), whose generator spells `List[...]` and `Dict[str, ...]` where KServe's
    spells `list[...]` and `dict(str, ...)`."""

    def _ApiClient__deserialize(self, data: Any, klass: Any) -> Any:
        if isinstance(klass, str):
            if klass.startswith("Optional["):
                klass = klass[len("Optional[") : -1]
            if klass.startswith("List["):
                klass = "list[" + klass[len("List[") :]
            elif klass.startswith("Dict["):
                key, _, value = klass[len("Dict[") : -1].partition(", ")
                klass = f"dict({key}, {value})"
        return super()._ApiClient__deserialize(data, klass)  # type: ignore[misc]


class _Response:
    """What ApiClient.deserialize reads: a body in `data`."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.data = json.dumps(document)


def lost_fields(written: Any, held: Any, where: str = "") -> list[str]:
    """The fields of `written` that `held` lacks or holds otherwise (fields the SDK adds are fine)."""
    if isinstance(written, dict) and isinstance(held, dict):
        return [lost for key, value in written.items()
                for lost in lost_fields(value, held.get(key), f"{where}.{key}")]  # fmt: skip
    if isinstance(written, list) and isinstance(held, list) and len(written) == len(held):
        return [lost for i, (a, b) in enumerate(zip(written, held, strict=True))
                for lost in lost_fields(a, b, f"{where}[{i}]")]  # fmt: skip
    return [] if written == held else [where or "the document"]


def load_manifests(folder: Path) -> dict[str, Any]:
    """Each manifest as the SDK's model, and back: every field must survive (the SDK drops unknown ones)."""
    # The SDK's models refer to Kubernetes' own (V1ObjectMeta, V1Container) by name, in its own namespace.
    for name in dir(kubernetes.client.models):
        if name.startswith("V1") and not hasattr(kserve.models, name):
            setattr(kserve.models, name, getattr(kubernetes.client.models, name))
    client = _SdkClient()
    loaded: dict[str, Any] = {}
    for path in sorted(folder.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        model = client.deserialize(_Response(document), KINDS[document["kind"]])
        lost = lost_fields(document, client.sanitize_for_serialization(model))
        if lost:
            raise SystemExit(f"{path.name}: the SDK's models do not hold {', '.join(lost)} as written")
        loaded[document["kind"]] = model
    return loaded


async def call(base: str, key: str, model: str, texts: list[str]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    found: dict[str, Any] = {
        "live": await client.is_server_live(base, headers=headers),
        "ready": await client.is_server_ready(base, headers=headers),
        "model_ready": await client.is_model_ready(base, model, headers=headers),
    }
    text = InferInput("text", [len(texts)], "BYTES", data=texts)
    outputs = [RequestedOutput(name) for name in ("log_likelihood", "label", "next_char_probs", "vocabulary")]
    request = InferRequest(model, [text], request_id="kserve-1", request_outputs=outputs)
    response = await client.infer(base, request, model_name=model, headers=headers)
    found["id"] = response.id
    found["outputs"] = {out.name: out.as_numpy().tolist() for out in response.outputs}
    found["outputs"]["label"] = [v.decode() if isinstance(v, bytes) else v for v in found["outputs"]["label"]]
    found["outputs"]["vocabulary"] = [v.decode() if isinstance(v, bytes) else v for v in found["outputs"]["vocabulary"]]
    errors: dict[str, list[Any] | None] = {}
    for what, bad_model, tensor in (
        ("wrong datatype", model, InferInput("text", [1], "FP32", data=[1.0])),
        ("unknown input", model, InferInput("prompt", [1], "BYTES", data=["a"])),
        ("unknown model", "nope", InferInput("text", [1], "BYTES", data=["a"])),
    ):
        try:
            await client.infer(base, InferRequest(bad_model, [tensor]), model_name=bad_model, headers=headers)
            errors[what] = None
        except Exception as exc:  # the SDK raises httpx.HTTPStatusError with the server's message
            response_of = getattr(exc, "response", None)
            errors[what] = [getattr(response_of, "status_code", None), str(exc)]
    found["errors"] = errors
    await client.close()
    return found


def main() -> None:
    folder, base, key, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    texts = json.loads(sys.argv[5])
    loaded = load_manifests(folder)
    runtime, service = loaded["ServingRuntime"], loaded["InferenceService"]
    container = runtime.spec.containers[0]
    summary = {
        "runtime": runtime.metadata.name,
        "runtime_formats": [f.name for f in runtime.spec.supported_model_formats],
        "runtime_protocols": runtime.spec.protocol_versions,
        "port": container.ports[0].container_port,
        "env": {e.name: e.value for e in container.env},
        "probes": [container.readiness_probe.http_get.path, container.liveness_probe.http_get.path],
        "service_runtime": service.spec.predictor.model.runtime,
        "service_format": service.spec.predictor.model.model_format.name,
        "service_protocol": service.spec.predictor.model.protocol_version,
        "mode": service.metadata.annotations["serving.kserve.io/deploymentMode"],
    }
    summary["client"] = asyncio.run(call(base, key, model, texts))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
