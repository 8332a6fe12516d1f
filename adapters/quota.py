"""A namespace's storage bounds and the refusal an upload past them gets."""

from __future__ import annotations

from dataclasses import dataclass

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.store_index import Usage
from hotlora.adapters.version import split_name


@dataclass(frozen=True)
class Quota:
    """A namespace's bounds: adapter names and bytes over every stored version (None: none)."""

    max_adapters: int | None = None
    max_bytes: int | None = None


class QuotaExceeded(AdapterError):
    """An upload would take its namespace past a quota; `limit` names which."""

    def __init__(self, name: str, message: str, limit: str) -> None:
        super().__init__(name, message, field="name")
        self.limit = limit  # "max_adapters" | "max_storage_bytes"

    def __reduce__(self) -> tuple[type[QuotaExceeded], tuple[str, str, str]]:
        return (type(self), (self.adapter, self.message, self.limit))


def check_quota(name: str, size: int, quota: Quota, usage: Usage, is_new: bool) -> None:
    """Refuse storing `size` more bytes under `name` (a new name if `is_new`) in a namespace
    that holds `usage`, past `quota`."""
    tenant = split_name(name)[0] or "shared"
    if quota.max_adapters is not None and is_new and usage.adapters >= quota.max_adapters:
        raise QuotaExceeded(
            name,
            f"tenant {tenant!r} already has {usage.adapters} adapters, its max_adapters limit: "
            "delete one first",
            "max_adapters",
        )
    if quota.max_bytes is not None and usage.bytes + size > quota.max_bytes:
        raise QuotaExceeded(
            name,
            f"storing {size} more bytes would take tenant {tenant!r} to {usage.bytes + size} "
            f"bytes, over its max_storage_bytes limit of {quota.max_bytes}: delete adapters "
            "(every version counts) first",
            "max_storage_bytes",
        )
