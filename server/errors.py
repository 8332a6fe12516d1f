"""API errors: every failure leaves as {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from hotlora.server.schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """Raised by handlers; rendered in OpenAI's error shape with the given status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict[str, object]:
    err = ErrorBody(
        message=message, type=_TYPES.get(status, "server_error"), param=param, code=status
    )
    return ErrorResponse(error=err).model_dump()


def _response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


# Probed in this order for a 405's Allow header.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this request's path. Starlette's 405 lists only the
    methods of the first route whose path matched, but one path may have several routes (GET
    and DELETE /v1/adapters/{name} are two), and Allow must name them all (RFC 9110). Each
    method is probed through the routes' public `matches` (a FULL match is a route that takes
    the path with that method), which also sees into included routers."""
    routes = request.app.router.routes
    allowed = [
        m
        for m in _METHODS
        if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return _response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _response(400, f"the request body is not valid JSON: {first.get('ctx', {})}")
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = loc[0] if loc else None  # the field; deeper parts name union branches
        where = f" (field {param!r})" if param else ""
        return _response(400, f"{first.get('msg', 'invalid request')}{where}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = getattr(e, "headers", None)
        if e.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return _response(e.status_code, str(e.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _response(500, "internal server error")
