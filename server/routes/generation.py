"""What /v1/completions and /v1/chat/completions share: a request becomes engine rows (one
per prompt and choice), whose outputs are collected or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from adapters.store import AdapterVersion
from server.engine import RequestError, SamplingParams, StepOutput
from server.engine.loop import AdapterGone, QueueFull, Stream
from server.engine.outputs import TokenLogprob
from server.errors import APIError, error_body
from server.openai_schemas import SamplingFields, Usage
from server.state import AppState

# SamplingParams' messages start with the parameter's name.
_PARAMS = (
    "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "stop_token_ids", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
    "prompt_logprobs",
)  # fmt: skip


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for one row of `body` (seeds are set per choice by `submit`)."""
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            seed=body.seed,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=tuple(bias.items()),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except RequestError as e:
        raise APIError(400, str(e), _param(str(e))) from e


def _param(message: str, default: str | None = None) -> str | None:
    return next((p for p in _PARAMS if message.startswith(p)), default)


def prepare(
    state: AppState,
    body: SamplingFields,
    prompt: str | list[int],
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    field: str = "prompt",
) -> tuple[list[int], SamplingParams]:
    """A prompt's token ids and its row's parameters, or a 400 naming what to fix.

    max_tokens None means whatever the context has left after the prompt.
    """
    probe = sampling_params(body, body.min_tokens if max_tokens is None else max_tokens)
    try:
        ids = state.engine.check_request(prompt, probe)
    except RequestError as e:
        msg = str(e)
        param = "logit_bias" if "vocabulary" in msg else field
        raise APIError(400, msg, "max_tokens" if "max_tokens" in msg else param) from e
    if max_tokens is None:
        max_tokens = state.engine.max_seq_len - len(ids)
    return ids, sampling_params(body, max_tokens, logprobs, prompt_logprobs)


@dataclass
class Row:
    """One choice: a prompt's tokens and its stream of engine outputs."""

    index: int
    prompt_ids: list[int]
    stream: Stream


def submit(
    state: AppState,
    version: AdapterVersion | None,
    prompts: list[list[int]],
    params: list[SamplingParams],
    n: int,
    request_id: str,
) -> list[Row]:
    """Queue n choices per prompt (choice index = prompt * n + j; choice j seeded seed + j),
    all or none: 429 when the queue cannot take them."""
    bound = state.settings.max_queue
    if 0 < bound < len(prompts) * n:  # (with no queue at all, every request is a 429)
        raise APIError(
            400,
            f"{len(prompts)} prompt(s) x n={n} make {len(prompts) * n} rows, but at most "
            f"{bound} can wait in the queue: lower n or send fewer prompts",
            "n",
        )
    rows: list[Row] = []
    try:
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            for j in range(n):
                seeded = p if p.seed is None or j == 0 else _reseed(p, p.seed + j)
                index = i * n + j
                stream = state.loop.submit(ids, version, seeded, f"{request_id}-{index}")
                rows.append(Row(index, ids, stream))
    except QueueFull as e:
        for r in rows:
            state.loop.abort(r.stream.request_id)
        state.metrics.requests.labels("rejected").inc()
        raise APIError(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from e
    return rows


def _reseed(p: SamplingParams, seed: int) -> SamplingParams:
    return replace(p, seed=seed)


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


async def outputs(
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


def failed(e: Exception) -> APIError:
    if isinstance(e, AdapterGone):
        return APIError(404, f"{e}; GET /v1/models lists the adapters", "model")
    return APIError(503, f"generation failed: {e}")


@dataclass
class Result:
    """A finished choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None


async def collect(state: AppState, rows: list[Row], request: Request) -> list[Result]:
    """Every row's whole output (rows run concurrently in the engine; read in order)."""
    results = []
    for row in rows:
        r = Result()
        try:
            async for out in outputs(state, row.stream, request, watch=True):
                r.text += out.new_text
                r.token_ids += out.new_token_ids
                r.logprobs += out.logprobs
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                r.finish_reason = out.finish_reason
        except Exception as e:
            for other in rows:
                state.loop.abort(other.stream.request_id)
            raise failed(e) from e
        results.append(r)
    return results


def usage(rows: list[Row], n: int, completion_tokens: int) -> Usage:
    """Each prompt counts once, whatever n is (as OpenAI)."""
    prompt = sum(len(r.prompt_ids) for r in rows[::n])
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
    )


# A streamed row: each output becomes zero or more JSON chunks (dicts).
Render = Callable[[Row, StepOutput], list[dict[str, object]]]


async def stream_response(
    state: AppState,
    rows: list[Row],
    request: Request,
    n: int,
    render: Render,
    usage_chunk: Callable[[Usage], dict[str, object]] | None,
) -> StreamingResponse:
    """Server-sent events: every row's chunks in order, then usage (if asked) and [DONE].

    Until the first output arrives, failures still get a proper status code.
    """
    gens = [outputs(state, r.stream, request, watch=False) for r in rows]
    try:
        first = await anext(gens[0])
    except Exception as e:
        for r in rows:
            state.loop.abort(r.stream.request_id)
        raise failed(e) from e

    async def events() -> AsyncIterator[str]:
        completion_tokens = 0

        async def items() -> AsyncIterator[tuple[Row, StepOutput]]:
            yield rows[0], first
            for row, gen in zip(rows, gens, strict=True):
                async for out in gen:
                    yield row, out

        try:
            async for row, out in items():
                completion_tokens += len(out.new_token_ids)
                for chunk in render(row, out):
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        except Exception as e:  # mid-stream: an error event, then [DONE]
            err = failed(e)
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param))}\n\n"
        finally:
            for gen in gens:
                await gen.aclose()  # aborts whatever has not finished
        if usage_chunk is not None:
            yield f"data: {json.dumps(usage_chunk(usage(rows, n, completion_tokens)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
