"""Service configuration, read once from environment variables (no prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # The server (gunicorn.conf.py reads these once, in the master).
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 in a container")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    workers: int = Field(2, ge=1, le=256, description="gunicorn worker processes; WORKERS x TORCH_THREADS = CPUs")
    threads: int = Field(32, ge=1, le=4096, description="per worker: request threads (requests computing at once)")
    timeout: int = Field(60, ge=1, description="a worker whose event loop is silent this long is restarted")
    graceful_timeout: int = Field(
        30, ge=1, description="on SIGTERM, running requests and streams get this long to end (finish_reason shutdown)"
    )
    balance_connections: bool = Field(
        True, description="workers spread new connections evenly; false: whichever worker wakes first accepts"
    )

    # The models.
    artifacts_dir: Path = Field(
        Path("artifacts"),
        description="folder written by `python -m training.run`, served as the one model `char-lstm` "
        "(not used when MODEL_REPOSITORY is set)",
    )
    model_repository: Path | None = Field(
        None,
        description="a model repository: NAME/VERSION/ folders, each written by `python -m training.run "
        "--repository DIR --name NAME`; each model's newest verified version serves, or its versions by weight",
    )
    default_model: str = Field(
        "", description="the model of requests that name none; empty: the only model, else the first by name"
    )
    repository_poll_seconds: float = Field(
        0.0,
        ge=0,
        description="look for new, changed and removed versions this often; 0: only at start-up and on SIGHUP "
        "to the gunicorn master",
    )
    model_versions: int = Field(
        2,
        ge=1,
        le=64,
        description="per model: the newest verified versions kept loaded; the newest serves, older ones answer "
        "requests pinned to them (NAME@VERSION)",
    )
    warmup_batch_sizes: str = Field(
        "",
        pattern=r"^(\d{1,4}(,\d{1,4})*)?$",
        description="before a version serves (at start-up and on rollout), it runs synthetic requests at these "
        "numbers of prompts and decode rows at once (1,8,32, say), so the first real requests do not pay "
        "first-call costs; empty (the default, as it bought nothing measurable on the machines measured): none",
    )
    warmup_prompt_chars: int = Field(100, ge=1, le=255, description="the length of the warmup's synthetic prompts")
    traffic_weights: str = Field(
        "",
        description='weights of unpinned requests over a model\'s loaded versions, {"MODEL": {"VERSION": weight}}, '
        "for models whose repository folder has no traffic.json; empty: the newest version takes them all",
    )
    quality_gate: bool = Field(
        True, description="compare a new version with the serving one before it takes traffic (docs/models.md)"
    )
    quality_gate_bits: float = Field(
        0.05,
        ge=0,
        description="the quality gate refuses a new version whose bits per character on the probe text exceed "
        "the serving version's by more than this",
    )
    model_memory_mb: float = Field(
        512.0,
        gt=0,
        description="per worker: memory the loaded versions may hold in all (weights, packed kernels, prefix "
        "caches); a version that would go over it is not loaded",
    )
    log_level: str = Field(
        "INFO",
        pattern=r"^(?i)(DEBUG|INFO|WARNING|ERROR|CRITICAL)$",
        description="DEBUG, INFO (one JSON access line per request), WARNING, ERROR or CRITICAL",
    )
    # Traces (service.api.tracing): OpenTelemetry's own variables; the SDK reads the rest of them itself.
    otel_traces_exporter: Literal["none", "otlp", "console"] = Field(
        "none", description="OpenTelemetry traces: none (the default here: off), otlp or console"
    )
    otel_exporter_otlp_traces_protocol: Literal["", "http/protobuf", "grpc"] = Field(
        "", description="OTLP for traces over http/protobuf or grpc; empty: OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    otel_exporter_otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="OTLP's protocol for every signal, where a signal's own is not set"
    )
    otel_sdk_disabled: bool = Field(False, description="true: no traces, whatever OTEL_TRACES_EXPORTER says")
    torch_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="torch threads of each worker's scheduler (prompt encoding, decode steps); scoring, "
        "classifying and model loads use one. WORKERS x TORCH_THREADS should equal the CPUs",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_texts: int = Field(64, ge=1, description="texts per score or classify request")
    max_text_chars: int = Field(4096, ge=1, description="characters per text or prompt")
    max_tokens: int = Field(1024, ge=1, description="cap on max_tokens for one generation")
    max_n: int = Field(8, ge=1, description="cap on n, the choices per generation")
    max_top_k: int = Field(1000, ge=1, description="cap on top_k")
    max_total_tokens: int = Field(
        4096, ge=1, description="cap on the characters one request may generate: n x max_tokens (x prompts)"
    )
    request_deadline_seconds: float = Field(
        30.0, gt=0, description="a generation still running after this ends with finish_reason 'deadline'"
    )
    max_adapt_chars: int = Field(
        8192,
        ge=1,
        description="characters one /v1/score request with adapt may hold in all (each costs a forward and "
        "a backward pass: docs/api.md)",
    )
    batching: bool = Field(
        True, description="step concurrent requests' sequences together in each worker (continuous batching)"
    )
    max_batch_rows: int = Field(64, ge=1, le=4096, description="sequences one worker decodes together")
    batch_gather_ms: float = Field(
        15.0,
        ge=0,
        le=100,
        description="an idle worker whose recent prompt batches held several prompts (concurrent clients) waits up "
        "to this long for as many prompts, to encode them together; a lone client never waits",
    )
    stream_interval_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="after a stream's first piece, it sends what has accumulated at most this often",
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="weights of every pass (prompts, scoring, adaptive scoring, the decode step): auto picks "
        "bfloat16 where the CPU has bfloat16 units (AMX-BF16, AVX512-BF16) and float32 elsewhere",
    )
    prefix_cache_mb: float = Field(
        16.0,
        ge=0,
        le=65536,
        description="per worker: memory for the states after prompt prefixes (MiB); 0 turns the prefix cache off",
    )
    shared_prefix_cache_mb: float = Field(
        16.0,
        ge=0,
        le=65536,
        description="per model version, for the whole server: a second level of the prefix cache in shared "
        "memory, so that a prompt one worker encoded is found by the others (MiB); 0 turns it off",
    )
    shared_cache_dir: Path | None = Field(
        None,
        description="where the shared prefix cache's tables live; gunicorn.conf.py sets it to a fresh folder per "
        "server start (in /dev/shm where it can); unset: no shared level",
    )
    prefill_chunk_chars: int = Field(
        32,
        ge=0,
        le=65536,
        description="a long prompt is encoded this many characters at a time between decode steps; 0: whole",
    )
    chat_user_name: str = Field(
        "HORATIO",
        pattern=r"^[^\n\r]{1,64}$",
        description="/v1/chat/completions: the speaker of user messages that name none",
    )
    chat_assistant_name: str = Field(
        "HAMLET",
        pattern=r"^[^\n\r]{1,64}$",
        description="/v1/chat/completions: the speaker of the reply and of assistant messages that name none",
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a request's headers must have arrived this long after its first byte, else 408"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="a request's whole body must have arrived this long after its headers, else 408"
    )
    keepalive_seconds: int = Field(5, ge=0, description="an idle keep-alive connection is closed after this long")
    write_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="a response write (a piece of a stream, or a whole answer) not sent within this long "
        "(a client not reading) closes the connection and cancels its generation",
    )
    max_connections: int = Field(
        1000, ge=1, description="per worker: open connections; more wait in the listen queue, unaccepted"
    )
    queue_wait_seconds: float = Field(
        1.0,
        ge=0,
        le=600,
        description="per worker: a model request that finds every request thread busy waits in the event loop "
        "(costing no thread) if its expected wait, from the queue ahead of it and the rate the worker has "
        "been answering at, is within this; otherwise 503 at once with Retry-After. 0: never wait",
    )
    session_ttl_seconds: float = Field(3600.0, gt=0, description="a session handle expires this long after issue")
    session_secret: str = Field(
        "",
        repr=False,
        description="key for signing session handles; empty: a random one per server start, shared by its workers",
    )
    sequence_idle_seconds: float = Field(
        600.0,
        gt=0,
        description="/v2 sequences (sequence_id): a sequence that no request has continued for this long is "
        "forgotten; its next request without sequence_start gets 400",
    )
    max_sequences: int = Field(
        10000, ge=1, description="/v2 sequences open at once, for the whole server; a new one past it gets 503"
    )
    sequence_dir: Path | None = Field(
        None,
        description="where the states of /v2 sequences live, shared by the workers; gunicorn.conf.py sets it to "
        "a fresh folder per server start; unset: a temporary folder of this process",
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="the Open Inference Protocol over gRPC listens here (on HOST), in every worker; 0 turns it off",
    )
    grpc_threads: int = Field(
        64, ge=1, le=1024, description="per worker: gRPC calls served at once, each on a thread of its own"
    )
    grpc_max_calls: int = Field(
        256,
        ge=1,
        le=65536,
        description="per worker: gRPC calls in progress, those waiting for a thread included; more get "
        "RESOURCE_EXHAUSTED at once",
    )
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: CORS off")
    api_keys: str = Field("", repr=False, description="comma-separated bearer keys for /v1/*; empty: no auth")

    api_keys_file: Path | None = Field(
        None,
        description="a JSON file of API keys with their limits (requests per second, generated characters per "
        "minute, concurrent requests, models), read again when it changes; see docs/api.md",
    )
    quota_dir: Path | None = Field(
        None,
        description="where the keys' quota counters live, shared by the workers; gunicorn.conf.py sets it to a "
        "fresh folder per server start; unset: a temporary folder of this process",
    )

    def warmup_sizes(self) -> list[int]:
        return [int(size) for size in self.warmup_batch_sizes.split(",") if size and int(size) > 0]

    def otlp_traces_protocol(self) -> str:
        return self.otel_exporter_otlp_traces_protocol or self.otel_exporter_otlp_protocol

    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    max_header_bytes: int = Field(
        32 << 10,
        ge=1024,
        le=1 << 20,
        description="a request's line and header fields together, as its worker's event loop reads them; larger "
        "gets 431 (a request line or one field over gunicorn's limits gets 414 or 431 first)",
    )
    max_buffered_bytes: int = Field(
        64 << 20,
        ge=1024,
        description="per worker: request body bytes held for requests still arriving (a Content-Length counts "
        "in full at once); a request that would go over gets 503 with Retry-After",
    )
