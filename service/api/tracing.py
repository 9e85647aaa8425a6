"""OpenTelemetry traces of the HTTP API: off unless configured, and then one span per request with children
for what it spent its time on.

Configured by OpenTelemetry's own variables. `OTEL_TRACES_EXPORTER` (`none` here unless set) names the
exporter: `otlp` over `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`,
the default, or `grpc`), or `console`. The SDK reads the rest itself: the endpoint, headers, timeout and
compression (`OTEL_EXPORTER_OTLP_*`), the sampler (`OTEL_TRACES_SAMPLER`, parent-based always-on by
default), the batching of exports (`OTEL_BSP_*`), the propagators (`OTEL_PROPAGATORS`, W3C trace context
and baggage) and the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`). `OTEL_SDK_DISABLED=true`
turns it off whatever else is set. Off, nothing of the SDK is imported and no exporter exists. Health
probes and /metrics are never traced.

A request's span starts when the worker's event loop had read it whole, so it covers the wait for a
request thread, and ends when its response (a stream: its last byte) is written. Its `traceparent`, where
it sends one, makes it a child of the caller's span. The engine's records (service.engine.timings) become
child spans once the request has ended: the wait for admission (for a request thread, then for the decode
scheduler), the prompt's encoding (with its prefix-cache lookup as an event), the decoding, and the
writing of a stream. One encoder call reads many requests' prompts at once, so a request's `encode prompt`
span links to the spans of the other requests its encoder calls served, and says how many prompts they
read together; a span of its own per call would cost more than the rest of a request's trace.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from typing import Any

from flask import Flask, Response, g, request

from service import lifecycle
from service.engine import timings
from service.settings import Settings

MAX_LINKS = 63  # an encode span links to at most this many other requests (a batch holds 64 prompts at most)

log = logging.getLogger("service.tracing")

# Probes and scrapes come every few seconds from the platform, not from users: they are not traced.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})

# The operation names of OpenTelemetry's generative-AI conventions, for the routes they fit.
GEN_AI_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/generate": "text_completion",
}


def enabled(settings: Settings) -> bool:
    """Whether the settings ask for traces (an exporter named, the SDK not disabled)."""
    return not settings.otel_sdk_disabled and settings.otel_traces_exporter != "none"


class Tracing:
    """The tracer of one process: made at the first request in each process (after gunicorn's fork, where
    the exporter's thread must live), from the settings the app was made with."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # makes the tracer once per process
        self._pid = 0
        self._tracer: Any = None
        self._provider: Any = None
        self.failures = 0  # hooks that raised (guarded)

    def tracer(self) -> Any:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._provider, self._tracer = self._make()
                    self._pid = os.getpid()
        return self._tracer

    def _make(self) -> tuple[Any, Any]:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {SERVICE_NAME: "charlm-serve"})
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
        exporter: SpanExporter
        if self.settings.otel_traces_exporter == "console":
            exporter = ConsoleSpanExporter()
        else:
            module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{self._otlp_kind()}.trace_exporter")
            exporter = module.OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider, provider.get_tracer("service.api.tracing")

    def _otlp_kind(self) -> str:
        return "grpc" if self.settings.otlp_traces_protocol() == "grpc" else "http"

    def check(self) -> None:
        """Import what tracing will use, so that a configuration it cannot follow (OTEL_PROPAGATORS naming a
        propagator that is not installed, say) stops start-up with a clear message, not every request."""
        modules = ["opentelemetry.propagate", "opentelemetry.sdk.trace"]  # the first reads OTEL_PROPAGATORS
        if self.settings.otel_traces_exporter == "otlp":
            modules.append(f"opentelemetry.exporter.otlp.proto.{self._otlp_kind()}.trace_exporter")
        try:
            for name in modules:
                importlib.import_module(name)
        except (ImportError, ValueError) as exc:
            raise RuntimeError(f"OpenTelemetry traces cannot be set up as configured: {exc}") from exc

    def guarded(self, hook: Any, *args: Any) -> Any:
        """Run a tracing hook; a failure of tracing is logged (the first with its traceback) and costs the
        request its trace, never its answer."""
        try:
            return hook(*args)
        except Exception:
            self.failures += 1
            (log.exception if self.failures == 1 else log.warning)("tracing a request failed; it goes untraced")
            timings.end()
            return None

    def flush(self, timeout_millis: int = 5000) -> bool:
        """Export what is buffered now (tests and shutdown)."""
        return self._provider is None or bool(self._provider.force_flush(timeout_millis))


