"""What /v1/completions and /v1/chat/completions share: a request becomes engine rows (one
per prompt and choice), whose outputs are collected or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from hotlora.adapters.store import AdapterVersion
from hotlora.server.engine import RequestError, SamplingParams, StepOutput
from hotlora.server.engine.client import AdapterGone, EngineUnavailable, QueueFull, Stream
from hotlora.server.engine.outputs import TokenLogprob
from hotlora.server.errors import APIError, error_body
from hotlora.server.openai_schemas import SamplingFields, Usage
from hotlora.server.request_record import record_of
from hotlora.server.state import AppState


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
        raise APIError(400, str(e), e.param) from e


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
    params = sampling_params(
        body, body.min_tokens if max_tokens is None else max_tokens, logprobs, prompt_logprobs
    )
    try:
        ids = state.inputs.check_request(prompt, params)
    except RequestError as e:
        raise APIError(400, str(e), e.param or field) from e
    if max_tokens is None:
        params = replace(params, max_tokens=state.inputs.max_seq_len - len(ids))
    return ids, params


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
    stream: bool = False,
    tenant: str | None = None,
) -> list[Row]:
    """Queue n choices per prompt (choice index = prompt * n + j; choice j seeded seed + j),
    all or none: 429 when the queue cannot take them. Streamed, every row's outputs go to one
    queue, in the order they are made (choices interleave, as OpenAI's do)."""
    bound = state.settings.max_queue
    if 0 < bound < len(prompts) * n:  # (with no queue at all, every request is a 429)
        raise APIError(
            400,
            f"{len(prompts)} prompt(s) x n={n} make {len(prompts) * n} rows, but at most "
            f"{bound} can wait in the queue: lower n or send fewer prompts",
            "n",
        )
    rows: list[Row] = []
    shared: asyncio.Queue[StepOutput | BaseException] | None = asyncio.Queue() if stream else None
    try:
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            for j in range(n):
                seeded = p if p.seed is None or j == 0 else replace(p, seed=p.seed + j)
                index = i * n + j
                rid = f"{request_id}-{index}"
                out = state.client.submit(ids, version, seeded, rid, shared, tenant=tenant)
                rows.append(Row(index, ids, out))
    except (QueueFull, EngineUnavailable) as e:
        for r in rows:
            state.client.abort(r.stream.request_id)
        state.metrics.requests.labels("rejected").inc()
        if isinstance(e, EngineUnavailable):
            raise APIError(503, f"{e}; retry later", headers={"Retry-After": "1"}) from e
        raise APIError(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from e
    return rows


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


class DeadlinePassed(Exception):
    """The request's deadline (request_timeout_s) passed before it produced a token."""


_TIMED_OUT = object()


def _deadline(state: AppState, stream: Stream) -> float | None:
    timeout = state.settings.request_timeout_s
    return None if timeout is None else stream.arrival + timeout


async def _next(queue: asyncio.Queue[Any], deadline: float | None) -> Any:
    """The queue's next item, or _TIMED_OUT once the deadline (perf_counter time) passes."""
    if deadline is None:
        return await queue.get()
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
            return await queue.get()
    except TimeoutError:
        return _TIMED_OUT


def _cut(request_id: str) -> StepOutput:
    """The last output of a row its deadline ended (OpenAI has no finish_reason for that)."""
    return StepOutput(request_id, [], "", "length")


async def _watch_disconnect(request: Request, stream: Stream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.queue.put_nowait(_ClientGone())  # type: ignore[arg-type]


async def _outputs(state: AppState, stream: Stream, request: Request) -> AsyncIterator[StepOutput]:
    """A non-streamed request's outputs in order; aborts it if the client disconnects (a
    watcher task listens for that, so waiting for tokens stays a bare queue read)."""
    tracker = _Tracker(state, stream)
    finished = False
    deadline = _deadline(state, stream)
    watcher = asyncio.create_task(_watch_disconnect(request, stream))
    try:
        while True:
            item = await _next(stream.queue, deadline)
            if item is _TIMED_OUT:
                state.metrics.requests.labels("timeout").inc()
                if tracker.first is None:
                    raise DeadlinePassed(stream.request_id)
                yield _cut(stream.request_id)  # the row is aborted below
                return
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
        watcher.cancel()
        if not finished:
            state.client.abort(stream.request_id)


def failed(e: Exception, state: AppState | None = None) -> APIError:
    if isinstance(e, AdapterGone):
        return APIError(404, f"{e}; GET /v1/models lists the adapters", "model")
    if isinstance(e, DeadlinePassed):
        timeout = None if state is None else state.settings.request_timeout_s
        return APIError(
            504,
            f"the request did not start within the server's request timeout ({timeout} s): "
            "the server is busy; retry later",
            headers={"Retry-After": "1"},
        )
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
    results: list[Result] = []
    for row in rows:
        r = Result()
        try:
            async for out in _outputs(state, row.stream, request):
                r.text += out.new_text
                r.token_ids += out.new_token_ids
                r.logprobs += out.logprobs
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                r.finish_reason = out.finish_reason
        except DeadlinePassed as e:
            if not results:  # nothing started: 504; otherwise this choice is cut empty
                for other in rows:
                    state.client.abort(other.stream.request_id)
                raise failed(e, state) from e
            r.finish_reason = "length"
        except Exception as e:
            for other in rows:
                state.client.abort(other.stream.request_id)
            raise failed(e) from e
        results.append(r)
    return results


def usage(
    rows: list[Row], n: int, completion_tokens: int, request: Request | None = None
) -> Usage:
    """Each prompt counts once, whatever n is (as OpenAI); given the request, its access-log
    record gets the counts too."""
    prompt = sum(len(r.prompt_ids) for r in rows[::n])
    if request is not None:
        record = record_of(request)
        record.prompt_tokens, record.completion_tokens = prompt, completion_tokens
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
    """Server-sent events: the rows' chunks as they come (`submit(stream=True)` gave them one
    queue), then usage (if asked) and [DONE]. Until the first output arrives, failures still
    get a proper status code; whatever ends the stream early aborts every unfinished row."""
    queue = rows[0].stream.queue
    by_id = {r.stream.request_id: r for r in rows}
    trackers = {rid: _Tracker(state, r.stream) for rid, r in by_id.items()}
    unfinished = set(by_id)

    def abort_unfinished() -> None:
        for rid in unfinished:
            state.client.abort(rid)
        unfinished.clear()

    deadline = _deadline(state, rows[0].stream)
    first = await _next(queue, deadline)
    if first is _TIMED_OUT:
        state.metrics.requests.labels("timeout").inc(len(unfinished))
        abort_unfinished()
        raise failed(DeadlinePassed(rows[0].stream.request_id), state)
    if isinstance(first, BaseException):
        state.metrics.requests.labels("error").inc()
        abort_unfinished()
        raise failed(first) from first  # type: ignore[arg-type]

    async def events() -> AsyncIterator[str]:
        completion_tokens, errored = 0, False
        item: StepOutput | BaseException = first
        try:
            while unfinished:
                for out in _coalesce(item, queue):
                    if isinstance(out, BaseException):
                        state.metrics.requests.labels("error").inc()
                        raise out
                    trackers[out.request_id].see(out)
                    completion_tokens += len(out.new_token_ids)
                    for chunk in render(by_id[out.request_id], out):
                        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                    if out.finished:
                        unfinished.discard(out.request_id)
                if unfinished:
                    item = await _next(queue, deadline)
                    if item is _TIMED_OUT:  # each unfinished row ends with what it has
                        state.metrics.requests.labels("timeout").inc(len(unfinished))
                        for rid in list(unfinished):
                            state.client.abort(rid)
                            for chunk in render(by_id[rid], _cut(rid)):
                                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                        unfinished.clear()
        except Exception as e:  # mid-stream: an error event, then [DONE]
            errored = True
            err = failed(e)
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param))}\n\n"
        finally:  # the client went away (we are closed), or an error: free every row
            if unfinished and not errored:
                state.metrics.requests.labels("abort").inc(len(unfinished))
            abort_unfinished()
            # here, so the access log gets the counts of a stream cut short too
            counts = usage(rows, n, completion_tokens, request)
        if usage_chunk is not None:
            yield f"data: {json.dumps(usage_chunk(counts))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _coalesce(
    first: StepOutput | BaseException, queue: asyncio.Queue[StepOutput | BaseException]
) -> list[StepOutput | BaseException]:
    """`first` and whatever else is already queued, each row's outputs merged into one (in
    order of first appearance): a stream that fell behind catches up in one chunk per row
    instead of one per token. An error ends the list."""
    merged: dict[str, StepOutput] = {}
    item: StepOutput | BaseException | None = first
    while item is not None:
        if isinstance(item, BaseException):
            return [*merged.values(), item]
        prev = merged.get(item.request_id)
        merged[item.request_id] = item if prev is None else _merge(prev, item)
        item = None if queue.empty() else queue.get_nowait()
    return list(merged.values())


def _merge(a: StepOutput, b: StepOutput) -> StepOutput:
    return StepOutput(
        a.request_id,
        a.new_token_ids + b.new_token_ids,
        a.new_text + b.new_text,
        b.finish_reason,
        a.logprobs + b.logprobs,
        a.prompt_logprobs,
    )
