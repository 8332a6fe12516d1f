"""What one HTTP request did, for its access-log line: filled by the auth dependency and the
handlers, written (and its cleanups run) by the access-log middleware when the response ends,
streams included. A type of its own so routes, deps and the middleware share it without
importing each other."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

log = logging.getLogger(__name__)

RECORD_KEY = "hotlora_record"  # in the ASGI scope's "state"


@dataclass
class RequestRecord:
    request_id: str
    principal: str | None = None  # who: a tenant's name, "admin", "api-key" or "anonymous"
    tenant: str | None = None  # the tenant namespace the request acted in (None: shared)
    model: str | None = None  # the `model` asked for, as the client wrote it
    adapter: str | None = None  # the adapter version served ("name@version"), None for the base
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Run once when the response has been sent or abandoned (rate-limit leases, slots).
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def finish(self) -> None:
        """Run the cleanups (each at most once, in order; one failing does not stop the rest)."""
        todo, self.cleanups = self.cleanups, []
        for fn in todo:
            try:
                fn()
            except Exception:  # a cleanup must never turn a finished response into an error
                log.exception("request cleanup failed")


def new_request_id() -> str:
    return uuid.uuid4().hex


def record_of(conn: HTTPConnection) -> RequestRecord:
    """The request's record: the middleware's, or (in an app without it) a new one kept in the
    scope, so handlers can always write to it."""
    state = conn.scope.setdefault("state", {})
    rec = state.get(RECORD_KEY)
    if rec is None:
        rec = state[RECORD_KEY] = RequestRecord(new_request_id())
    return rec
