"""The Open Inference Protocol under /v2: through Flask's test client (the same numbers as /v1, every bad
input a 400 in the protocol's `{"error": ...}`), then with Triton's own HTTP client against the real
gunicorn server on loopback, in binary tensors (its default) and in JSON."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.api.inference_protocol.tensors import TensorError, decode_bytes_elements, read_inputs
from tests.conftest import gunicorn_server

TEXTS = ["To be, or not to be", "ROMEO:\nBut soft"]
INFER = "/v2/models/char-lstm/infer"


def text_input(texts: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts, **extra}


def infer(client: FlaskClient, body: dict[str, Any], path: str = INFER) -> tuple[int, Any]:
    response = client.post(path, json=body)
    return response.status_code, response.get_json()


def outputs_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in body["outputs"]}


# --------------------------------------------------------------------------- in-process


@pytest.mark.unit
def test_health_and_server_metadata(client: FlaskClient) -> None:
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    server = client.get("/v2").get_json()
    assert server["name"] == "charlm-serve" and "binary_tensor_data" in server["extensions"]


@pytest.mark.unit
def test_model_metadata_names_every_tensor(client: FlaskClient) -> None:
    for path in ("/v2/models/char-lstm", "/v2/models/char-lstm/versions/1"):
        meta = client.get(path).get_json()
        assert meta["name"] == "char-lstm" and meta["versions"] == ["1"]
        assert meta["inputs"] == [
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
            {"name": "text_input", "datatype": "BYTES", "shape": [1]},
        ]
        outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
        vocab = outputs["vocabulary"][1][0]
        assert outputs["next_char_probs"] == ("FP32", [-1, vocab])
        assert outputs["log_likelihood"] == ("FP32", [-1]) and outputs["label"] == ("BYTES", [-1])
    assert client.get("/v2/models/char-lstm/ready").get_json() == {"name": "char-lstm", "ready": True}
    assert client.get("/v2/models/char-lstm/versions/2/ready").status_code == 404
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and set(missing.get_json()) == {"error"}


@pytest.mark.unit
def test_infer_gives_the_numbers_v1_gives(client: FlaskClient) -> None:
    status, body = infer(client, {"id": "r1", "inputs": [text_input(TEXTS)]})
    assert status == 200 and body["id"] == "r1" and body["model_version"] == "1"
    out = outputs_of(body)
    vocabulary = out["vocabulary"]["data"]
    rows, columns = out["next_char_probs"]["shape"]
    assert (rows, columns) == (2, len(vocabulary))
    scores = client.post("/v1/score", json={"texts": TEXTS}).get_json()["results"]
    labels = client.post("/v1/classify", json={"texts": TEXTS}).get_json()["results"]
    for i, text in enumerate(TEXTS):
        assert out["log_likelihood"]["data"][i] == pytest.approx(scores[i]["logprob"], abs=1e-9)
        assert out["bits_per_char"]["data"][i] == pytest.approx(scores[i]["bits_per_char"], abs=1e-9)
        assert out["label"]["data"][i] == labels[i]["label"]
        probs = out["next_char_probs"]["data"][i * columns : (i + 1) * columns]
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-9)
        top = client.post("/v1/next-token", json={"text": text, "top_k": 3}).get_json()["candidates"]
        best = sorted(range(columns), key=lambda j: -probs[j])[:3]
        assert [vocabulary[j] for j in best] == [c["token"] for c in top]
        assert [probs[j] for j in best] == pytest.approx([c["prob"] for c in top], abs=1e-9)
        label_probs = out["label_probs"]["data"][i * len(out["labels"]["data"]) : (i + 1) * len(out["labels"]["data"])]
        assert dict(zip(out["labels"]["data"], label_probs, strict=True)) == pytest.approx(labels[i]["probabilities"])


@pytest.mark.unit
def test_outputs_by_name_nested_data_and_classification(client: FlaskClient) -> None:
    nested = {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": [[TEXTS[0]], [TEXTS[1]]]}
    wanted = [{"name": "bits_per_char"}, {"name": "next_char_probs", "parameters": {"classification": 2}}]
    status, body = infer(client, {"inputs": [nested], "outputs": wanted})
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["bits_per_char", "next_char_probs"]
    top = outputs_of(body)["next_char_probs"]
    assert top["datatype"] == "BYTES" and top["shape"] == [2, 2]
    first = client.post("/v1/next-token", json={"text": TEXTS[0], "top_k": 2}).get_json()["candidates"]
    for entry, candidate in zip(top["data"][:2], first, strict=True):
        score, index, char = entry.split(":", 2)
        assert char == candidate["token"] and float(score) == pytest.approx(candidate["prob"], abs=1e-6)
        assert int(index) >= 0


@pytest.mark.unit
def test_binary_tensors_in_and_out(client: FlaskClient) -> None:
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "log_likelihood", "parameters": {"binary_data": True}}, {"name": "label"}],
    }
    head = json.dumps(header).encode()
    response = client.post(INFER, data=head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    body, tail = json.loads(response.data[:length]), response.data[length:]
    out = outputs_of(body)
    assert out["log_likelihood"]["parameters"] == {"binary_data_size": 8} and len(tail) == 8
    likelihoods = struct.unpack("<2f", tail)
    scores = client.post("/v1/score", json={"texts": TEXTS}).get_json()["results"]
    assert likelihoods == pytest.approx([s["logprob"] for s in scores], rel=1e-6)  # float32 on the wire
    assert out["label"]["data"] == [
        r["label"] for r in client.post("/v1/classify", json={"texts": TEXTS}).get_json()["results"]
    ]


BAD_INFER = [
    ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
    ({"inputs": [text_input(["a"], shape=[3])]}, "holds 3 elements"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": [["a", "b"]]}]}, "shape"),
    ({"inputs": [text_input(["a"], name="prompt")]}, "unknown input"),
    ({"inputs": [text_input(["a"], datatype="TEXT")]}, "unknown datatype"),
    ({"inputs": [text_input(["a"])], "outputs": [{"name": "logits"}]}, "unknown output"),
    ({"inputs": [text_input(["a"])], "outputs": [{"name": "label", "parameters": {"classification": 2}}]}, "scores"),
    ({"inputs": [text_input(["a"])], "parameters": {"sequence_start": True}}, "need a sequence_id"),
    ({"inputs": [text_input(["a"])], "parameters": {"sequence_id": 7}}, "has not started"),
    ({"inputs": [text_input(["a", "b"])], "parameters": {"sequence_id": 8, "sequence_start": True}}, "one text"),
    ({"inputs": [text_input(["a"])], "parameters": {"sequence_id": 1.5, "sequence_start": True}}, "sequence_id"),
    ({"inputs": [text_input(["a"], name="text_input")], "parameters": {"max_tokens": 0}}, "max_tokens"),
    ({"inputs": [text_input(["a"], name="text_input")], "parameters": {"n": 2}}, "not a generation parameter"),
    ({"inputs": [text_input(["a", "b"], name="text_input")]}, "one text"),
    ({"inputs": [text_input(["a"])], "parameters": {"timeout": -1}}, "timeout"),
    ({"inputs": [text_input([""])], "outputs": [{"name": "bits_per_char"}]}, "at least one character"),
    ({"inputs": [text_input(["a", "b", "c", "d", "e"])]}, "at most 4 texts"),
    ({"inputs": [text_input(["x" * 301])]}, "longer than 300"),
    ({"inputs": []}, "inputs"),
    ({}, "inputs"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("body", "says"), BAD_INFER)
def test_bad_infer_requests_get_400_in_the_protocols_envelope(client: FlaskClient, body: Any, says: str) -> None:
    status, answer = infer(client, body)
    assert status == 400 and set(answer) == {"error"} and says in answer["error"], answer
    assert infer(client, {"inputs": [text_input(["fine"])]})[0] == 200  # nothing left behind


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "header", "says"),
    [
        (b'{"inputs": []}', "999", "longer than"),
        (b'{"inputs": []}', "twelve", "byte count"),
        (b"\xff\xfe", None, "does not parse"),
        (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}'
         + struct.pack("<I", 500) + b"short", "AUTO", "longer than its binary data"),
        (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 64}}]}'
         + b"abc", "AUTO", "runs past the end"),
    ],
)  # fmt: skip
def test_malformed_binary_bodies_get_400(client: FlaskClient, body: bytes, header: str | None, says: str) -> None:
    if header == "AUTO":
        header = str(body.index(b"}]}") + 3)
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 400 and says in response.get_json()["error"], response.get_json()


@pytest.mark.unit
def test_unknown_models_and_versions_get_404(client: FlaskClient) -> None:
    for path in (
        "/v2/models/nope/infer",
        "/v2/models/char-lstm/versions/9/infer",
        "/v2/models/char-lstm/versions/x/infer",
    ):
        status, answer = infer(client, {"inputs": [text_input(["a"])]}, path)
        assert status == 404 and set(answer) == {"error"}
    status, _ = infer(client, {"inputs": [text_input(["a"])]}, "/v2/models/char-lstm/versions/1/infer")
    assert status == 200


PIECES = ["ROMEO: But ", "soft, what light", " through yonder"]


@pytest.mark.unit
def test_a_sequence_of_three_requests_equals_one_request(client: FlaskClient) -> None:
    """Triton's sequence parameters keep the LSTM state between requests: the pieces' log-likelihoods add
    up to the whole text's, and the last piece's next-character distribution is the whole text's."""
    total = 0.0
    for i, piece in enumerate(PIECES):
        flags = {"sequence_id": "reader-1", "sequence_start": i == 0, "sequence_end": i == len(PIECES) - 1}
        status, body = infer(client, {"inputs": [text_input([piece])], "parameters": flags})
        assert status == 200, body
        total += outputs_of(body)["log_likelihood"]["data"][0]
    status, whole = infer(client, {"inputs": [text_input(["".join(PIECES)])]})
    assert total == pytest.approx(outputs_of(whole)["log_likelihood"]["data"][0], rel=1e-5)
    last = outputs_of(body)["next_char_probs"]["data"]
    assert last == pytest.approx(outputs_of(whole)["next_char_probs"]["data"], abs=1e-5)
    status, gone = infer(client, {"inputs": [text_input(["x"])], "parameters": {"sequence_id": "reader-1"}})
    assert status == 400 and "has not started" in gone["error"]  # it ended with its third request


