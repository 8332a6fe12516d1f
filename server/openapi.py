"""The published OpenAPI contract (GET /openapi.json).

FastAPI's generated schema knows the request and success shapes but not what the handlers
refuse: it lists a 422 for every operation (this server answers 400 for invalid requests,
server/errors.py), no 401/403/404/413/429/503/504, no authentication, and JSON for
/metrics. `install_openapi` builds FastAPI's schema once and completes it from one table,
OPERATIONS (operation -> every status it can answer, who may call it), so the contract is read
and changed in one place and a test (tests/server/test_openapi_contract.py) holds the server
to it with schemathesis.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel

from hotlora.server.openai_schemas import ChatCompletionChunk
from hotlora.server.schemas import (
    ADAPTER_NAME_PATTERN,
    AdapterDeleted,
    ErrorResponse,
    Health,
    LoraLoaded,
    LoraUnloaded,
    Ready,
)

log = logging.getLogger(__name__)

Role = Literal["user", "admin"]
USER: Role = "user"  # completions, listings, tokenizer: HOTLORA_API_KEYS (or a tenant's key)
ADMIN: Role = "admin"  # adapter changes: HOTLORA_ADMIN_KEY (or a tenant allowed to)


@dataclass(frozen=True)
class Operation:
    """What one operation can answer. `statuses` holds every status it returns, its success
    status first; each error status gets the shared error body (server/schemas.py
    ErrorResponse). `notes` says what an error means here when the general wording in
    _STATUS_TEXT is too vague."""

    statuses: tuple[int, ...]
    auth: Role | None = None
    response: type[BaseModel] | None = None  # the success body, where the route builds it by hand
    notes: Mapping[int, str] = field(default_factory=dict)
    rate_limited: bool = False  # answers carry the tenant's x-ratelimit-* headers


# The body limit (HOTLORA_MAX_BODY_BYTES, server/access_log.py) is checked before routing, so even
# an operation that reads no body answers 413 to one over the limit.
NO_BODY = "a request body (this operation reads none) over the server's size limit"

_GENERATION = Operation(
    (200, 400, 401, 403, 404, 413, 429, 503, 504),
    USER,
    notes={
        404: "`model` is neither the base model's id nor a stored adapter (or the adapter was "
        "deleted before the request started)",
        429: "the queue is full, or the tenant's request or token rate limit is spent: retry "
        "after Retry-After seconds",
        503: "the engine is not running or the server is shutting down (streamed: an error "
        "event instead)",
        504: "the request timed out before it started",
    },
    rate_limited=True,
)
_TOKENIZER = Operation(
    (200, 400, 401, 403, 404, 413),
    USER,
    notes={404: "`model` is given but is neither the base model's id nor a stored adapter"},
)
_LISTING = Operation(
    (200, 400, 401, 403, 413),
    USER,
    notes={400: "`limit` outside 1..10000 or `after` empty or too long", 413: NO_BODY},
)

# Every operation of the app, "METHOD /path" as the schema spells the path.
OPERATIONS: dict[str, Operation] = {
    "POST /v1/completions": _GENERATION,
    "POST /v1/chat/completions": _GENERATION,
    "GET /v1/models": _LISTING,
    "GET /v1/adapters": _LISTING,
    "POST /v1/adapters": Operation(
        (201, 400, 401, 403, 413, 429, 503),
        ADMIN,
        notes={
            400: "a bad name or form, or files that are not a valid adapter for this base",
            403: "not allowed to upload, or the tenant's adapter quota is full",
            413: "a file over the upload limit, or the tenant's storage quota",
        },
    ),
    "GET /v1/adapters/{name}": Operation(
        (200, 401, 403, 404, 413), USER, notes={404: "no such adapter", 413: NO_BODY}
    ),
    "DELETE /v1/adapters/{name}": Operation(
        (200, 401, 403, 404, 413),
        ADMIN,
        AdapterDeleted,
        notes={404: "no such adapter", 413: NO_BODY},
    ),
    "POST /v1/load_lora_adapter": Operation(
        (200, 400, 401, 403, 404, 413),
        ADMIN,
        LoraLoaded,
        notes={
            400: "a bad name, a name already loaded, or a directory that is not a valid adapter",
            403: "loading from server paths is disabled, or `lora_path` is outside "
            "HOTLORA_ALLOWED_ADAPTER_DIRS",
        },
    ),
    "POST /v1/unload_lora_adapter": Operation(
        (200, 400, 401, 403, 404, 413), ADMIN, LoraUnloaded, notes={404: "no such adapter"}
    ),
    "POST /tokenize": _TOKENIZER,
    "POST /detokenize": _TOKENIZER,
    "GET /tokenizer_info": Operation((200, 401, 403, 413), USER, notes={413: NO_BODY}),
    "GET /health": Operation((200, 413), None, Health, notes={413: NO_BODY}),
    "GET /ready": Operation(
        (200, 413, 503),
        None,
        Ready,
        notes={413: NO_BODY, 503: "the engine is not running or is shutting down"},
    ),
    "GET /metrics": Operation((200, 413), notes={413: NO_BODY}),  # Prometheus text: _metrics
}

_STATUS_TEXT = {
    400: "Invalid request: malformed JSON, a field missing or out of range, or a rule the schema "
    "cannot state (prompt length, vocabulary, chat template); `error.param` names the field",
    401: "No bearer key where this server requires one",
    403: "The bearer key is not valid, or not allowed this operation",
    404: "Not found",
    413: "The request body is over the server's size limit",
    429: "Too many requests: retry after Retry-After seconds",
    503: "Service unavailable",
    504: "Timed out",
}
_INT = {"type": "integer", "minimum": 0}
_RATE_LIMIT_HEADERS = {  # OpenAI's, sent where a tenant has limits (server/rate_limit.py)
    f"x-ratelimit-{kind}-{what}": {
        "description": f"{kind} of the tenant's {what} limit",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?s$"}
        if kind == "reset"
        else _INT,
    }
    for what in ("requests", "tokens")
    for kind in ("limit", "remaining", "reset")
}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": _INT}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
    },
    429: {"Retry-After": {**_RETRY_AFTER, "required": True}, **_RATE_LIMIT_HEADERS},
    503: {"Retry-After": _RETRY_AFTER},
}
BEARER = "bearer"


def install_openapi(app: FastAPI) -> None:
    """Serve the completed schema from `app.openapi()` (and so /openapi.json and /docs)."""
    generate = app.openapi  # FastAPI's: builds once, rebuilds when the routes change
    built: list[tuple[dict[str, Any], Any, dict[str, Any]]] = []  # (FastAPI's, settings, ours)

    def openapi() -> dict[str, Any]:
        base, settings = generate(), _settings(app)
        # Built again only when FastAPI rebuilt its own, or the app started since (security and
        # examples come from the running server's settings).
        if not built or built[0][0] is not base or built[0][1] is not settings:
            built[:] = [(base, settings, complete(copy.deepcopy(base), app))]
        return built[0][2]

    app.openapi = openapi  # type: ignore[method-assign]


def complete(spec: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    """FastAPI's `spec` with every OPERATIONS entry applied (in place; returned)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    add_models(schemas, ErrorResponse)
    spec["components"]["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "HOTLORA_API_KEYS / HOTLORA_ADMIN_KEY keys, or a tenant's key",
        }
    }
    settings = _settings(app)
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            key = f"{method.upper()} {path}"
            entry = OPERATIONS.get(key)
            if entry is None:  # a route added without a table entry: the unit test says which
                log.warning("OpenAPI: %s is not in server.openapi.OPERATIONS", key)
                entry = Operation((_success(op), 400))
            _apply(op, entry, schemas, settings)
    _adapter_names(spec, schemas)
    _streams(spec, schemas)
    _metrics(spec)
    _examples(spec, settings)
    _drop_unused(spec, ("HTTPValidationError", "ValidationError"))
    return spec


