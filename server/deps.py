"""FastAPI dependencies: the app state and who the caller is, as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from hotlora.server.errors import APIError
from hotlora.server.request_record import record_of
from hotlora.server.state import AppState
from hotlora.server.tenants import (
    ADMIN,
    ANONYMOUS_ADMIN,
    ANONYMOUS_USER,
    API_KEY_USER,
    Principal,
)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.hotlora
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    """Compared with every key in constant time (no early exit)."""
    found = False
    for k in keys:
        found |= hmac.compare_digest(token.encode(), k.encode())
    return found


def _missing(what: str) -> APIError:
    return APIError(
        401, f"{what} needs 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
    )


def _principal(state: AppState, token: str | None) -> Principal:
    s = state.settings
    admin = [s.admin_key.get_secret_value()] if s.admin_key else []
    users = [k.get_secret_value() for k in s.api_keys]
    if state.tenants.enabled:  # every request names its tenant (or the admin / a shared user)
        if token is None:
            raise _missing("this server has tenants: every request")
        found = state.tenants.lookup(token)
        if found is not None:
            return found
    elif token is None and not users:  # as before tenants: open for use without API keys
        return ANONYMOUS_ADMIN if not admin else ANONYMOUS_USER
    if token is None:
        raise _missing("completions")
    if _matches(token, admin):
        return ADMIN
    if _matches(token, users):
        return API_KEY_USER
    if not state.tenants.enabled and not users:
        return ANONYMOUS_USER if admin else ANONYMOUS_ADMIN
    raise APIError(403, "the bearer key is not valid for completions")


def authenticate(request: Request, state: StateDep) -> Principal:
    """Who is calling (401 without a key where one is needed, 403 for a wrong one)."""
    p = _principal(state, _bearer(request))
    rec = record_of(request)
    rec.principal, rec.tenant = p.name, p.tenant
    return p


def authenticate_writer(request: Request, state: StateDep) -> Principal:
    """A caller who may change adapters: an admin, or a tenant in its own namespace."""
    s = state.settings
    if not state.tenants.enabled and s.admin_key is None:  # as before tenants: open
        p = ANONYMOUS_ADMIN
    else:
        token = _bearer(request)
        if token is None:
            raise _missing("adapter changes")
        try:
            p = _principal(state, token)
        except APIError as e:
            raise APIError(403, "the bearer key is not valid for adapter changes") from e
        if not p.can_write:
            raise APIError(403, "the bearer key is not valid for adapter changes")
    rec = record_of(request)
    rec.principal, rec.tenant = p.name, p.tenant
    return p


PrincipalDep = Annotated[Principal, Depends(authenticate)]
WriterDep = Annotated[Principal, Depends(authenticate_writer)]
