"""Admission of a generation request: the caller's rate limits, then the engine queue; the
limits are held until the response ends (the access-log middleware runs the release)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from hotlora.adapters.store import AdapterVersion
from hotlora.server.engine import SamplingParams
from hotlora.server.errors import APIError
from hotlora.server.rate_limit import Lease, RateLimited, TooLarge
from hotlora.server.request_record import record_of
from hotlora.server.routes.generation import Row, submit
from hotlora.server.state import AppState
from hotlora.server.tenants import Principal


def start(
    state: AppState,
    request: Request,
    principal: Principal,
    model: str,
    version: AdapterVersion | None,
    prompts: list[list[int]],
    params: list[SamplingParams],
    n: int,
    request_id: str,
    stream: bool,
) -> tuple[list[Row], Lease]:
    """Take the request from the caller's allowance (429 past a limit, nothing taken), then
    queue its rows (fairly among tenants). The lease is charged with what the rows used,
    whenever and however the response ends."""
    record = record_of(request)
    record.model = model
    record.adapter = None if version is None else version.key
    tokens = sum(len(ids) + n * p.max_tokens for ids, p in zip(prompts, params, strict=True))
    try:
        lease = state.limiter.admit(principal, tokens)
    except RateLimited as e:
        state.metrics.requests.labels("rejected").inc()
        raise APIError(429, str(e), headers=e.headers) from e
    except TooLarge as e:
        raise APIError(400, str(e), "max_tokens") from e
    # Fair admission in the engine is per tenant; without a tenants file there is one queue.
    tenant = principal.name if state.tenants.enabled else None
    try:
        rows = submit(state, version, prompts, params, n, request_id, stream, tenant=tenant)
    except BaseException:
        lease.release(0)
        raise

    def used() -> int:
        prompt = sum(len(r.prompt_ids) for r in rows[::n])
        return prompt + sum(len(r.stream.token_ids) for r in rows)

    record.cleanups.append(lambda: lease.release(used()))
    return rows, lease


def with_limits(response: Response, lease: Lease) -> Response:
    """OpenAI's x-ratelimit-* headers on an admitted request's response."""
    response.headers.update(lease.headers)
    return response
