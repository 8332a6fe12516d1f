"""The persistent adapter store: name -> immutable, numbered versions on local disk.

Layout: ``root/<name>/v<k>/{adapter_config.json, adapter_model.safetensors, meta.json}``.
A version becomes visible only by one ``os.rename`` of a fully written, fsynced and validated
staging directory, so a crash leaves either the whole version or nothing that gets listed.
``root/.staging`` and ``root/.trash`` hold in-flight uploads and deletes; both are emptied at
startup.

Version numbers only grow while a process lives, even across a delete and re-upload of a name,
because ``name@version`` is the engine's resident-adapter key and a reused key could serve a
deleted version's weights from a cache. After a restart (when no cache survives) the numbering
of a fully deleted name starts again at 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.adapter import Adapter, load_adapter
from adapters.errors import AdapterError
from adapters.format import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, BaseShapes

logger = logging.getLogger(__name__)

NAME_RE = r"[A-Za-z0-9._-]{1,64}"
META_NAME = "meta.json"
BASE_NAME = "base.json"  # at the root: the base every stored adapter was validated against
_NAME = re.compile(NAME_RE)
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,17})")
_STAGING = ".staging"
_TRASH = ".trash"
_META_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


class AdapterTooLarge(AdapterError):
    """An upload is over the store's byte limit (a separate type so a server can answer 413)."""


def check_name(name: str) -> None:
    """Refuse a name that could escape ``root`` or collide with the store's own directories."""
    # A leading dot is refused as well (not only "." and ".."): it would hide the directory and
    # could name .staging or .trash.
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name.startswith("."):
        raise AdapterError(
            str(name), f"name must match {NAME_RE} and not start with '.'", field="name"
        )
    if name == BASE_NAME:
        raise AdapterError(name, f"{BASE_NAME!r} is the store's own file", field="name")


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except AdapterError:
        return False
    return True


@dataclass(frozen=True)
class AdapterVersion:
    """One stored, validated and immutable upload of an adapter."""

    name: str
    version: int  # 1, 2, 3 ... per name; never reused within a process (see module docstring)
    path: Path  # directory holding adapter_config.json + adapter_model.safetensors
    kind: str  # "lora" | "deu" | "lora+deu"
    rank: int
    target_modules: tuple[str, ...]  # targets present in the file, in the layout's order
    size_bytes: int  # size of adapter_model.safetensors
    sha256: str  # hex digest of adapter_model.safetensors
    created: int  # unix seconds

    @property
    def key(self) -> str:
        """The engine's resident-adapter name for this version ("@" cannot occur in a name)."""
        return f"{self.name}@{self.version}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the new entry is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _meta_from_json(
    name: str, version: int, path: Path, meta: Any, targets_known: tuple[str, ...]
) -> AdapterVersion:
    """An AdapterVersion from meta.json content; ValueError if anything is off."""
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        raise ValueError("not a meta.json of a known format")
    targets = meta.get("target_modules")
    fields = {
        "kind": isinstance(meta.get("kind"), str),
        "rank": _is_int(meta.get("rank")) and meta["rank"] >= 0,
        "target_modules": isinstance(targets, list) and all(t in targets_known for t in targets),
        "size_bytes": _is_int(meta.get("size_bytes")),
        "sha256": isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"]),
        "created": _is_int(meta.get("created")),
    }
    bad = [k for k, ok in fields.items() if not ok]
    if bad:
        raise ValueError(f"bad fields {bad}")
    weights = path / WEIGHTS_NAME
    # Only the size is checked: hashing every stored adapter would make startup slow.
    if not weights.is_file() or weights.stat().st_size != meta["size_bytes"]:
        raise ValueError(f"{WEIGHTS_NAME} is missing or not {meta['size_bytes']} bytes")
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{CONFIG_NAME} is missing")
    return AdapterVersion(
        name=name,
        version=version,
        path=path,
        kind=meta["kind"],
        rank=meta["rank"],
        target_modules=tuple(meta["target_modules"]),
        size_bytes=meta["size_bytes"],
        sha256=meta["sha256"],
        created=meta["created"],
    )


class StoreMismatch(Exception):
    """The store directory holds adapters for another base model."""


def _base_record(base: BaseShapes) -> dict[str, Any]:
    """What the store's adapters were validated against: the family and every target's shape."""
    dims = {t: list(d) for t, d in base.dims.items()}
    return {"format": 1, "family": base.layout.family, "n_layer": base.n_layer, "dims": dims}


