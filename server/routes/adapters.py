"""Adapter management: upload (multipart), list, inspect, delete, and vLLM's load/unload."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from adapters.errors import AdapterError
from adapters.store import AdapterVersion, check_name
from server.deps import AdminDep, ApiKeyDep, StateDep
from server.errors import APIError
from server.routes.listing import After, Limit, full_listings, json_response, quote, render
from server.schemas import (
    AdapterDetail,
    AdapterInfo,
    AdapterList,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from server.state import AppState

router = APIRouter()
# Files load_lora_adapter may read from a directory; each must stay inside the allowed roots.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def info(v: AdapterVersion) -> AdapterInfo:
    return AdapterInfo(
        name=v.name,
        version=v.version,
        kind=v.kind,
        rank=v.rank,
        target_modules=list(v.target_modules),
        size_bytes=v.size_bytes,
        sha256=v.sha256,
        created=v.created,
    )


def _name(state: AppState, name: str, param: str) -> str:
    try:
        check_name(name)
    except AdapterError as e:
        raise APIError(400, str(e), param) from e
    if name == state.settings.model_id:
        raise APIError(400, f"{name!r} is the base model's id; choose another adapter name", param)
    return name


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


@router.post("/v1/adapters", status_code=201, dependencies=[AdminDep], response_model=AdapterInfo)
async def upload_adapter(
    request: Request,
    state: StateDep,
    name: Annotated[str, Form(description="adapter name, [A-Za-z0-9._-]{1,64}")],
    config: Annotated[UploadFile, Form(description="adapter_config.json")],
    weights: Annotated[UploadFile, Form(description="adapter_model.safetensors")],
) -> AdapterInfo:
    limit = state.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + (1 << 16):
        raise APIError(413, f"upload of {length} bytes exceeds the {limit}-byte limit")
    _name(state, name, "name")
    config_bytes = await _read(config, limit, "config")
    weights_bytes = await _read(weights, limit, "weights")
    try:
        replaced = state.store.latest(name) is not None
        version, _ = await run_in_threadpool(state.store.put, name, config_bytes, weights_bytes)
    except AdapterError as e:
        state.metrics.uploads.labels("rejected").inc()
        status = 413 if type(e).__name__ == "AdapterTooLarge" else 400
        raise APIError(status, str(e), e.field) from e
    await _publish(state, version, replaced)
    return info(version)


def _info_json(v: AdapterVersion) -> str:
    """An AdapterInfo as JSON text (its fields, in its order)."""
    targets = ",".join(quote(t) for t in v.target_modules)
    return (
        f'{{"name":{quote(v.name)},"version":{int(v.version)},"kind":{quote(v.kind)},'
        f'"rank":{int(v.rank)},"target_modules":[{targets}],"size_bytes":{int(v.size_bytes)},'
        f'"sha256":{quote(v.sha256)},"created":{int(v.created)}}}'
    )


def _adapter_page(state: AppState, after: str | None, limit: int | None) -> bytes:
    versions, more = state.store.page(after, limit)
    first, last = (versions[0].name, versions[-1].name) if versions else (None, None)
    return render([_info_json(v) for v in versions], first, last, more)


@router.get("/v1/adapters", dependencies=[ApiKeyDep], response_model=AdapterList)
async def list_adapters(state: StateDep, limit: Limit = None, after: After = None) -> Response:
    """The newest version of every adapter, by name; paged with `limit` + `after` (a name)."""
    if limit is None and after is None:
        body = full_listings.get(state.store, "adapters", lambda: _adapter_page(state, None, None))
        return json_response(body)
    return json_response(_adapter_page(state, after, limit))


@router.get("/v1/adapters/{name}", dependencies=[ApiKeyDep], response_model=AdapterDetail)
async def get_adapter(name: str, state: StateDep) -> AdapterDetail:
    v = state.store.latest(name)
    if v is None:
        raise APIError(404, f"adapter {name!r} does not exist", "name")
    versions = [x.version for x in state.store.versions(name)]
    resident = v.key in await state.client.resident()
    return AdapterDetail(**info(v).model_dump(), versions=versions, resident=resident)


async def _delete(state: AppState, name: str, param: str) -> None:
    removed = await run_in_threadpool(state.store.delete, name)
    if not removed:
        raise APIError(404, f"adapter {name!r} does not exist", param)
    for v in removed:
        state.client.drop_cached(v.key)
    # Requests already running on it finish; new ones get a 404.
    await state.client.retire(name)


@router.delete("/v1/adapters/{name}", dependencies=[AdminDep])
async def delete_adapter(name: str, state: StateDep) -> dict[str, object]:
    await _delete(state, name, "name")
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


@router.post("/v1/load_lora_adapter", dependencies=[AdminDep])
async def load_lora_adapter(body: LoadLoraRequest, state: StateDep) -> JSONResponse:
    _name(state, body.lora_name, "lora_name")
    path = _allowed(state, body.lora_path)
    if state.store.latest(body.lora_name) is not None:
        raise APIError(
            400,
            f"adapter {body.lora_name!r} is already loaded; unload it first or "
            "upload a new version with POST /v1/adapters",
            "lora_name",
        )
    try:
        version, _ = await run_in_threadpool(state.store.put_dir, body.lora_name, path)
    except AdapterError as e:
        state.metrics.uploads.labels("rejected").inc()
        raise APIError(400, str(e), e.field) from e
    await _publish(state, version, replaced=False)
    return JSONResponse(
        {"message": f"adapter {body.lora_name!r} loaded", **info(version).model_dump()}
    )


@router.post("/v1/unload_lora_adapter", dependencies=[AdminDep])
async def unload_lora_adapter(body: UnloadLoraRequest, state: StateDep) -> JSONResponse:
    await _delete(state, body.lora_name, "lora_name")
    return JSONResponse({"message": f"adapter {body.lora_name!r} unloaded"})
