"""The OpenAPI 3.1 document, built from the app's own routes and the pydantic models that
validate them, so the spec cannot drift from the code. Each view declares its models with
`@documented(...)`; a route without that declaration makes `build_spec` fail."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api.context import needs_api_key
from service.api.schemas.common import ErrorResponse
from service.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
REF = "#/components/schemas/{model}"


def documented(
    summary: str,
    response: type[BaseModel] | None = None,
    request: type[BaseModel] | None = None,
    stream_chunk: type[BaseModel] | None = None,
    content_type: str = "application/json",
    errors: dict[int, str] | None = None,
    error_model: type[BaseModel] = ErrorResponse,
) -> Callable[[F], F]:
    """Attach the OpenAPI facts of a view: its request and response models, the model of each
    server-sent event's data when it can stream, and the errors it answers (status -> when), in
    `error_model`'s shape (a request body adds 400, 413 and 415 by itself)."""

    def attach(view: F) -> F:
        view.openapi = {  # type: ignore[attr-defined]
            "summary": summary,
            "request": request,
            "response": response,
            "stream_chunk": stream_chunk,
            "content_type": content_type,
            "errors": errors or {},
            "error_model": error_model,
        }
        return view

    return attach


def _error(description: str, model: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }


_RULE_ARG = re.compile(r"<(?:(\w+)(?:\(([^)]*)\))?:)?(\w+)>")


def openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    """Flask's `/docs/<any('a', 'b'):asset>` as OpenAPI's `/docs/{asset}` with its parameter."""
    parameters = []
    for converter, args, name in _RULE_ARG.findall(rule):
        schema: dict[str, Any] = {"type": "string"}
        if converter == "any":
            schema["enum"] = [a.strip().strip("'\"") for a in args.split(",")]
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return _RULE_ARG.sub(lambda m: "{" + m.group(3) + "}", rule), parameters


def sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """Before OpenAPI 3.2's `itemSchema`, a text/event-stream `schema` describes each event, whose
    `data` is a JSON chunk, or the literal `[DONE]` at the end."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": REF.format(model=chunk.__name__)},
                    },
                ],
            }
        },
    }


def build_spec(app: Flask, settings: Settings) -> dict[str, Any]:
    operations: list[tuple[str, str, dict[str, Any]]] = []
    models: list[tuple[type[BaseModel], Any]] = [(ErrorResponse, "serialization")]
    for url_rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if url_rule.endpoint == "static":
            continue
        view = app.view_functions[url_rule.endpoint]
        facts = getattr(view, "openapi", None)
        if facts is None:
            raise RuntimeError(f"route {url_rule.rule} has no @documented declaration")
        for method in sorted((url_rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operations.append((url_rule.rule, method.lower(), facts))
            models.append((facts["error_model"], "serialization"))
            if facts["request"] is not None:
                models.append((facts["request"], "validation"))
            for produced in (facts["response"], facts["stream_chunk"]):
                if produced is not None:
                    models.append((produced, "serialization"))
    _, schemas = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)

    paths: dict[str, dict[str, Any]] = {}
    for rule, method, facts in operations:
        path, parameters = openapi_path(rule)
        if facts["response"] is not None:
            content: dict[str, Any] = {
                facts["content_type"]: {"schema": {"$ref": REF.format(model=facts["response"].__name__)}}
            }
        else:
            content = {facts["content_type"]: {"schema": {"type": "string"}}}
        if facts["stream_chunk"] is not None:
            content["text/event-stream"] = {"schema": sse_event_schema(facts["stream_chunk"])}
        responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
        operation: dict[str, Any] = {
            "summary": facts["summary"],
            "operationId": method + "_" + (re.sub(r"\W+", "_", path).strip("_") or "root"),
        }
        if parameters:
            operation["parameters"] = parameters
        error_model = facts["error_model"]
        if facts["request"] is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": REF.format(model=facts["request"].__name__)}}},
            }
            responses["400"] = _error(
                "invalid JSON, or a field that is missing, unknown, mistyped or out of range", error_model
            )
            responses["413"] = _error(f"body larger than {settings.max_body_bytes} bytes", error_model)
            responses["415"] = _error("Content-Type is not application/json", error_model)
        if needs_api_key(path):
            responses["401"] = _error("API_KEYS is set and the bearer key is missing or wrong", error_model)
            responses["503"] = _error("models not loaded, or the server is shutting down", error_model)
        request_fields = facts["request"].model_fields if facts["request"] is not None else {}
        if "model" in request_fields:
            responses["404"] = _error("unknown model or version (code model_not_found)", error_model)
        for status, description in facts["errors"].items():
            responses[str(status)] = _error(description, error_model)
        operation["responses"] = responses
        paths.setdefault(path, {})[method] = operation

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "charlm-serve",
            "version": "1.0.0",
            "description": "Character-level LSTM language model and MLP classifier over JSON/HTTP. "
            "A token is one Unicode character. Limits configured on this server: "
            f"{settings.max_texts} texts, {settings.max_text_chars} characters per text, "
            f"max_tokens {settings.max_tokens}, n {settings.max_n}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
