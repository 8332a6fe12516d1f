"""Adapter management: upload (multipart), list, inspect, delete, and vLLM's load/unload."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.store import (
    AdapterTooLarge,
    AdapterVersion,
    Quota,
    QuotaExceeded,
    check_qualified,
)
from hotlora.server.access_log import audit
from hotlora.server.deps import PrincipalDep, StateDep, WriterDep
from hotlora.server.errors import APIError
from hotlora.server.namespaces import delete_target, namespaces, resolve, shown_name, write_target
from hotlora.server.request_record import record_of
from hotlora.server.routes.listing import After, Limit, full_listings, json_response, quote, render
from hotlora.server.schemas import (
    AdapterDetail,
    AdapterInfo,
    AdapterList,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from hotlora.server.state import AppState
from hotlora.server.tenants import Principal

router = APIRouter()
# Files load_lora_adapter may read from a directory; each must stay inside the allowed roots.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def info(v: AdapterVersion, p: Principal) -> AdapterInfo:
    return AdapterInfo(
        name=shown_name(p, v),
        version=v.version,
        kind=v.kind,
        rank=v.rank,
        target_modules=list(v.target_modules),
        size_bytes=v.size_bytes,
        sha256=v.sha256,
        created=v.created,
    )


def _target(state: AppState, p: Principal, name: str, param: str) -> str:
    """The qualified name an upload by `p` called `name` is stored as, or a 4xx."""
    try:
        check_qualified(name)
    except AdapterError as e:
        raise APIError(400, str(e), param) from e
    if name == state.settings.model_id:
        raise APIError(400, f"{name!r} is the base model's id; choose another adapter name", param)
    return write_target(p, state.tenants, name, param)


@contextmanager
def _audited(request: Request, action: str, name: str) -> Iterator[list[AdapterVersion]]:
    """An audit line for an adapter change: each version it made or removed, or the refusal.
    The handler appends the versions to the yielded list."""
    changed: list[AdapterVersion] = []
    record = record_of(request)
    try:
        yield changed
    except APIError as e:
        audit(action, record, name=name, version=None, sha256=None, outcome=f"refused {e.status}")
        raise
    for v in changed:
        audit(action, record, name=v.name, version=v.version, sha256=v.sha256, outcome="ok")


def _quota(p: Principal) -> Quota | None:
    """A tenant's storage bounds (admins are bound by none)."""
    lim = p.limits
    if p.role != "tenant" or lim is None:
        return None
    return Quota(lim.max_adapters, lim.max_storage_bytes)


def _refused(state: AppState, e: AdapterError) -> APIError:
    state.metrics.uploads.labels("rejected").inc()
    if isinstance(e, QuotaExceeded):
        return APIError(403 if e.limit == "max_adapters" else 413, str(e), e.limit)
    return APIError(413 if isinstance(e, AdapterTooLarge) else 400, str(e), e.field)


async def _read(file: UploadFile, limit: int, field: str) -> bytes:
    """Read an upload, refusing (413) as soon as it passes the size limit."""
    chunks, size = [], 0
    while chunk := await file.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"{field} is larger than the {limit}-byte upload limit", field)
        chunks.append(chunk)
    return b"".join(chunks)


async def _publish(state: AppState, v: AdapterVersion, replaced: bool) -> None:
    """Make a new version the one new requests get; older versions retire when idle."""
    if replaced:
        state.metrics.hot_swaps.inc()
    state.metrics.uploads.labels("ok").inc()
    await state.client.retire(v.name, keep=v.key)


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo)
async def upload_adapter(
    request: Request,
    state: StateDep,
    principal: WriterDep,
    name: Annotated[
        str,
        Form(description="adapter name, [A-Za-z0-9._-]{1,64}; an admin names a tenant's "
             "adapter tenant/name"),
    ],
    config: Annotated[UploadFile, File(description="adapter_config.json")],
    weights: Annotated[UploadFile, File(description="adapter_model.safetensors")],
) -> AdapterInfo:
    limit = state.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + (1 << 16):
        raise APIError(413, f"upload of {length} bytes exceeds the {limit}-byte limit")
    with _audited(request, "upload", name) as changed:
        target = _target(state, principal, name, "name")
        config_bytes = await _read(config, limit, "config")
        weights_bytes = await _read(weights, limit, "weights")
        try:
            replaced = state.store.latest(target) is not None
            version, _ = await run_in_threadpool(
                state.store.put, target, config_bytes, weights_bytes, _quota(principal)
            )
        except AdapterError as e:
            raise _refused(state, e) from e
        changed.append(version)
        await _publish(state, version, replaced)
    return info(version, principal)


def _info_json(v: AdapterVersion, p: Principal) -> str:
    """An AdapterInfo as JSON text (its fields, in its order)."""
    targets = ",".join(quote(t) for t in v.target_modules)
    return (
        f'{{"name":{quote(shown_name(p, v))},"version":{int(v.version)},"kind":{quote(v.kind)},'
        f'"rank":{int(v.rank)},"target_modules":[{targets}],"size_bytes":{int(v.size_bytes)},'
        f'"sha256":{quote(v.sha256)},"created":{int(v.created)}}}'
    )


