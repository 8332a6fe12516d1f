"""What a principal's adapter names mean: resolving `model` and adapter names to stored adapters,
the names a listing shows, and where an upload goes.

A tenant sees its own adapters and the shared ones by bare name (its own `support` hides a
shared `support`); another tenant's adapter is indistinguishable from a missing one. A user
(an API key without a tenant) sees the shared adapters. An admin sees everything and names a
tenant's adapter `tenant/name`.
"""

from __future__ import annotations

from hotlora.adapters.store import AdapterStore, AdapterVersion
from hotlora.adapters.version import qualify, split_name, valid_qualified, valid_tenant
from hotlora.server.errors import APIError
from hotlora.server.tenants import Principal, TenantRegistry


def namespaces(p: Principal) -> tuple[str | None, ...] | None:
    """The namespaces `p` sees, the first one winning a name clash; None: every one."""
    if p.role == "admin":
        return None
    if p.role == "tenant":
        return (p.tenant, None)
    return (None,)


def _latest(store: AdapterStore, name: str) -> AdapterVersion | None:
    # A store other servers write too (replicas): ask the disk, so their uploads and deletes
    # apply to the next request here.
    return store.latest_fresh(name) if store.shared else store.latest(name)


def resolve(store: AdapterStore, p: Principal, name: str) -> AdapterVersion | None:
    """The newest version of the adapter `p` calls `name`, or None if `p` sees none."""
    if not valid_qualified(name):
        return None
    tenant, short = split_name(name)
    if p.role == "admin":
        return _latest(store, name)
    if tenant is not None:  # a tenant may name its own adapters qualified, nothing else
        return _latest(store, name) if p.role == "tenant" and tenant == p.tenant else None
    if p.role == "tenant":
        own = _latest(store, qualify(p.tenant, short))
        if own is not None:
            return own
    return _latest(store, short)


def shown_name(p: Principal, v: AdapterVersion) -> str:
    """An adapter's id in what `p` reads: qualified for an admin, bare for its tenant."""
    return v.name if p.role == "admin" else v.short_name


def write_target(p: Principal, tenants: TenantRegistry, name: str, param: str) -> str:
    """The qualified name an upload by `p` called `name` is stored as (400/403 if none)."""
    tenant, short = split_name(name)
    if p.role == "tenant":
        if tenant is not None and tenant != p.tenant:
            raise APIError(
                403, "a tenant uploads into its own namespace: give the bare adapter name", param
            )
        return qualify(p.tenant, short)
    if p.role != "admin":
        raise APIError(403, "adapter changes need the admin key or a tenant's key", param)
    if tenant is not None and not (valid_tenant(tenant) and tenants.exists(tenant)):
        raise APIError(
            400,
            f"{tenant!r} is not a tenant in the tenants file: name a shared adapter without a "
            "slash, or a tenant's as tenant/name",
            param,
        )
    return name


def delete_target(
    store: AdapterStore, p: Principal, name: str, param: str
) -> AdapterVersion | None:
    """The adapter `p` deletes by calling it `name` (None: it sees none); 403 when `p` sees it
    but may not change it (a shared adapter, for a tenant or a user)."""
    v = resolve(store, p, name)
    if v is not None and not (p.role == "admin" or (p.role == "tenant" and v.tenant == p.tenant)):
        raise APIError(403, f"adapter {name!r} is shared: only an admin can change it", param)
    return v