@pytest.mark.unit
def test_sequences_are_apart_and_restart(client: FlaskClient) -> None:
    def step(sequence_id: int, text: str, start: bool = False) -> float:
        status, body = infer(client, {"inputs": [text_input([text])],
                                      "parameters": {"sequence_id": sequence_id, "sequence_start": start}})  # fmt: skip
        assert status == 200, body
        return float(outputs_of(body)["log_likelihood"]["data"][0])

    first = step(1, "KING: ", start=True)
    assert step(2, "KING: ", start=True) == first  # a second sequence starts from the start symbol too
    after = step(1, "Speak")
    assert step(2, "Speak") == pytest.approx(after, rel=1e-6)  # each went on from its own state
    assert step(1, "KING: ", start=True) == first  # sequence_start again: from the start, not from "Speak"


@pytest.mark.unit
def test_infer_with_text_input_generates(client: FlaskClient) -> None:
    params = {"max_tokens": 24, "seed": 5, "temperature": 0.8}
    v1 = client.post("/v1/generate", json={"prompt": "ROMEO:", **params}).get_json()["choices"][0]
    status, body = infer(client, {"inputs": [text_input(["ROMEO:"], name="text_input")], "parameters": params})
    assert status == 200 and outputs_of(body)["text_output"]["data"] == [v1["text"]]


