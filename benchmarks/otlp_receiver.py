"""A loopback OTLP trace receiver, over HTTP (`/v1/traces`) or gRPC, that decodes what it gets with
`opentelemetry-proto`: the other end of the service's traces in tests/test_tracing.py and
benchmarks/tracing.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class Spans:
    """What a receiver got: every span, by trace id (hex)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []

    def add(self, export: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in export.resource_spans:
                self.resources.append(attributes(resource_spans.resource.attributes))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)

    def of_trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.trace_id.hex() == trace_id]

    def wait_for(self, trace_id: str, names: set[str], limit: float = 30.0) -> list[Span]:
        """The trace's spans once every one of `names` has come (bounded)."""
        deadline = time.monotonic() + limit
        while True:
            found = self.of_trace(trace_id)
            if names <= {span.name for span in found}:
                return found
            assert time.monotonic() < deadline, f"spans of {trace_id}: {sorted(s.name for s in found)}"
            time.sleep(0.1)


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


@contextmanager
def http_receiver() -> Iterator[tuple[str, Spans]]:
    """OTLP/HTTP's trace endpoint on loopback: yields its URL and what it receives."""
    spans = Spans()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            export = trace_service_pb2.ExportTraceServiceRequest()
            export.ParseFromString(body)
            spans.add(export)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", spans
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def grpc_receiver() -> Iterator[tuple[str, Spans]]:
    """OTLP/gRPC's trace service on loopback: yields its address and what it receives."""
    spans = Spans()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            spans.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", spans
    finally:
        server.stop(grace=None)


def main() -> int:
    """As a process of its own (benchmarks.tracing): print the endpoint, receive until stdin closes, then
    print how many spans came."""
    import sys

    with http_receiver() as (endpoint, received):
        print(endpoint, flush=True)
        sys.stdin.read()
        print(len(received.spans), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
