"""Adapter names, tenant namespaces and one stored version: what the store, its index and the
server share (a module of its own so none of them imports another for it).

A shared adapter is named ``support``; a tenant's is ``acme/support`` (the qualified name: the
tenant's namespace, a slash, the name). On disk the slash becomes ``~``, which no name contains,
so every adapter is still one directory under the store's root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hotlora.adapters.errors import AdapterError

NAME_RE = r"[A-Za-z0-9._-]{1,64}"
TENANT_RE = r"[a-z0-9-]{1,32}"
BASE_NAME = "base.json"  # at the store's root: the base every stored adapter was validated for
_NAME = re.compile(NAME_RE)
_TENANT = re.compile(TENANT_RE)
_DISK_SEP = "~"


def check_name(name: str) -> None:
    """Refuse a (bare) name that could escape the store's root or collide with its own files."""
    # A leading dot is refused as well (not only "." and ".."): it would hide the directory and
    # could name .staging or .trash.
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name.startswith("."):
        raise AdapterError(
            str(name), f"name must match {NAME_RE} and not start with '.'", field="name"
        )
    if name == BASE_NAME:
        raise AdapterError(name, f"{BASE_NAME!r} is the store's own file", field="name")


def valid_tenant(tenant: str) -> bool:
    return isinstance(tenant, str) and _TENANT.fullmatch(tenant) is not None


def split_name(qualified: str) -> tuple[str | None, str]:
    """(tenant, name) of a qualified name; tenant None for a shared adapter."""
    tenant, sep, name = qualified.rpartition("/")
    return (tenant, name) if sep else (None, qualified)


def qualify(tenant: str | None, name: str) -> str:
    return name if tenant is None else f"{tenant}/{name}"


def check_qualified(qualified: str) -> None:
    """A shared name, or ``tenant/name`` with a valid tenant and name."""
    if not isinstance(qualified, str):
        raise AdapterError(str(qualified), "name must be a string", field="name")
    tenant, name = split_name(qualified)
    if tenant is not None and not valid_tenant(tenant):
        raise AdapterError(
            qualified, f"a tenant's adapter is named tenant/name, tenant matching {TENANT_RE}",
            field="name",
        )
    try:
        check_name(name)
    except AdapterError as e:
        raise AdapterError(qualified, e.message, field="name") from None


def valid_qualified(qualified: str) -> bool:
    try:
        check_qualified(qualified)
    except AdapterError:
        return False
    return True


def disk_name(qualified: str) -> str:
    """The directory under the store's root that holds a qualified name's versions."""
    return qualified.replace("/", _DISK_SEP)


def from_disk_name(entry: str) -> str:
    return entry.replace(_DISK_SEP, "/", 1)


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One stored, validated and immutable upload of an adapter."""

    name: str  # qualified: "support" (shared) or "acme/support" (tenant acme's)
    version: int  # 1, 2, 3 ... per name; never reused within a process (see adapters/store.py)
    root: str  # the store's directory (one string shared by all of a store's versions)
    kind: str  # "lora" | "deu" | "lora+deu"
    rank: int
    target_modules: tuple[str, ...]  # targets present in the file, in the layout's order
    size_bytes: int  # size of adapter_model.safetensors
    sha256: str  # hex digest of adapter_model.safetensors
    created: int  # unix seconds

    @property
    def tenant(self) -> str | None:
        """The namespace that owns this version (None: shared, uploaded by an admin)."""
        return split_name(self.name)[0]

    @property
    def short_name(self) -> str:
        """The name within its namespace (what its tenant calls it)."""
        return split_name(self.name)[1]

    @property
    def location(self) -> str:
        """The directory holding adapter_config.json + adapter_model.safetensors."""
        return os.path.join(self.root, disk_name(self.name), f"v{self.version}")

    @property
    def path(self) -> Path:
        """The version's directory as a Path (built on demand: the index keeps none)."""
        return Path(self.location)

    @property
    def key(self) -> str:
        """The engine's resident-adapter name for this version ("@" cannot occur in a name)."""
        return f"{self.name}@{self.version}"
