"""OpenTelemetry traces: a real server exporting OTLP (over HTTP, and over gRPC) to a receiver on loopback
that decodes what arrives with `opentelemetry-proto`; and, with tracing off, no SDK and no exporter."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from benchmarks.otlp_receiver import attributes, grpc_receiver, http_receiver
from service.api.app import create_app
from service.engine import timings
from service.settings import Settings
from tests.conftest import gunicorn_process

SERVER_KIND = Span.SpanKind.SPAN_KIND_SERVER


def traceparent() -> tuple[str, str, str]:
    """A client's W3C traceparent: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def server_span(spans: list[Span]) -> Span:
    (found,) = [span for span in spans if span.kind == SERVER_KIND]
    return found


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {span.name: span for span in spans if span.parent_span_id == parent.span_id}


EXPORT_ENV = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "charlm-test"}


def test_next_token_stream_and_chat_each_give_a_span_tree_under_the_clients_trace(tiny_artifacts: Path) -> None:
    with http_receiver() as (endpoint, received):
        env = {**EXPORT_ENV, "WORKERS": "1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
        with gunicorn_process(tiny_artifacts, **env) as (proc, base):
            header, next_trace, client_span = traceparent()
            answer = requests.post(f"{base}/v1/next-token", json={"text": "To be, or not"},
                                   headers={"traceparent": header}, timeout=30)  # fmt: skip
            assert answer.status_code == 200
            stream_header, stream_trace, _ = traceparent()
            body: dict[str, Any] = {"model": "char-lstm", "prompt": "KING.", "max_tokens": 40, "stream": True}
            body["seed"] = 3
            with requests.post(f"{base}/v1/completions", json=body, headers={"traceparent": stream_header},
                               stream=True, timeout=30) as streamed:  # fmt: skip
                assert streamed.status_code == 200 and b"[DONE]" in streamed.content
            chat_header, chat_trace, _ = traceparent()
            chat = requests.post(
                f"{base}/v1/chat/completions",
                json={
                    "model": "char-lstm",
                    "messages": [{"role": "user", "content": "Speak."}],
                    "max_tokens": 30,
                    "seed": 5,
                },
                headers={"traceparent": chat_header},
                timeout=30,
            ).json()
            spans = received.wait_for(next_trace, {"POST /v1/next-token", "encode prompt"})
            stream_spans = received.wait_for(stream_trace, {"POST /v1/completions", "decode", "write stream"})
            chat_spans = received.wait_for(chat_trace, {"POST /v1/chat/completions", "decode"})
            log = proc.output()

    # next-token: a child of the client's span, with the engine's steps as its children
    root = server_span(spans)
    assert root.trace_id.hex() == next_trace and root.parent_span_id.hex() == client_span
    attrs = attributes(root.attributes)
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/v1/next-token"
    assert attrs["http.response.status_code"] == 200 and attrs["url.path"] == "/v1/next-token"
    assert attrs["charlm.model.version"].startswith("char-lstm") and attrs["charlm.prompt.chars"] == 13
    assert "charlm.prefix_cache.hit_chars" in attrs and "gen_ai.operation.name" not in attrs
    steps = children(spans, root)
    assert {"wait for admission", "encode prompt"} <= set(steps)
    waits = attributes(steps["wait for admission"].attributes)
    assert waits["charlm.wait.thread_ms"] >= 0 and waits["charlm.wait.scheduler_ms"] >= 0
    for step in steps.values():  # within the request's span
        assert root.start_time_unix_nano <= step.start_time_unix_nano <= step.end_time_unix_nano
        assert step.end_time_unix_nano <= root.end_time_unix_nano
    # the prompt's reading, with its prefix-cache lookup as an event; read alone, it links to nobody
    encode = steps["encode prompt"]
    assert attributes(encode.attributes)["charlm.prompt.chars"] == 13 and not encode.links
    (lookup,) = encode.events
    assert lookup.name == "prefix cache lookup" and "charlm.prefix_cache.hit_chars" in attributes(lookup.attributes)
    # the access line of the same request carries its trace id
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"route"' in line]
    assert any(line.get("trace_id") == next_trace and line["route"] == "/v1/next-token" for line in lines)

    # a stream: its decoding and its writing, and the generative-AI attributes
    stream_root = server_span(stream_spans)
    stream_attrs = attributes(stream_root.attributes)
    assert stream_attrs["gen_ai.operation.name"] == "text_completion"
    assert stream_attrs["gen_ai.request.max_tokens"] == 40 and stream_attrs["gen_ai.request.seed"] == 3
    assert stream_attrs["gen_ai.usage.input_tokens"] == 5 and stream_attrs["gen_ai.usage.output_tokens"] == 40
    assert stream_attrs["gen_ai.response.finish_reasons"] == ["length"]
    stream_steps = children(stream_spans, stream_root)
    assert attributes(stream_steps["decode"].attributes)["charlm.decode.chars"] == 40
    assert stream_steps["write stream"].end_time_unix_nano <= stream_root.end_time_unix_nano

    # chat: the usage the client was told is what the span says
    chat_attrs = attributes(server_span(chat_spans).attributes)
    assert chat_attrs["gen_ai.operation.name"] == "chat"
    assert chat_attrs["gen_ai.usage.output_tokens"] == chat["usage"]["completion_tokens"]
    assert chat_attrs["gen_ai.response.finish_reasons"] == [chat["choices"][0]["finish_reason"]]
    assert chat_attrs["gen_ai.response.model"].startswith(chat["model"])
    assert {"service.name": "charlm-test"}.items() <= received.resources[0].items()


@pytest.mark.unit
def test_prompts_encoded_together_link_each_others_requests(tiny_artifacts: Path) -> None:
    """Two traced requests' prompts read by one encoder call: each one's `encode prompt` span links to the
    other's request span (the engine's real records, made into spans as a request's end makes them)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from seqmodels.artifacts import load_artifacts
    from service.api.tracing import Tracing, _Ending
    from service.engine.decode_batch import DecodeBatch
    from service.engine.jobs import Job
    from service.engine.lstm_kernels import FusedStep

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(Settings(otel_traces_exporter="otlp"))
    tracing._pid, tracing._provider, tracing._tracer = os.getpid(), provider, provider.get_tracer("test")
    models = load_artifacts(tiny_artifacts)
    batch = DecodeBatch(FusedStep(models.lm), models.vocab.chars)
    requests_made = []
    for text in ("To be", "or not to be"):
        span = tracing.tracer().start_span(f"request {text}")
        records = timings.begin(span)
        job = Job.next_token([models.vocab.bos_id, *models.vocab.encode(text)])
        timings.end()
        requests_made.append((span, records, job))
    batch.admit([job for _, _, job in requests_made])
    batch.step()
    for span, records, _ in requests_made:
        _Ending(tracing, span, records, False, 0, time.time_ns()).finish()
    encodes = {
        span.parent.span_id: span
        for span in exporter.get_finished_spans()
        if span.name == "encode prompt" and span.parent is not None
    }
    first, second = (span.get_span_context().span_id for span, _, _ in requests_made)
    assert [link.context.span_id for link in encodes[first].links] == [second]
    assert [link.context.span_id for link in encodes[second].links] == [first]
    assert all(dict(span.attributes or {})["charlm.batch.prompts"] == 2 for span in encodes.values())


def test_traces_go_over_otlp_grpc_too(tiny_artifacts: Path) -> None:
    with grpc_receiver() as (endpoint, received):
        env = {**EXPORT_ENV, "WORKERS": "1", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}  # fmt: skip
        with gunicorn_process(tiny_artifacts, **env) as (_, base):
            header, trace_id, client_span = traceparent()
            answer = requests.post(f"{base}/v1/next-token", json={"text": "To be"}, headers={"traceparent": header},
                                   timeout=30)  # fmt: skip
            assert answer.status_code == 200
            spans = received.wait_for(trace_id, {"POST /v1/next-token", "encode prompt"})
    assert server_span(spans).parent_span_id.hex() == client_span


def test_a_request_without_traceparent_starts_a_trace_and_errors_are_traced(tiny_artifacts: Path) -> None:
    with http_receiver() as (endpoint, received):
        env = {**EXPORT_ENV, "WORKERS": "1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
        with gunicorn_process(tiny_artifacts, **env) as (_, base):
            answer = requests.post(f"{base}/v1/next-token", json={"text": 5}, timeout=30)
            assert answer.status_code == 400
            deadline = time.monotonic() + 30
            while not [s for s in received.spans if s.kind == SERVER_KIND and s.name == "POST /v1/next-token"]:
                assert time.monotonic() < deadline, "the 400's span never came"
                time.sleep(0.1)
    (span,) = [s for s in received.spans if s.kind == SERVER_KIND]
    assert not span.parent_span_id and attributes(span.attributes)["http.response.status_code"] == 400


def test_requests_the_sampler_leaves_out_are_served_and_not_exported(tiny_artifacts: Path) -> None:
    with http_receiver() as (endpoint, received):
        env = {**EXPORT_ENV, "WORKERS": "1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
               "OTEL_TRACES_SAMPLER": "always_off"}  # fmt: skip
        with gunicorn_process(tiny_artifacts, **env) as (_, base):
            for number in range(5):
                body: dict[str, Any] = {
                    "model": "char-lstm",
                    "prompt": f"To be {number}",
                    "max_tokens": 5,
                    "stream": number % 2 == 0,
                }
                assert requests.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200
                answer = requests.post(f"{base}/v1/next-token", json={"text": "To be"}, timeout=30)
                assert answer.status_code == 200
        # the server has stopped, which flushes its exporter: had it made spans, they would be here
    assert received.spans == []


@pytest.mark.unit
def test_with_tracing_off_nothing_of_it_is_installed(tiny_artifacts: Path) -> None:
    app = create_app(Settings(artifacts_dir=tiny_artifacts))
    assert app.extensions["tracing"] is None
    assert app.test_client().post("/v1/next-token", json={"text": "To be"}).status_code == 200
    assert timings.for_job() is None
    # In a process of its own: serving a request with tracing off imports no SDK and makes no exporter.
    script = (
        "import sys; from service.api.app import create_app; from service.settings import Settings; "
        f"app = create_app(Settings(artifacts_dir={str(tiny_artifacts)!r})); "
        "assert app.test_client().post('/v1/next-token', json={'text': 'To be'}).status_code == 200; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
def test_the_exporter_follows_opentelemetrys_variables() -> None:
    from service.api.tracing import enabled

    assert not enabled(Settings())
    assert enabled(Settings(otel_traces_exporter="otlp"))
    assert not enabled(Settings(otel_traces_exporter="otlp", otel_sdk_disabled=True))
    assert Settings(otel_exporter_otlp_protocol="grpc").otlp_traces_protocol() == "grpc"
    both = Settings(otel_exporter_otlp_protocol="grpc", otel_exporter_otlp_traces_protocol="http/protobuf")
    assert both.otlp_traces_protocol() == "http/protobuf"


@pytest.mark.unit
def test_a_propagator_that_is_not_installed_stops_start_up_with_a_clear_message(tiny_artifacts: Path) -> None:
    script = (
        "from service.api.app import create_app; from service.settings import Settings; "
        f"create_app(Settings(artifacts_dir={str(tiny_artifacts)!r}, otel_traces_exporter='otlp'))"
    )
    env = {**os.environ, "OTEL_PROPAGATORS": "no_such_propagator"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "OpenTelemetry traces cannot be set up as configured" in out.stderr


@pytest.mark.unit
def test_a_failure_of_tracing_costs_the_request_its_trace_not_its_answer(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.tracing import Tracing

    def broken(self: Tracing) -> Any:
        raise RuntimeError("no tracer today")

    app = create_app(Settings(artifacts_dir=tiny_artifacts, otel_traces_exporter="otlp"))
    monkeypatch.setattr(Tracing, "tracer", broken)
    client = app.test_client()
    answer = client.post("/v1/next-token", json={"text": "To be"})
    assert answer.status_code == 200 and answer.get_json()["candidates"]
    body = {"model": "char-lstm", "prompt": "To be", "max_tokens": 5, "stream": True}
    streamed = client.post("/v1/completions", json=body)
    assert streamed.status_code == 200 and b"[DONE]" in streamed.get_data()
    streamed.close()
    assert app.extensions["tracing"].failures >= 2 and timings.for_job() is None
