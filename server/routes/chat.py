"""POST /v1/chat/completions: messages rendered through the model's chat template (sandboxed),
then generated like a completion; streamed as chat.completion.chunk events."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hotlora.server.deps import PrincipalDep, StateDep
from hotlora.server.engine import RequestError, StepOutput
from hotlora.server.errors import APIError
from hotlora.server.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)
from hotlora.server.routes.admission import start, with_limits
from hotlora.server.routes.generation import Row, collect, prepare, stream_response, usage
from hotlora.server.routes.logprob_format import chat_logprobs
from hotlora.server.routes.templating import render_chat
from hotlora.server.state import AppState

router = APIRouter()


async def _prompt_ids(state: AppState, body: ChatCompletionRequest) -> list[int]:
    """The rendered conversation's tokens. The template writes any BOS itself, so none is
    added (as apply_chat_template(tokenize=True) and vLLM do)."""
    text = await render_chat(state, body.messages, body.add_generation_prompt)
    try:
        return state.inputs.tokenizer.encode(text, add_special_tokens=False)
    except RequestError as e:
        raise APIError(400, str(e), "messages") from e


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep, principal: PrincipalDep
) -> object:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    version = state.resolve_model(body.model, principal)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens
    k = (body.top_logprobs or 0) if body.logprobs else None
    ids, params = prepare(
        state, body, await _prompt_ids(state, body), max_tokens, logprobs=k, field="messages"
    )
    rows, lease = start(
        state, request, principal, body.model, version, [ids], [params], body.n, request_id,
        body.stream,
    )
    created = int(time.time())
    tok = state.inputs.tokenizer
    if body.stream:
        return with_limits(await _stream(state, body, rows, request, request_id, created), lease)
    results = await collect(state, rows, request)
    choices = [
        ChatChoice(
            index=row.index,
            message=AssistantMessage(content=res.text),
            # chat lists the content's tokens only, not the stop token that ended it
            logprobs=(
                chat_logprobs(tok, res.logprobs[: len(res.token_ids)]) if body.logprobs else None
            ),
            finish_reason=res.finish_reason,
        )
        for row, res in zip(rows, results, strict=True)
    ]
    resp = ChatCompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=usage(rows, body.n, sum(len(r.token_ids) for r in results), request),
    )
    return with_limits(JSONResponse(resp.model_dump()), lease)


async def _stream(
    state: AppState,
    body: ChatCompletionRequest,
    rows: list[Row],
    request: Request,
    request_id: str,
    created: int,
) -> Response:
    started: set[int] = set()
    tok = state.inputs.tokenizer

    def chunk(choice: ChatChunkChoice) -> dict[str, object]:
        c = ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=[choice])
        out = c.model_dump(exclude={"usage"})
        # OpenAI's deltas carry only what changed: the last one is {}
        out["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)
        return out

    def render(row: Row, out: StepOutput) -> list[dict[str, object]]:
        chunks = []
        if row.index not in started:  # each choice's first delta carries the role
            started.add(row.index)
            chunks.append(
                chunk(
                    ChatChunkChoice(index=row.index, delta=ChatDelta(role="assistant", content=""))
                )
            )
        entries = out.logprobs[: len(out.new_token_ids)]
        if out.new_text or (body.logprobs and entries):
            lp = chat_logprobs(tok, entries) if body.logprobs else None
            chunks.append(
                chunk(
                    ChatChunkChoice(
                        index=row.index, delta=ChatDelta(content=out.new_text), logprobs=lp
                    )
                )
            )
        if out.finished:
            reason = out.finish_reason
            chunks.append(
                chunk(ChatChunkChoice(index=row.index, delta=ChatDelta(), finish_reason=reason))
            )
        return chunks

    def usage_chunk(u: Usage) -> dict[str, object]:
        c = ChatCompletionChunk(
            id=request_id, created=created, model=body.model, choices=[], usage=u
        )
        return c.model_dump()

    include = body.stream_options is not None and body.stream_options.include_usage
    return await stream_response(
        state, rows, request, body.n, render, usage_chunk if include else None
    )