def add_models(schemas: dict[str, Any], *models: type[BaseModel]) -> None:
    """Put pydantic models (and the models they use) into components/schemas."""
    for model in models:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _success(op: dict[str, Any]) -> int:
    return next((int(s) for s in op.get("responses", {}) if s.startswith("2")), 200)


def _settings(app: FastAPI) -> Any:
    """The app's settings once its lifespan has run (None before: a schema built without a
    running server documents auth as required and has no examples)."""
    state = getattr(app.state, "hotlora", None)
    return getattr(state, "settings", None)


def _auth_required(settings: Any, role: Role) -> bool:
    """Whether this server refuses the role's operations without a key (as server/deps.py):
    tenants need a key for everything, API keys for use, the admin key for adapter changes."""
    if settings is None or getattr(settings, "tenants_file", None) is not None:
        return True
    return bool(settings.admin_key if role == ADMIN else settings.api_keys)


def _apply(op: dict[str, Any], entry: Operation, schemas: dict[str, Any], settings: Any) -> None:
    old = op.get("responses", {})
    success = entry.statuses[0]
    ok = old.get(str(success)) or old.get(str(_success(op))) or {"description": "OK"}
    if entry.response is not None:
        add_models(schemas, entry.response)
        ok = {
            "description": ok.get("description", "OK"),
            "content": _json(_ref(entry.response.__name__)),
        }
    responses: dict[str, Any] = {str(success): ok}
    for status in entry.statuses[1:]:
        response: dict[str, Any] = {
            "description": entry.notes.get(status, _STATUS_TEXT[status]),
            "content": _json(_ref(ErrorResponse.__name__)),
        }
        if status in _HEADERS:
            response["headers"] = copy.deepcopy(_HEADERS[status])
        responses[str(status)] = response
    op["responses"] = responses  # FastAPI's 422 goes: invalid requests get the 400
    if entry.auth is not None:
        required = _auth_required(settings, entry.auth)
        # An empty requirement makes the key optional (the server is open for this role).
        op["security"] = [{BEARER: []}] if required else [{BEARER: []}, {}]
    if entry.rate_limited:  # admitted requests report the limits' state too (OpenAI's headers)
        ok.setdefault("headers", {}).update(copy.deepcopy(_RATE_LIMIT_HEADERS))