def install(app: Flask, settings: Settings) -> None:
    """Trace every request of `app` when the settings ask for it; else nothing is installed at all."""
    app.extensions["tracing"] = None
    if not enabled(settings):
        return
    tracing = app.extensions["tracing"] = Tracing(settings)
    tracing.check()
    app.before_request(lambda: tracing.guarded(_begin, tracing))
    app.after_request(lambda response: tracing.guarded(_after, tracing, response) or response)
    app.teardown_request(lambda _exc: tracing.guarded(_teardown, tracing))


def _arrival_ns() -> int:
    """When the loop had the request whole, on the wall clock; now where it is not known."""
    now_ns, arrived = time.time_ns(), lifecycle.arrival()
    if arrived is None:
        return now_ns
    return now_ns - max(int((time.monotonic() - arrived) * 1e9), 0)


class _EnvironGetter:
    """Reads propagation headers straight from the WSGI environ (`traceparent` is HTTP_TRACEPARENT)."""

    @staticmethod
    def get(environ: dict[str, Any], key: str) -> list[str] | None:
        value = environ.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    @staticmethod
    def keys(environ: dict[str, Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in environ if k.startswith("HTTP_")]


def _begin(tracing: Tracing) -> None:
    environ = request.environ
    path = environ.get("PATH_INFO", "")
    if path in UNTRACED_PATHS:
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    method = environ.get("REQUEST_METHOD", "")
    rule = request.url_rule
    route = rule.rule if rule is not None else None
    # The sampler decides first, on the span's name and parent (the standard samplers look at no more);
    # a request it leaves out costs no more than that.
    span = tracing.tracer().start_span(
        f"{method} {route}" if route else method,
        context=propagate.extract(environ, getter=_EnvironGetter),  # type: ignore[arg-type]
        kind=SpanKind.SERVER, start_time=_arrival_ns(),
    )  # fmt: skip
    if not span.is_recording():  # sampled out: nothing to record, and nothing to end
        timings.end()
        return
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": environ.get("wsgi.url_scheme", "http"),
        "server.address": environ.get("SERVER_NAME", ""),
        "client.address": environ.get("REMOTE_ADDR", ""),
        "user_agent.original": environ.get("HTTP_USER_AGENT", ""),
    }
    if route is not None:
        attributes["http.route"] = route
    span.set_attributes(attributes)
    g.trace_span, g.trace_ended = span, False
    g.trace_id = format(span.get_span_context().trace_id, "032x")
    g.trace_threaded_ns = time.time_ns()  # the wait for a request thread ended here
    g.trace_jobs = timings.begin(span)


def _after(tracing: Tracing, response: Response) -> Response:
    span = g.get("trace_span")
    if span is None:
        return response
    attributes: dict[str, Any] = {"http.response.status_code": response.status_code}
    if response.status_code >= 500:
        from opentelemetry.trace import Status, StatusCode

        attributes["error.type"] = str(response.status_code)
        span.set_status(Status(StatusCode.ERROR))
    answering = g.get("model_answering")
    if answering is not None:
        attributes["charlm.model.version"] = answering.id
    operation = GEN_AI_OPERATIONS.get(request.path)
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
        attributes["gen_ai.provider.name"] = "charlm-serve"
        if answering is not None:
            attributes["gen_ai.response.model"] = answering.id
        parsed = g.get("parsed_request")
        for field, name in (("model", "gen_ai.request.model"), ("max_tokens", "gen_ai.request.max_tokens"),
                            ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                            ("seed", "gen_ai.request.seed"), ("n", "gen_ai.request.choice.count")):  # fmt: skip
            value = getattr(parsed, field, None)
            if isinstance(value, int | float | str) and not isinstance(value, bool):
                attributes[name] = value
    span.set_attributes(attributes)
    # The response is written after Flask's request context is gone: what _finish needs is taken now.
    jobs = g.get("trace_jobs")  # the same list the engine's jobs join while a stream is read
    ending = _Ending(tracing, span, [] if jobs is None else jobs, operation is not None,
                     time.time_ns() if response.is_streamed else 0, g.trace_threaded_ns)  # fmt: skip
    response.call_on_close(lambda: tracing.guarded(ending.finish))
    g.trace_ended = True
    return response