def _adapter_page(state: AppState, p: Principal, after: str | None, limit: int | None) -> bytes:
    versions, more = visible_page(state, p, after, limit)
    names = [shown_name(p, v) for v in versions]
    first, last = (names[0], names[-1]) if names else (None, None)
    return render([_info_json(v, p) for v in versions], first, last, more)


def visible_page(
    state: AppState, p: Principal, after: str | None, limit: int | None
) -> tuple[list[AdapterVersion], bool]:
    """A page of the adapters `p` sees, by the name `p` calls them."""
    seen = namespaces(p)
    if seen is None:
        return state.store.page(after, limit)
    return state.store.view_page(seen, after, limit)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(
    state: StateDep, principal: PrincipalDep, limit: Limit = None, after: After = None
) -> Response:
    """The newest version of every adapter the caller sees, by name; paged with `limit` +
    `after` (a name)."""
    if limit is None and after is None:
        key = ("adapters", namespaces(principal), principal.role)
        body = full_listings.get(
            state.store, key, lambda: _adapter_page(state, principal, None, None)
        )
        return json_response(body)
    return json_response(_adapter_page(state, principal, after, limit))


def _missing(name: str, param: str) -> APIError:
    # The same answer whether the adapter is missing or another tenant's (no oracle).
    return APIError(404, f"adapter {name!r} does not exist", param)


@router.get("/v1/adapters/{name:path}", response_model=AdapterDetail)
async def get_adapter(name: str, state: StateDep, principal: PrincipalDep) -> AdapterDetail:
    v = resolve(state.store, principal, name)
    if v is None:
        raise _missing(name, "name")
    versions = [x.version for x in state.store.versions(v.name)]
    resident = v.key in await state.client.resident()
    return AdapterDetail(**info(v, principal).model_dump(), versions=versions, resident=resident)


async def _delete(
    request: Request, state: AppState, p: Principal, name: str, param: str, action: str
) -> None:
    with _audited(request, action, name) as changed:
        v = delete_target(state.store, p, name, param)
        removed = [] if v is None else await run_in_threadpool(state.store.delete, v.name)
        if v is None or not removed:
            raise _missing(name, param)
        changed += removed
        for r in removed:
            state.client.drop_cached(r.key)
        # Requests already running on it finish; new ones get a 404.
        await state.client.retire(v.name)


@router.delete("/v1/adapters/{name:path}")
async def delete_adapter(
    name: str, request: Request, state: StateDep, principal: WriterDep
) -> dict[str, object]:
    await _delete(request, state, principal, name, "name", "delete")
    return {"name": name, "deleted": True}


def _allowed(state: AppState, raw: str) -> Path:
    """Resolve lora_path (symlinks included) and require it inside an allowed directory."""
    roots = state.settings.allowed_adapter_dirs
    if not roots:
        raise APIError(
            403,
            "loading adapters from server paths is disabled; set "
            "HOTLORA_ALLOWED_ADAPTER_DIRS or upload with POST /v1/adapters",
            "lora_path",
        )
    inside = [r.resolve() for r in roots]

    def check(p: Path) -> Path:
        # Containment first, on the symlink-resolved path, so a refusal never reveals
        # whether something outside the allowed directories exists.
        try:
            real = p.resolve(strict=False)
        except (OSError, RuntimeError) as e:
            raise APIError(400, f"lora_path {raw!r} cannot be resolved", "lora_path") from e
        if not any(real.is_relative_to(r) for r in inside):
            raise APIError(
                403, f"lora_path {raw!r} is outside the allowed adapter directories", "lora_path"
            )
        return real

    path = check(Path(raw))
    if not path.exists():
        raise APIError(400, f"lora_path {raw!r} does not exist", "lora_path")
    if not path.is_dir():
        raise APIError(400, f"lora_path {raw!r} is not a directory", "lora_path")
    for name in ADAPTER_FILES:  # the files themselves may be symlinks leading out
        check(path / name)
    return path


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoraRequest, request: Request, state: StateDep, principal: WriterDep
) -> JSONResponse:
    with _audited(request, "load", body.lora_name) as changed:
        version = await _load(state, principal, body)
        changed.append(version)
    return JSONResponse(
        {"message": f"adapter {body.lora_name!r} loaded", **info(version, principal).model_dump()}
    )


async def _load(state: AppState, principal: Principal, body: LoadLoraRequest) -> AdapterVersion:
    target = _target(state, principal, body.lora_name, "lora_name")
    path = _allowed(state, body.lora_path)
    if state.store.latest(target) is not None:
        raise APIError(
            400,
            f"adapter {body.lora_name!r} is already loaded; unload it first or "
            "upload a new version with POST /v1/adapters",
            "lora_name",
        )
    try:
        version, _ = await run_in_threadpool(
            state.store.put_dir, target, path, _quota(principal)
        )
    except AdapterError as e:
        raise _refused(state, e) from e
    await _publish(state, version, replaced=False)
    return version


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoraRequest, request: Request, state: StateDep, principal: WriterDep
) -> JSONResponse:
    await _delete(request, state, principal, body.lora_name, "lora_name", "unload")
    return JSONResponse({"message": f"adapter {body.lora_name!r} unloaded"})
