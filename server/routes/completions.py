"""POST /v1/completions: OpenAI-compatible, streaming (SSE) or not, one adapter per request."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import ApiKeyDep, StateDep
from server.engine import RequestError, SamplingParams, StepOutput
from server.engine.loop import AdapterGone, QueueFull, Stream
from server.errors import APIError, error_body
from server.schemas import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from server.state import AppState

router = APIRouter()


def _params(body: CompletionRequest) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(stop),
            ignore_eos=body.ignore_eos,
        )
    except RequestError as e:
        raise APIError(400, str(e)) from e


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if not p:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    return list(p)  # type: ignore[arg-type]


class _Tracker:
    """Per-request latency metrics, fed as outputs arrive."""

    def __init__(self, state: AppState, stream: Stream) -> None:
        self.metrics, self.arrival = state.metrics, stream.arrival
        self.last: float | None = None
        self.first: float | None = None
        self.tokens = 0

    def see(self, out: StepOutput) -> None:
        now = time.perf_counter()
        if out.new_token_ids:
            if self.first is None:
                self.first = now
                self.metrics.ttft.observe(now - self.arrival)
            elif self.last is not None:
                self.metrics.itl.observe(now - self.last)
            self.last = now
            self.tokens += len(out.new_token_ids)
        if out.finished:
            self.metrics.e2e.observe(now - self.arrival)
            if self.first is not None and self.tokens > 1:
                self.metrics.tpot.observe((now - self.first) / (self.tokens - 1))
            self.metrics.requests.labels(out.finish_reason or "stop").inc()


class _ClientGone:
    """Queued by the disconnect watcher: the client went away."""


async def _watch_disconnect(request: Request, stream: Stream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.queue.put_nowait(_ClientGone())  # type: ignore[arg-type]


async def _outputs(
    state: AppState, stream: Stream, request: Request, watch: bool
) -> AsyncGenerator[StepOutput, None]:
    """The request's outputs in order; aborts it if the client disconnects or we stop early.

    A streaming response notices a disconnect itself (it cancels us); a plain response has a
    watcher task listen for it, so waiting for tokens stays a bare queue read.
    """
    tracker = _Tracker(state, stream)
    finished = False
    watcher = asyncio.create_task(_watch_disconnect(request, stream)) if watch else None
    try:
        while True:
            item = await stream.queue.get()
            if isinstance(item, _ClientGone):
                state.metrics.requests.labels("abort").inc()
                return
            if isinstance(item, BaseException):
                state.metrics.requests.labels("error").inc()
                raise item
            tracker.see(item)
            yield item
            if item.finished:
                finished = True
                return
    finally:
        if watcher is not None:
            watcher.cancel()
        if not finished:
            state.loop.abort(stream.request_id)


def _submit(
    state: AppState, body: CompletionRequest, request_id: str
) -> tuple[list[Stream], list[int]]:
    version = state.resolve_model(body.model)
    params = _params(body)
    prompt_ids = []
    for prompt in _prompts(body):
        try:
            prompt_ids.append(state.engine.check_request(prompt, params))
        except RequestError as e:
            param = "max_tokens" if "max_tokens" in str(e) else "prompt"
            raise APIError(400, str(e), param) from e
    streams: list[Stream] = []
    try:
        for i, ids in enumerate(prompt_ids):
            streams.append(state.loop.submit(ids, version, params, f"{request_id}-{i}"))
    except QueueFull as e:
        for s in streams:
            state.loop.abort(s.request_id)
        state.metrics.requests.labels("rejected").inc()
        raise APIError(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from e
    return streams, [len(ids) for ids in prompt_ids]


@router.post("/v1/completions", dependencies=[ApiKeyDep], response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> object:
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams, prompt_lens = _submit(state, body, request_id)
    created = int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        outputs = [_outputs(state, s, request, watch=False) for s in streams]
        try:  # until the first token, failures still get a proper status code
            first = await anext(outputs[0])
        except Exception as e:
            for s in streams:
                state.loop.abort(s.request_id)
            raise _failed(e) from e
        return StreamingResponse(
            _sse(state, outputs, first, prompt_lens, request_id, created, body.model, usage),
            media_type="text/event-stream",
        )
    choices, completion_tokens = [], 0
    for i, stream in enumerate(streams):
        text, reason = "", None
        try:
            async for out in _outputs(state, stream, request, watch=True):
                text += out.new_text
                completion_tokens += len(out.new_token_ids)
                reason = out.finish_reason
        except Exception as e:
            raise _failed(e) from e
        choices.append(CompletionChoice(index=i, text=text, finish_reason=reason))
    usage_obj = Usage(
        prompt_tokens=sum(prompt_lens),
        completion_tokens=completion_tokens,
        total_tokens=sum(prompt_lens) + completion_tokens,
    )
    resp = CompletionResponse(
        id=request_id, created=created, model=body.model, choices=choices, usage=usage_obj
    )
    return JSONResponse(resp.model_dump())


def _failed(e: Exception) -> APIError:
    if isinstance(e, AdapterGone):
        return APIError(404, f"{e}; GET /v1/models lists the adapters", "model")
    return APIError(503, f"generation failed: {e}")


async def _sse(
    state: AppState,
    outputs: list[AsyncGenerator[StepOutput, None]],
    first: StepOutput,
    prompt_lens: list[int],
    request_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    completion_tokens = 0

    def chunk(index: int, text: str, reason: str | None) -> str:
        c = CompletionChoice(index=index, text=text, finish_reason=reason)
        body = CompletionResponse(id=request_id, created=created, model=model, choices=[c])
        return f"data: {body.model_dump_json(exclude={'usage'})}\n\n"

    async def rows() -> AsyncIterator[tuple[int, StepOutput]]:
        yield 0, first
        for i, gen in enumerate(outputs):
            async for out in gen:
                yield i, out

    try:
        async for i, out in rows():
            completion_tokens += len(out.new_token_ids)
            if out.new_text or out.finished:
                yield chunk(i, out.new_text, out.finish_reason)
    except Exception as e:  # mid-stream: an error event, then [DONE]
        err = _failed(e)
        yield f"data: {json.dumps(error_body(err.status, err.message, err.param))}\n\n"
    finally:
        for gen in outputs:
            await gen.aclose()  # aborts whatever has not finished
    if include_usage:
        usage = Usage(
            prompt_tokens=sum(prompt_lens),
            completion_tokens=completion_tokens,
            total_tokens=sum(prompt_lens) + completion_tokens,
        )
        final = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage.model_dump(),
        }
        yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"
