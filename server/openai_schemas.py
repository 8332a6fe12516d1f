"""Public shapes of /v1/completions and /v1/chat/completions (OpenAI's, with vLLM's extras).

Ranges are checked here, so a bad value is a 400 naming its field before anything is queued.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

MAX_N = 128  # as OpenAI
_SEED = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_N)  # torch seeds are 64-bit; n adds 0..n-1
LOGIT_BIAS_KEY = r"^[0-9]{1,10}$"

# Request models validate strictly (JSON types as the schema states them: no "2" for an integer,
# no 0 for a boolean), so a request the published schema calls invalid is refused.
STRICT = ConfigDict(strict=True)


def _integral(v: object) -> object:
    """JSON Schema counts 2.0 as an integer, strict validation does not: take an integral float
    as the int it is (1.5 is still refused as not an integer)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# An integer request field (strict, but 2.0 counts).
Int = Annotated[int, BeforeValidator(_integral)]

# Rules the validators below (or the engine) enforce with messages of their own, stated in the
# OpenAPI schema only (WithJsonSchema documents, it does not validate), so the published contract
# says what is refused while the 400s keep naming the rule in words.
NonEmptyStr = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]
TokenId = Annotated[Int, WithJsonSchema({"type": "integer", "minimum": 0})]
_LOGIT_BIAS_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"pattern": LOGIT_BIAS_KEY},
                "additionalProperties": {"type": "number", "minimum": -100.0, "maximum": 100.0},
            },
            {"type": "null"},
        ]
    }
)
# A prompt: the lists must not be empty (a 400 in the route); token ids are >= 0 (and below the
# vocabulary size, which depends on the model: the engine's 400).
_PROMPT_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "minItems": 1,
            },
        ]
    }
)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling and stopping fields both endpoints take."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, description="0 or -1 = off")
    seed: Int | None = _SEED
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    n: Int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="vLLM's; 1 = off")
    logit_bias: Annotated[
        dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None, _LOGIT_BIAS_SCHEMA
    ] = Field(None, description="token id (as a string) -> bias added to its logit")
    min_tokens: Int = Field(0, ge=0)
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not re.fullmatch(LOGIT_BIAS_KEY, key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `model` is the base model's id or an adapter's name."""

    # The route's cross-field rule, stated for the OpenAPI schema: max_tokens 0 needs echo.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
            "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
        }
    )

    prompt: Annotated[str | list[str] | list[Int] | list[list[Int]], _PROMPT_SCHEMA]
    max_tokens: Int | None = Field(16, ge=0, description="0 needs echo; null = the context left")
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=20)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got {kind!r}")
        return v

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"] = Field(description="only plain text is supported")


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions, rendered through the model's chat template."""

    # The route's cross-field rule, stated for the OpenAPI schema: top_logprobs needs logprobs.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {
                "required": ["top_logprobs"],
                "properties": {"top_logprobs": {"type": "integer"}},
            },
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1, description="deprecated by OpenAI; still read")
    max_completion_tokens: Int | None = Field(None, ge=1, description="null = the context left")
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20, description="needs logprobs: true")
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = Field(True, description="vLLM's; false continues a turn")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
