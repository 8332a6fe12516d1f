"""Public request/response shapes of the HTTP API (OpenAI-compatible where OpenAI has one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonDict

from hotlora.server.openai_schemas import STRICT, ChatMessage, TokenId

# An adapter's name as the API addresses it: a name (adapters/store.py check_name: no leading
# dot), optionally behind a tenant's namespace ("tenant/name", how an admin addresses a tenant's
# adapter). Documented in the OpenAPI schema; the routes enforce it (a 400 naming the rule, or a
# 404 where a lookup simply finds nothing).
ADAPTER_NAME_PATTERN = r"^(?:[a-z0-9-]{1,32}/)?[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
_NAME_SCHEMA: JsonDict = {"pattern": ADAPTER_NAME_PATTERN}


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a prompt or messages. `model` is optional: every
    adapter shares the base's tokenizer, but a named model must exist."""

    # Exactly one of prompt and messages (the route's 400), stated for the OpenAPI schema: a
    # null counts as absent, so each branch requires its field with its non-null type.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # as the OpenAI request models (server/openai_schemas.py STRICT)
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="a chat, rendered by the chat template (instead of prompt)"
    )
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = Field(
        None, description="default: true for a prompt, false for messages (as vLLM)"
    )
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's): what a client needs to tokenize through /tokenize, e.g.
    lm-evaluation-harness' `tokenizer_backend=remote`."""

    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None = None
    model_max_length: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hotlora"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    """OpenAI's list shape; ``first_id`` / ``last_id`` / ``has_more`` page it (``limit`` and
    ``after`` query parameters); a client that ignores them gets everything, as before."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class AdapterInfo(BaseModel):
    """One stored adapter version (the newest unless listed under versions)."""

    name: str
    version: int
    kind: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created: int


class AdapterDetail(AdapterInfo):
    versions: list[int]
    resident: bool


class AdapterList(BaseModel):
    """Paged like ModelList; the ids are adapter names."""

    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class LoadLoraRequest(BaseModel):
    model_config = STRICT

    lora_name: str = Field(json_schema_extra=_NAME_SCHEMA)
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = STRICT

    lora_name: str = Field(json_schema_extra=_NAME_SCHEMA)


# Response shapes of routes that build their JSON by hand; documented in the OpenAPI schema
# (server/openapi.py).


class AdapterDeleted(BaseModel):
    name: str
    deleted: Literal[True]


class LoraLoaded(AdapterInfo):
    message: str


class LoraUnloaded(BaseModel):
    message: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
