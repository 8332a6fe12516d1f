"""FastAPI dependencies: the app state and bearer-key checks, as Annotated aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from server.errors import APIError
from server.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.hotlora
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(request: Request, keys: list[str], what: str) -> None:
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise APIError(
            401,
            f"{what} needs 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(secrets.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(403, f"the bearer key is not valid for {what}")


def require_admin(request: Request, state: StateDep) -> None:
    key = state.settings.admin_key
    _check(request, [key.get_secret_value()] if key else [], "adapter changes")


def require_api_key(request: Request, state: StateDep) -> None:
    s = state.settings
    keys = [k.get_secret_value() for k in s.api_keys]
    if keys and s.admin_key:
        keys.append(s.admin_key.get_secret_value())
    _check(request, keys, "completions")


AdminDep = Depends(require_admin)
ApiKeyDep = Depends(require_api_key)