class AdapterStore:
    """Validated adapters persisted under ``root``, all for one base (recorded in base.json);
    every method is thread-safe."""

    def __init__(
        self, root: Path, base: BaseShapes, max_rank: int, max_bytes: int = 256 << 20
    ) -> None:
        self.root = Path(root)
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: dict[str, dict[int, AdapterVersion]] = {}
        # Highest version ever seen per name, listed or not, so numbers are never reused.
        self._high: dict[str, int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in (_STAGING, _TRASH):
            if (self.root / leftover).exists():
                logger.info("removing leftover %s", self.root / leftover)
                shutil.rmtree(self.root / leftover)
        (self.root / _STAGING).mkdir()
        self._check_base()
        self._scan()

    def _check_base(self) -> None:
        """Refuse a store made for another base: its adapters would not fit this one."""
        path, want = self.root / BASE_NAME, _base_record(self.base)
        if path.is_file():
            try:
                have = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise StoreMismatch(f"{path}: unreadable ({e}); remove it to rebind") from e
            if have != want:
                fam, n = (have.get("family"), have.get("n_layer")) if isinstance(have, dict) else (
                    "?", "?")
                raise StoreMismatch(
                    f"adapter store {self.root} holds adapters for another base model ({fam}, "
                    f"{n} layers; this one is {want['family']}, {want['n_layer']} layers): give "
                    "this model its own store (--adapter-store / HOTLORA_ADAPTER_STORE)"
                )
            return
        tmp = path.with_name(f".{BASE_NAME}.tmp")
        tmp.unlink(missing_ok=True)
        _write_synced(tmp, json.dumps(want, indent=2).encode())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    def _scan(self) -> None:
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name in (_STAGING, _TRASH, BASE_NAME, f".{BASE_NAME}.tmp"):
                continue
            if not name_dir.is_dir() or not _valid_name(name_dir.name):
                logger.warning("ignoring %s: not an adapter name directory", name_dir)
                continue
            for vdir in sorted(name_dir.iterdir()):
                m = _VERSION_DIR.fullmatch(vdir.name)
                if m is None or not vdir.is_dir():
                    logger.warning("ignoring %s: not a version directory", vdir)
                    continue
                version = int(m.group(1))
                if not (vdir / META_NAME).is_file():
                    # meta.json is written before the rename, so this is not a store-made
                    # version; most likely a copy interrupted by a crash.
                    logger.warning("removing %s: no %s", vdir, META_NAME)
                    shutil.rmtree(vdir)
                    continue
                self._high[name_dir.name] = max(self._high.get(name_dir.name, 0), version)
                try:
                    meta = json.loads((vdir / META_NAME).read_text(encoding="utf-8"))
                    targets = self.base.layout.targets
                    v = _meta_from_json(name_dir.name, version, vdir, meta, targets)
                except (OSError, ValueError) as e:
                    # Damage after a completed put is not a crash leftover: keep the files for
                    # inspection, but never serve them (and never reuse the number).
                    logger.error("not listing %s: %s", vdir, e)
                    continue
                self._index.setdefault(name_dir.name, {})[version] = v
        logger.info(
            "adapter store %s: %d names, %d versions",
            self.root,
            len(self._index),
            sum(len(vs) for vs in self._index.values()),
        )

    def put(self, name: str, config: bytes, weights: bytes) -> tuple[AdapterVersion, Adapter]:
        """Validate and store a new version of ``name``.

        Returns the version and the validated adapter, named ``version.key`` as ``load`` would
        name it. Any refusal raises AdapterError and leaves the store exactly as it was.
        """
        check_name(name)
        size = len(config) + len(weights)
        if size > self.max_bytes:
            raise AdapterTooLarge(
                name, f"upload is {size} bytes, over the {self.max_bytes}-byte limit", "size"
            )
        staging = self.root / _STAGING / f"{name}.{os.getpid()}.{secrets.token_hex(8)}"
        staging.mkdir()
        try:
            _write_synced(staging / CONFIG_NAME, config)
            _write_synced(staging / WEIGHTS_NAME, weights)
            # Validation reads the staged files, so what is stored is exactly what was checked.
            adapter = load_adapter(staging, name=name, base=self.base, max_rank=self.max_rank)
            lora = adapter.lora
            present = set() if lora is None else {m.target for m in lora.modules}
            meta = {
                "format": _META_FORMAT,
                "kind": adapter.kind,
                "rank": adapter.rank,
                "target_modules": [t for t in self.base.layout.targets if t in present],
                "size_bytes": len(weights),
                "sha256": hashlib.sha256(weights).hexdigest(),
                "created": int(time.time()),
            }
            # meta.json holds no name or version: those are the path, fixed by the rename, so
            # everything but the rename can happen outside the lock.
            _write_synced(staging / META_NAME, json.dumps(meta, indent=2).encode())
            _fsync_dir(staging)
            staged = _meta_from_json(name, 0, staging, meta, self.base.layout.targets)
            with self._lock:
                version = self._high.get(name, 0) + 1
                name_dir = self.root / name
                name_dir.mkdir(exist_ok=True)
                while (name_dir / f"v{version}").exists():  # someone else's files: never clobber
                    version += 1
                target = name_dir / f"v{version}"
                os.rename(staging, target)
                v = dataclasses.replace(staged, version=version, path=target)
                self._high[name] = version
                self._index.setdefault(name, {})[version] = v
                _fsync_dir(name_dir)
                _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("stored %s (%s, %d bytes, rank %d)", v.key, v.kind, v.size_bytes, v.rank)
        return v, adapter.renamed(v.key)

    def put_dir(self, name: str, src: Path) -> tuple[AdapterVersion, Adapter]:
        """``put`` the adapter_config.json + adapter_model.safetensors of a PEFT directory."""
        check_name(name)
        src = Path(src)
        if not src.is_dir():
            raise AdapterError(name, f"adapter path {str(src)!r} is not a directory", "path")
        config_path, weights_path = src / CONFIG_NAME, src / WEIGHTS_NAME
        if not config_path.is_file():
            raise AdapterError(name, f"{CONFIG_NAME} is missing", CONFIG_NAME)
        if not weights_path.is_file():
            if (src / PICKLE_NAME).exists():
                raise AdapterError(
                    name,
                    f"only {PICKLE_NAME} (a pickle) is present; hotlora stores only "
                    f"safetensors and never unpickles: re-save as {WEIGHTS_NAME}",
                    PICKLE_NAME,
                )
            raise AdapterError(name, f"{WEIGHTS_NAME} is missing", WEIGHTS_NAME)
        try:
            # Checked before reading, so an oversized directory is never pulled into memory.
            size = config_path.stat().st_size + weights_path.stat().st_size
            if size > self.max_bytes:
                raise AdapterTooLarge(
                    name, f"upload is {size} bytes, over the {self.max_bytes}-byte limit", "size"
                )
            config, weights = config_path.read_bytes(), weights_path.read_bytes()
        except OSError as e:
            raise AdapterError(name, f"cannot read {str(src)!r}: {e}", "path") from e
        return self.put(name, config, weights)

    def latest(self, name: str) -> AdapterVersion | None:
        with self._lock:
            versions = self._index.get(name)
            return versions[max(versions)] if versions else None

    def get(self, name: str, version: int) -> AdapterVersion | None:
        with self._lock:
            return self._index.get(name, {}).get(version)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, vs in self._index.items() if vs)

    def latest_all(self) -> list[AdapterVersion]:
        """The latest version of every name, sorted by name."""
        with self._lock:
            return [vs[max(vs)] for _, vs in sorted(self._index.items()) if vs]

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name``, oldest first."""
        with self._lock:
            return [v for _, v in sorted(self._index.get(name, {}).items())]

    def delete(self, name: str) -> list[AdapterVersion]:
        """Remove every version of ``name``; returns what was removed ([] if unknown).

        An invalid name is simply unknown: it is never turned into a path.
        """
        if not _valid_name(name):
            return []
        trash = self.root / _TRASH / f"{name}.{os.getpid()}.{secrets.token_hex(8)}"
        with self._lock:
            removed = [v for _, v in sorted(self._index.pop(name, {}).items())]
            name_dir = self.root / name
            if not name_dir.exists():
                return removed
            trash.parent.mkdir(exist_ok=True)
            # One rename unlists everything at once; a crash during the slow rmtree leaves only
            # trash, which startup removes.
            os.rename(name_dir, trash)
            _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted %s (%d versions)", name, len(removed))
        return removed

    def load(self, v: AdapterVersion) -> Adapter:
        """Read a stored version back (for a cache miss), named ``v.key``."""
        return load_adapter(v.path, name=v.key, base=self.base, max_rank=self.max_rank)
