"""POST /v1/completions: OpenAI-compatible, streaming (SSE) or not, one adapter per request.

echo + logprobs + max_tokens 0 scores a text (lm-evaluation-harness' loglikelihood requests).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hotlora.server.deps import PrincipalDep, StateDep
from hotlora.server.engine import StepOutput
from hotlora.server.errors import APIError
from hotlora.server.openai_schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from hotlora.server.routes.admission import start, with_limits
from hotlora.server.routes.generation import (
    Result,
    Row,
    collect,
    prepare,
    stream_response,
    usage,
)
from hotlora.server.routes.logprob_format import CompletionLogprobsBuilder
from hotlora.server.state import AppState

router = APIRouter()


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    """A string, a list of strings, a token-id list or a list of token-id lists."""
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


def _echo_text(state: AppState, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return state.inputs.tokenizer.decode(prompt, skip_special_tokens=False)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep, principal: PrincipalDep
) -> object:
    request_id = f"cmpl-{uuid.uuid4().hex}"
    version = state.resolve_model(body.model, principal)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: use it with echo", "max_tokens")
    prompts = _prompts(body)
    ids, params = [], []
    for prompt in prompts:
        prompt_lp = body.logprobs if body.echo else None
        prompt_ids, p = prepare(state, body, prompt, body.max_tokens, body.logprobs, prompt_lp)
        ids.append(prompt_ids)
        params.append(p)
    rows, lease = start(
        state, request, principal, body.model, version, ids, params, body.n, request_id,
        body.stream,
    )
    created = int(time.time())
    echoes = [_echo_text(state, prompts[r.index // body.n]) if body.echo else "" for r in rows]
    if body.stream:
        streamed = await _stream(state, body, rows, echoes, request, request_id, created)
        return with_limits(streamed, lease)
    results = await collect(state, rows, request)
    choices = [
        _choice(state, body, row, res, echo)
        for row, res, echo in zip(rows, results, echoes, strict=True)
    ]
    resp = CompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=usage(rows, body.n, sum(len(r.token_ids) for r in results), request),
    )
    return with_limits(JSONResponse(resp.model_dump()), lease)


def _choice(
    state: AppState, body: CompletionRequest, row: Row, res: Result, echo: str
) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        builder = CompletionLogprobsBuilder(state.inputs.tokenizer)
        parts = []
        if body.echo and res.prompt_logprobs is not None:
            parts.append(builder.build(row.prompt_ids, res.prompt_logprobs))
        parts.append(builder.build([e.token_id for e in res.logprobs], res.logprobs))
        logprobs = _join(parts)
    return CompletionChoice(
        index=row.index,
        text=echo + res.text,
        logprobs=logprobs,
        finish_reason=res.finish_reason,
    )


def _join(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for p in parts:
        out.tokens += p.tokens
        out.token_logprobs += p.token_logprobs
        out.top_logprobs += p.top_logprobs
        out.text_offset += p.text_offset
    return out


async def _stream(
    state: AppState,
    body: CompletionRequest,
    rows: list[Row],
    echoes: list[str],
    request: Request,
    request_id: str,
    created: int,
) -> Response:
    builders = {r.index: CompletionLogprobsBuilder(state.inputs.tokenizer) for r in rows}
    started: set[int] = set()

    head = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}

    def chunk(index: int, text: str, reason: str | None, lp: CompletionLogprobs | None) -> dict:
        # CompletionResponse's fields, built directly: this runs once per streamed token
        logprobs = None if lp is None else lp.model_dump()
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return {**head, "choices": [choice]}

    def render(row: Row, out: StepOutput) -> list[dict[str, object]]:
        chunks = []
        builder = builders[row.index]
        if row.index not in started:  # the echoed prompt comes first
            started.add(row.index)
            echo = echoes[rows.index(row)]
            if body.echo:
                lp = None
                if body.logprobs is not None and out.prompt_logprobs is not None:
                    lp = builder.build(row.prompt_ids, out.prompt_logprobs)
                chunks.append(chunk(row.index, echo, None, lp))
        if out.new_text or out.finished or (body.logprobs is not None and out.logprobs):
            lp = None
            if body.logprobs is not None:
                lp = builder.build([e.token_id for e in out.logprobs], out.logprobs)
            chunks.append(chunk(row.index, out.new_text, out.finish_reason, lp))
        return chunks

    def usage_chunk(u: Usage) -> dict[str, object]:
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [],
            "usage": u.model_dump(),
        }

    include = body.stream_options is not None and body.stream_options.include_usage
    return await stream_response(
        state, rows, request, body.n, render, usage_chunk if include else None
    )
