"""Tenants: who a bearer key belongs to, which adapters it sees and changes, and its limits.

The tenants file (``HOTLORA_TENANTS_FILE``, YAML or JSON) is read at start-up (an invalid one
stops the server) and again on SIGHUP or when it changes; an invalid reload is logged and the
previous tenants stay in force. Keys are stored as sha256 digests only, and a bearer key is
compared with every digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hotlora.adapters.version import TENANT_RE

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 1.0  # how often the file is checked for changes (besides SIGHUP)


_FIX = "fix the file named by --tenants-file / HOTLORA_TENANTS_FILE"


class TenantsFileError(Exception):
    """The tenants file cannot be read or is invalid; the message, one line, says where and
    what to do."""


class TenantLimits(BaseModel):
    """A tenant's bounds; a missing one is unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_adapters: int | None = Field(None, ge=0)
    max_storage_bytes: int | None = Field(None, ge=0)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=f"^{TENANT_RE}$")
    role: Literal["tenant", "admin"] = "tenant"
    keys_sha256: list[str] = Field(min_length=1)
    limits: TenantLimits = TenantLimits()

    @model_validator(mode="after")
    def _digests(self) -> TenantEntry:
        for k in self.keys_sha256:
            if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
                raise ValueError(
                    f"tenant {self.name!r}: keys_sha256 holds lowercase hex sha256 digests "
                    "(64 characters: `printf %s KEY | sha256sum`), never plaintext keys"
                )
        return self


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[TenantEntry]

    @model_validator(mode="after")
    def _unique(self) -> TenantsFile:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        keys = [k for t in self.tenants for k in t.keys_sha256]
        if len(set(keys)) != len(keys):
            raise ValueError("a key may belong to one tenant only")
        return self


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    name: str  # a tenant's name, or "admin", "api-key", "anonymous"
    role: Literal["admin", "tenant", "user"]  # user: uses the base and shared adapters only
    tenant: str | None = None  # the namespace a tenant acts in
    limits: TenantLimits | None = None

    @property
    def can_write(self) -> bool:
        return self.role != "user"


ADMIN = Principal("admin", "admin")
API_KEY_USER = Principal("api-key", "user")
ANONYMOUS_USER = Principal("anonymous", "user")
ANONYMOUS_ADMIN = Principal("anonymous", "admin")  # no keys at all: everyone may do everything


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _read(path: Path) -> TenantsFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or str(e)  # strerror: without the path, named already
        raise TenantsFileError(f"{path}: cannot read the tenants file ({reason}); {_FIX}") from e
    except UnicodeDecodeError as e:
        raise TenantsFileError(f"{path}: the tenants file is not UTF-8 ({e}); {_FIX}") from e
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # YAML's messages span lines
        raise TenantsFileError(f"{path}: not valid {kind} ({reason}); {_FIX}") from e
    try:
        return TenantsFile.model_validate(data)
    except ValidationError as e:
        raise TenantsFileError(f"{path}: invalid tenants file: {_problems(e)}; {_FIX}") from e


def _problems(e: ValidationError) -> str:
    """pydantic's errors on one line: `tenants.0.keys_sha256: Field required, ...`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return ", ".join(parts)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TenantRegistry:
    """The tenants in force; `enabled` when a tenants file is configured."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._by_name: dict[str, TenantEntry] = {}
        self._keys: list[tuple[bytes, Principal]] = []
        self._stamp: tuple[int, int, int] | None = None
        if path is not None:
            self._install(_read(path), _stamp(path))

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _install(self, config: TenantsFile, stamp: tuple[int, int, int] | None) -> None:
        keys = [
            (bytes.fromhex(k), Principal(t.name, t.role, t.name if t.role == "tenant" else None,
                                         t.limits))
            for t in config.tenants
            for k in t.keys_sha256
        ]
        with self._lock:
            self._by_name = {t.name: t for t in config.tenants}
            self._keys = keys
            self._stamp = stamp
        log.info("tenants: %s", ", ".join(f"{t.name} ({t.role})" for t in config.tenants))

    def reload(self) -> bool:
        """Read the file again; False (and the old tenants kept) when it is invalid."""
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        try:
            config = _read(self.path)
        except TenantsFileError as e:
            log.error("tenants file not reloaded, the previous tenants stay in force: %s", e)
            with self._lock:
                self._stamp = stamp  # do not retry the same broken file every poll
            return False
        self._install(config, stamp)
        return True

    def reload_if_changed(self) -> bool:
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        with self._lock:
            same = stamp == self._stamp
        return False if same else self.reload()

    def lookup(self, key: str) -> Principal | None:
        """The principal whose digest matches `key`: every digest is compared, in constant
        time, so neither a match's position nor a near miss shows in the timing."""
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            keys = self._keys
        found = None
        for known, principal in keys:
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name
