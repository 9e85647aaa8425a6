"""The Open Inference Protocol over gRPC, through `tritonclient.grpc` against a real gunicorn server on
loopback: health, metadata, infer equal to /v1, version pinning, sequences, generation whole and streamed,
API keys, and clear status codes for bad input.

This process imports tritonclient's copy of the protocol's messages only: the server's own copy
(service.api.inference_protocol.grpc) registers the same message names and lives in the server process."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.servers import free_port
from tests.conftest import gunicorn_server

KEY, OTHER_KEY = "grpc-key", "other-key"
MODEL = "char-lstm"
TEXTS = ["ROMEO: But soft", "JULIET: O Romeo"]
HEADERS = {"authorization": f"Bearer {KEY}"}


NARROW_KEY, SLOW_KEY = "narrow-grpc-key", "slow-grpc-key"


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    port = free_port()
    keys = tmp_path_factory.mktemp("grpc-keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": NARROW_KEY, "models": ["another-model"]},
                                         {"key": SLOW_KEY, "requests_per_second": 1}]}))  # fmt: skip
    with gunicorn_server(tiny_artifacts, WORKERS="2", API_KEYS=f"{KEY},{OTHER_KEY}", API_KEYS_FILE=str(keys),
                         GRPC_PORT=str(port)) as base:  # fmt: skip
        yield base, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def triton(server: tuple[str, str]) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(server[1])
    yield client
    client.close()


def v1(server: tuple[str, str], path: str, body: dict[str, Any]) -> Any:
    answer = requests.post(server[0] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def texts(values: list[str], name: str = "text") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
    return tensor


def outputs(*names: str) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(name) for name in names]


def status_of(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.message()
    return str(caught.value.status())


def test_health_metadata_and_keys(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()  # the probes need no key
    assert triton.is_model_ready(MODEL, headers=HEADERS)
    assert triton.is_model_ready(MODEL, "1", headers=HEADERS)
    meta = triton.get_model_metadata(MODEL, headers=HEADERS)
    assert meta.name == MODEL and list(meta.versions) == ["1"] and meta.platform == "pytorch"
    assert [t.name for t in meta.inputs] == ["text", "text_input"]
    assert {t.name: list(t.shape) for t in meta.outputs}["log_likelihood"] == [-1]
    server = triton.get_server_metadata(headers=HEADERS)
    assert server.name == "charlm-serve" and "sequence" in server.extensions
    assert status_of(lambda: triton.get_model_metadata(MODEL)) == "StatusCode.UNAUTHENTICATED"
    wrong = {"authorization": "Bearer nope"}
    assert status_of(lambda: triton.infer(MODEL, [texts(["a"])], headers=wrong)) == "StatusCode.UNAUTHENTICATED"


def test_infer_gives_the_numbers_v1_gives(triton: Any, server: tuple[str, str]) -> None:
    names = ("next_char_probs", "log_likelihood", "bits_per_char", "label", "label_probs", "vocabulary")
    result = triton.infer(MODEL, [texts(TEXTS)], outputs=outputs(*names), headers=HEADERS, request_id="r-7")
    response = result.get_response()
    assert response.id == "r-7" and response.model_name == MODEL and response.model_version == "1"
    scores = v1(server, "/v1/score", {"texts": TEXTS})["results"]
    assert result.as_numpy("log_likelihood").tolist() == pytest.approx([s["logprob"] for s in scores], rel=1e-6)
    assert result.as_numpy("bits_per_char").tolist() == pytest.approx([s["bits_per_char"] for s in scores], rel=1e-5)
    labels = v1(server, "/v1/classify", {"texts": TEXTS})["results"]
    assert [v.decode() for v in result.as_numpy("label")] == [r["label"] for r in labels]
    vocabulary = [v.decode() for v in result.as_numpy("vocabulary")]
    probs = result.as_numpy("next_char_probs")
    assert probs.shape == (2, len(vocabulary))
    for row, text in zip(probs, TEXTS, strict=True):
        ranked = v1(server, "/v1/next-token", {"text": text, "top_k": 3})["candidates"]
        assert [vocabulary[i] for i in np.argsort(-row)[:3]] == [c["token"] for c in ranked]
        assert [float(row[vocabulary.index(c["token"])]) for c in ranked] == pytest.approx(
            [c["prob"] for c in ranked], abs=1e-5
        )
    # Typed contents instead of raw_input_contents: the same numbers.
    typed = texts(TEXTS)
    typed._raw_content = None
    typed._input.contents.bytes_contents.extend([t.encode() for t in TEXTS])
    again = triton.infer(MODEL, [typed], outputs=outputs("log_likelihood"), headers=HEADERS)
    assert again.as_numpy("log_likelihood").tolist() == result.as_numpy("log_likelihood").tolist()


def test_versions_and_unknown_models(triton: Any) -> None:
    pinned = triton.infer(MODEL, [texts(["a"])], model_version="1", headers=HEADERS)
    assert pinned.get_response().model_version == "1"
    for model, version in ((MODEL, "2"), (MODEL, "x"), ("nope", "")):
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(model, [texts(["a"])], model_version=version, headers=HEADERS)
        assert caught.value.status() == "StatusCode.NOT_FOUND" and caught.value.message()


def test_a_sequence_of_three_requests_equals_one_request(triton: Any) -> None:
    pieces = ["ROMEO: But ", "soft, what light", " through yonder"]
    total = 0.0
    for i, piece in enumerate(pieces):
        result = triton.infer(MODEL, [texts([piece])], outputs=outputs("log_likelihood", "next_char_probs"),
                              sequence_id=42, sequence_start=i == 0, sequence_end=i == 2, headers=HEADERS)  # fmt: skip
        total += float(result.as_numpy("log_likelihood")[0])
    whole = triton.infer(MODEL, [texts(["".join(pieces)])], outputs=outputs("log_likelihood", "next_char_probs"),
                         headers=HEADERS)  # fmt: skip
    assert total == pytest.approx(float(whole.as_numpy("log_likelihood")[0]), rel=1e-5)
    assert result.as_numpy("next_char_probs") == pytest.approx(whole.as_numpy("next_char_probs"), abs=1e-5)
    ended = lambda: triton.infer(MODEL, [texts(["x"])], sequence_id=42, headers=HEADERS)  # noqa: E731
    assert status_of(ended) == "StatusCode.INVALID_ARGUMENT"
    # A sequence belongs to the key that started it: another key does not find it.
    triton.infer(MODEL, [texts(["a"])], sequence_id=43, sequence_start=True, headers=HEADERS)
    other = {"authorization": f"Bearer {OTHER_KEY}"}
    stranger = lambda: triton.infer(MODEL, [texts(["b"])], sequence_id=43, headers=other)  # noqa: E731
    assert status_of(stranger) == "StatusCode.INVALID_ARGUMENT"
    assert triton.infer(MODEL, [texts(["b"])], sequence_id=43, sequence_end=True, headers=HEADERS)


def test_generation_whole_and_streamed_equal_v1(triton: Any, server: tuple[str, str]) -> None:
    params = {"max_tokens": 30, "seed": 11, "temperature": 0.8}
    expected = v1(server, "/v1/generate", {"prompt": "ROMEO:", **params})["choices"][0]
    whole = triton.infer(MODEL, [texts(["ROMEO:"], "text_input")], parameters=params, headers=HEADERS)
    assert [v.decode() for v in whole.as_numpy("text_output")] == [expected["text"]]
    results: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)), headers=HEADERS)
    try:
        triton.async_stream_infer(MODEL, [texts(["ROMEO:"], "text_input")], parameters=params, request_id="s1")
        pieces, final = [], None
        while final is None:
            result, error = results.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s1"
            pieces.append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                final = response.parameters["finish_reason"].string_param
        assert "".join(pieces) == expected["text"] and final == expected["finish_reason"] and len(pieces) > 1
        # A bad request on the stream answers with its error, and the stream goes on.
        triton.async_stream_infer(MODEL, [texts(["a"], "text_input")], parameters={"max_tokens": 0})
        result, error = results.get(timeout=30)
        assert result is None and "max_tokens" in error.message()
        triton.async_stream_infer(MODEL, [texts(["fine"])], outputs=outputs("bits_per_char"))
        result, error = results.get(timeout=30)
        assert error is None and result.as_numpy("bits_per_char").shape == (1,)
    finally:
        triton.stop_stream()


def test_bad_input_gets_clear_status_codes(triton: Any) -> None:
    wrong_type = grpcclient.InferInput("text", [1], "FP32")
    wrong_type.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    misshapen = texts(["a"])
    del misshapen._input.shape[:]
    misshapen._input.shape.extend([3])  # three elements declared, one sent
    unknown = texts(["a"], "prompt")
    too_long = texts(["a"])
    too_long._raw_content = (500).to_bytes(4, "little") + b"short"  # an element longer than its bytes
    cases = {
        "wrong datatype": [wrong_type],
        "shape that disagrees": [misshapen],
        "unknown input": [unknown],
        "element longer than the body": [too_long],
    }
    for what, inputs in cases.items():
        call = lambda inputs=inputs: triton.infer(MODEL, inputs, headers=HEADERS)  # noqa: E731
        assert status_of(call) == "StatusCode.INVALID_ARGUMENT", what
    assert status_of(lambda: triton.infer(MODEL, [texts(["a"])], outputs=outputs("logits"), headers=HEADERS)) == (
        "StatusCode.INVALID_ARGUMENT"
    )
    # Nothing was left behind: a good request still gets its answer.
    assert triton.infer(MODEL, [texts(["fine"])], headers=HEADERS).as_numpy("bits_per_char").shape == (1,)


def test_key_limits_apply_to_grpc(triton: Any) -> None:
    narrow = {"authorization": f"Bearer {NARROW_KEY}"}
    assert status_of(lambda: triton.infer(MODEL, [texts(["a"])], headers=narrow)) == "StatusCode.PERMISSION_DENIED"
    slow = {"authorization": f"Bearer {SLOW_KEY}"}
    codes = []
    for _ in range(3):
        try:
            triton.infer(MODEL, [texts(["a"])], headers=slow)
            codes.append("OK")
        except InferenceServerException as exc:
            codes.append(str(exc.status()))
    assert codes[0] == "OK" and "StatusCode.RESOURCE_EXHAUSTED" in codes[1:]


def test_grpc_calls_are_counted(triton: Any, server: tuple[str, str]) -> None:
    triton.infer(MODEL, [texts(["a"])], headers=HEADERS)
    metrics = requests.get(server[0] + "/metrics", timeout=10).text
    assert 'charlm_grpc_requests_total{code="OK",method="ModelInfer"}' in metrics
    assert 'charlm_grpc_requests_total{code="UNAUTHENTICATED"' in metrics