@pytest.mark.unit
def test_generate_extension_equals_v1_generate(client: FlaskClient) -> None:
    params = {"max_tokens": 24, "seed": 5, "temperature": 0.8}
    whole = client.post("/v2/models/char-lstm/generate", json={"text_input": "ROMEO:", "parameters": params})
    assert whole.status_code == 200
    v1 = client.post("/v1/generate", json={"prompt": "ROMEO:", **params}).get_json()["choices"][0]
    assert whole.get_json()["text_output"] == v1["text"] and whole.get_json()["finish_reason"] == v1["finish_reason"]
    stream = client.post("/v2/models/char-lstm/generate_stream", json={"text_input": "ROMEO:", "parameters": params})
    events = [json.loads(line[6:]) for line in stream.get_data(as_text=True).split("\n\n") if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == v1["text"] and events[-1]["finish_reason"] == "length"
    for bad, says in ((1000, "at most 50"), ("many", "integer")):
        answer = client.post(
            "/v2/models/char-lstm/generate", json={"text_input": "a", "parameters": {"max_tokens": bad}}
        )
        assert (
            answer.status_code == 400
            and says in answer.get_json()["error"]
            and "parameters.max_tokens" in answer.get_json()["error"]
        )
    reserved = client.post("/v2/models/char-lstm/generate", json={"text_input": "a", "parameters": {"n": 2}})
    assert reserved.status_code == 400 and "parameters.n" in reserved.get_json()["error"]


@pytest.mark.unit
def test_tensor_reader_checks_bytes_elements() -> None:
    raw = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 3) + b"you"
    assert decode_bytes_elements(memoryview(raw), 2, "t") == ["hi", "you"]
    with pytest.raises(TensorError, match="ends inside"):
        decode_bytes_elements(memoryview(raw[:3]), 1, "t")
    with pytest.raises(TensorError, match="not UTF-8"):
        decode_bytes_elements(memoryview(struct.pack("<I", 1) + b"\xff"), 1, "t")
    with pytest.raises(TensorError, match="finite"):
        read_inputs(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [float("nan")]}]}, memoryview(b"")
        )
    with pytest.raises(TensorError, match="bytes after"):
        read_inputs({"inputs": [text_input(["a"])]}, memoryview(b"extra"))


