"""The Open Inference Protocol over gRPC, served by every worker beside its HTTP loop: one gRPC server per
worker process on GRPC_PORT, all bound with SO_REUSEPORT, so the kernel spreads the connections over the
workers as the HTTP listener's accept does. A client's HTTP/2 connection stays on the worker that took it.

Started after the fork (gRPC's threads do not survive one) and stopped with the worker: at SIGTERM it takes
no new calls and gives those running until GRACEFUL_TIMEOUT."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from service.api.inference_protocol.grpc import open_inference_grpc_pb2_grpc as pb_grpc
from service.api.inference_protocol.grpc.servicer import InferenceServicer, stream_handler
from service.api.quotas import KeyRing
from service.models.runtime import ModelRuntime

log = logging.getLogger("service")
MAX_RESPONSE_BYTES = 64 << 20  # a response's tensors (next_char_probs for MAX_TEXTS texts is far less)


def start_grpc_server(models: ModelRuntime, keys: KeyRing) -> grpc.Server | None:
    """This worker's gRPC server, started; None where GRPC_PORT is 0 or the port cannot be bound (logged:
    the worker goes on serving HTTP)."""
    settings = models.settings
    if settings.grpc_port == 0:
        return None
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=max(settings.grpc_max_calls, settings.grpc_threads),  # more: RESOURCE_EXHAUSTED
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ],
    )
    servicer = InferenceServicer(models, keys)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((stream_handler(servicer),))
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("gRPC is off in this worker: cannot listen on %s (%s)", address, exc)
        return None
    server.start()
    log.info("gRPC (the Open Inference Protocol) on %s", address)
    return server