def _teardown(tracing: Tracing) -> None:
    """A request that raised past the error handlers never reached `_after`: its span ends here."""
    if not g.get("trace_ended", True):
        g.trace_ended = True
        ending = _Ending(tracing, g.trace_span, g.get("trace_jobs") or [], False, 0, g.get("trace_threaded_ns", 0))
        ending.finish()


class _Ending:
    """What ends a request's span once its response is written: the engine's records become its children."""

    def __init__(self, tracing: Tracing, span: Any, jobs: list[timings.JobTrace], generative: bool,
                 stream_from_ns: int, threaded_ns: int) -> None:  # fmt: skip
        self.tracing, self.span, self.jobs = tracing, span, jobs
        self.threaded_ns = threaded_ns  # when a request thread took it up
        self.generative = generative  # a route of the generative-AI conventions: their usage attributes too
        self.stream_from_ns = stream_from_ns  # a stream: when its writing began (its headers went out)

    def finish(self) -> None:
        from opentelemetry.trace import Link, set_span_in_context

        ended_ns = time.time_ns()
        timings.end()
        span, tracing = self.span, self.tracing
        tracer, context = tracing.tracer(), set_span_in_context(span)

        def child(name: str, start: int, end: int, **options: Any) -> None:
            if start and end >= start:
                tracer.start_span(name, context=context, start_time=start, **options).end(end_time=end)

        # Admission: from the loop's queue (when it waited there) to the decode scheduler taking its first job
        # into a batch, with the wait for a thread and the wait for the scheduler as its attributes.
        started = span.start_time
        admitted = self.jobs[0].taken_ns if self.jobs and self.jobs[0].taken_ns else self.threaded_ns
        waits = {"charlm.wait.thread_ms": (self.threaded_ns - started) / 1e6}
        if self.jobs and self.jobs[0].taken_ns:
            waits["charlm.wait.scheduler_ms"] = (self.jobs[0].taken_ns - self.jobs[0].submitted_ns) / 1e6
        child("wait for admission", started, admitted, attributes=waits)
        for job in self.jobs:
            # The prompt's reading: from its prefix-cache lookup (an event, it takes microseconds) through
            # the encoder calls that read the rest, linked to the requests those calls read prompts for too.
            others = {id(o): o for batch in job.batches for o in batch.contexts if o is not job.context}
            links = [Link(o.get_span_context()) for o in list(others.values())[:MAX_LINKS]]
            lookup = job.cache_lookup_ns
            begun = lookup[0] if lookup is not None else job.batches[0].started_ns if job.batches else 0
            if begun:
                attributes = {"charlm.prompt.chars": job.prompt_chars, "charlm.prompt.batches": len(job.batches),
                              "charlm.prefix_cache.hit_chars": job.cache_hit_chars}  # fmt: skip
                if job.batches:
                    attributes["charlm.batch.prompts"] = max(b.prompts for b in job.batches)
                encoding = tracer.start_span("encode prompt", context=context, start_time=begun, links=links,
                                             attributes=attributes)  # fmt: skip
                if lookup is not None:
                    hit = {"charlm.prefix_cache.hit_chars": job.cache_hit_chars,
                           "charlm.prefix_cache.lookup_us": (lookup[1] - lookup[0]) / 1e3}  # fmt: skip
                    encoding.add_event("prefix cache lookup", attributes=hit, timestamp=lookup[0])
                encoding.end(end_time=job.batches[-1].ended_ns if job.batches else lookup[1] if lookup else begun)
            decoded = {"charlm.decode.chars": job.generated_chars}
            child("decode", job.decode_started_ns, job.finished_ns, attributes=decoded)
        if self.stream_from_ns:
            child("write stream", self.stream_from_ns, ended_ns)
        if self.jobs:
            prompt = sum(job.prompt_chars for job in self.jobs)
            generated = sum(job.generated_chars for job in self.jobs)
            usage: dict[str, Any] = {
                "charlm.prefix_cache.hit_chars": sum(job.cache_hit_chars for job in self.jobs),
                "charlm.prompt.chars": prompt,
                "charlm.generated.chars": generated,
            }
            reasons = [reason for job in self.jobs for reason in job.finish_reasons]
            if self.generative:
                usage["gen_ai.usage.input_tokens"], usage["gen_ai.usage.output_tokens"] = prompt, generated
                if reasons:
                    usage["gen_ai.response.finish_reasons"] = reasons
            span.set_attributes(usage)
        span.end(end_time=ended_ns)