# --------------------------------------------------------------------------- Triton's client, real server

KEY = "protocol-key"


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[str]:
    with gunicorn_server(tiny_artifacts, WORKERS="1", API_KEYS=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def triton(server: str) -> Any:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=30.0)
    yield client
    client.close()


def text_of(value: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return value.decode() if isinstance(value, bytes) else value


def auth() -> dict[str, str]:
    """The key, in a dict of its own per call: tritonclient adds its own headers to the one it is given."""
    return {"Authorization": f"Bearer {KEY}"}


def test_tritonclient_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()  # the probes need no key
    assert triton.is_model_ready("char-lstm", headers=auth()) and not triton.is_model_ready("nope", headers=auth())
    meta = triton.get_model_metadata("char-lstm", headers=auth())
    assert meta["inputs"][0]["name"] == "text"
    assert triton.get_server_metadata(headers=auth())["name"] == "charlm-serve"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_matches_v1(triton: Any, server: str, binary: bool) -> None:
    import numpy as np
    import requests
    import tritonclient.http as httpclient

    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("log_likelihood", "label")]
    outputs.append(httpclient.InferRequestedOutput("next_char_probs", binary_data=binary, class_count=1))
    result = triton.infer("char-lstm", [text], model_version="1", outputs=outputs, headers=auth())
    scores = requests.post(f"{server}/v1/score", json={"texts": TEXTS}, headers=auth(), timeout=30).json()["results"]
    labels = requests.post(f"{server}/v1/classify", json={"texts": TEXTS}, headers=auth(), timeout=30).json()["results"]
    assert result.as_numpy("log_likelihood").tolist() == pytest.approx([s["logprob"] for s in scores], rel=1e-6)
    assert [text_of(v) for v in result.as_numpy("label")] == [r["label"] for r in labels]
    top = requests.post(f"{server}/v1/next-token", json={"text": TEXTS[0], "top_k": 1}, headers=auth(), timeout=30)
    assert text_of(result.as_numpy("next_char_probs")[0][0]).split(":", 2)[2] == top.json()["candidates"][0]["token"]


def test_tritonclient_sees_clear_errors(triton: Any) -> None:
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    wrong = httpclient.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    unknown = httpclient.InferInput("prompt", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"a"], dtype=np.object_))
    for inputs, model, status in (
        ([wrong], "char-lstm", "400"),
        ([unknown], "char-lstm", "400"),
        ([unknown], "nope", "404"),
    ):
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(model, inputs, headers=auth())
        assert caught.value.status() == status and caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("char-lstm")  # no key
    assert caught.value.status() == "401"
    fine = httpclient.InferInput("text", [1], "BYTES")
    fine.set_data_from_numpy(np.array([b"fine"], dtype=np.object_))
    assert triton.infer("char-lstm", [fine], headers=auth()).as_numpy("bits_per_char").shape == (1,)


@pytest.mark.unit
def test_the_event_loops_own_answers_use_the_protocols_envelope_on_v2() -> None:
    from service.server.loop_answers import error_answer

    for protocol, expected in ((True, {"error": "busy"}), (False, None)):
        answer = error_answer(503, "Service Unavailable", "busy", "service_unavailable", "overloaded",
                              protocol=protocol)  # fmt: skip
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body == expected if protocol else body["error"]["code"] == "overloaded"