def _adapter_names(spec: dict[str, Any], schemas: dict[str, Any]) -> None:
    """State the name pattern where the routes take a name: the path parameter of
    /v1/adapters/{name} (a {name:path} route: "tenant/name" for an admin) and the upload's
    form field, which is multipart (`config` and `weights` are files)."""
    for op in spec["paths"].get("/v1/adapters/{name}", {}).values():
        for param in op.get("parameters", []):
            if param["name"] == "name" and param["in"] == "path":
                param["schema"]["pattern"] = ADAPTER_NAME_PATTERN
    upload = spec["paths"].get("/v1/adapters", {}).get("post")
    if upload is None:
        return
    content = upload["requestBody"]["content"]
    form = content.pop("application/x-www-form-urlencoded", None) or content.get(
        "multipart/form-data"
    )
    if form is None:
        return
    content["multipart/form-data"] = form
    ref = form["schema"].get("$ref", "")
    body = schemas.get(ref.rsplit("/", 1)[-1], form["schema"])
    props = body.get("properties", {})
    if "name" in props:
        props["name"]["pattern"] = ADAPTER_NAME_PATTERN
        props["name"]["description"] = f"adapter name, {ADAPTER_NAME_PATTERN}"
    for part in ("config", "weights"):
        if part in props:  # file parts, sent as bytes
            props[part] = {
                "type": "string",
                "format": "binary",
                "description": props[part].get("description", part),
            }


def _streams(spec: dict[str, Any], schemas: dict[str, Any]) -> None:
    """`stream: true` answers 200 with server-sent events: each `data:` is a JSON chunk (the
    response shape with only the new text; an error body if generation fails mid-stream), and
    the last is [DONE]."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = spec["paths"].get(path, {}).get("post")
        if op is None:
            continue
        ok = op["responses"]["200"]
        chunk = ok["content"]["application/json"]["schema"]
        if path.endswith("chat/completions"):
            add_models(schemas, ChatCompletionChunk)
            chunk = _ref(ChatCompletionChunk.__name__)
        event = {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "if": {"const": "[DONE]"},
                    "else": {
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [chunk, _ref(ErrorResponse.__name__)]},
                    },
                }
            },
        }
        ok["content"]["text/event-stream"] = {"schema": event}


def _metrics(spec: dict[str, Any]) -> None:
    op = spec["paths"].get("/metrics", {}).get("get")
    if op is not None:
        op["responses"]["200"] = {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }


def _examples(spec: dict[str, Any], settings: Any) -> None:
    """Request examples naming the served base model, so schemathesis' examples phase (and a
    reader) see a request that succeeds; without settings there is no model id to name."""
    if settings is None:
        return
    model = settings.model_id
    completion = {"model": model, "prompt": "hello", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    examples: dict[str, dict[str, dict[str, Any]]] = {
        "/v1/completions": {"base": completion, "stream": {**completion, "stream": True}},
        "/v1/chat/completions": {"base": chat, "stream": {**chat, "stream": True}},
        "/tokenize": {"base": {"model": model, "prompt": "hello"}},
        "/detokenize": {"base": {"model": model, "tokens": [0, 1]}},
    }
    for path, values in examples.items():
        op = spec["paths"].get(path, {}).get("post")
        if op is not None:
            op["requestBody"]["content"]["application/json"]["examples"] = {
                name: {"summary": f"the base model ({name})", "value": value}
                for name, value in values.items()
            }


def _drop_unused(spec: dict[str, Any], names: tuple[str, ...]) -> None:
    """Remove components nothing refers to any more (FastAPI's 422 bodies)."""
    schemas = spec["components"]["schemas"]
    for name in names:
        if name not in schemas:
            continue
        rest = {k: v for k, v in schemas.items() if k != name}
        if f"#/components/schemas/{name}" not in repr((spec["paths"], rest)):
            del schemas[name]
