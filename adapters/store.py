"""The persistent adapter store: name -> immutable, numbered versions on local disk.

Layout: ``root/<name>/v<k>/{adapter_config.json, adapter_model.safetensors, meta.json}``, beside
``root/base.json`` (the base every stored adapter was validated against) and ``root/.lock``.

Crash safety. A version becomes visible only by one ``os.rename`` of a fully written, fsynced
and validated staging directory, and ``put`` returns only once that rename is durable, so a crash
at any point leaves either the whole version or nothing that gets listed, and never loses an
acknowledged upload. ``root/.staging`` and ``root/.trash`` hold in-flight uploads and deletes;
both are emptied at start-up (when no other process has the store open).

The directory tree is the only record: no index file can disagree with it. Start-up reads it
once (a directory listing per name, then per version its meta.json and two stats: well under a
second for 10,000 adapters), into a compact in-memory index (~0.6 KB per version) that keeps the
names sorted, so a lookup is O(1) and a page of the listing O(log n + page).

Concurrency. Every method is thread-safe. Uploads validate and write in parallel; only the
rename and its fsyncs are serialized, and readers (lookups, listings) never wait for a disk.
Several processes may open one root: each holds a shared flock on ``root/.lock``, so start-up
cleans leftovers only when it is alone; puts never collide (a version number another process
took is skipped, never overwritten); a delete removes a name's directory, for every process.
A process's index holds what it found at open plus its own changes: it sees another process's
uploads and deletes after ``refresh()`` (or a restart).

Version numbers only grow while a process lives, even across a delete and re-upload of a name,
because ``name@version`` is the engine's resident-adapter key and a reused key could serve a
deleted version's weights from a cache. After a restart (when no cache survives) the numbering
of a fully deleted name starts again at 1.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from hotlora.adapters.adapter import Adapter, load_adapter
from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, BaseShapes
from hotlora.adapters.quota import Quota, QuotaExceeded, check_quota
from hotlora.adapters.store_index import StoreIndex, Usage
from hotlora.adapters.store_tree import (
    META_FORMAT,
    META_NAME,
    meta_from_json,
    read_name,
    scan,
    top_version,
)
from hotlora.adapters.version import (
    BASE_NAME,
    NAME_RE,
    AdapterVersion,
    check_name,
    check_qualified,
    disk_name,
    split_name,
    valid_qualified,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per store, unchecked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "NAME_RE", "AdapterStore", "AdapterTooLarge", "AdapterVersion", "QuotaExceeded", "Quota",
    "StoreMismatch", "check_name", "check_qualified",
]  # fmt: skip

LOCK_NAME = ".lock"  # at the root: every process with the store open holds a shared flock
_STAGING = ".staging"
_TRASH = ".trash"
_OWN_ENTRIES = frozenset({_STAGING, _TRASH, BASE_NAME, f".{BASE_NAME}.tmp", LOCK_NAME})
_RENAME_TRIES = 1000  # version numbers skipped at most when other processes race for them


class AdapterTooLarge(AdapterError):
    """An upload is over the store's byte limit (a separate type so a server can answer 413)."""


def _fsync_dir(path: str | Path) -> None:
    # A rename is durable only once the directory holding the new entry is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str | Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _mkdir(path: str) -> bool:
    """Create a directory; True if this call created it."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    return True


class StoreMismatch(Exception):
    """The store directory holds adapters for another base model (or its base.json is
    unreadable); the message, one line, says what to do."""


def _base_record(base: BaseShapes) -> dict[str, Any]:
    """What the store's adapters were validated against: the family and every target's shape."""
    dims = {t: list(d) for t, d in base.dims.items()}
    return {"format": 1, "family": base.layout.family, "n_layer": base.n_layer, "dims": dims}


class _RootLock:
    """This process's shared flock on ``root/.lock``, held while any of its stores is open.

    One per root and process (flock locks belong to an open file description, so two of them
    in one process would exclude each other); it is released when its last store is collected
    or the process ends, crash included.
    """

    _registry: dict[str, weakref.ref[_RootLock]] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._mutex = threading.Lock()
        self.enabled = fcntl is not None
        if self.enabled:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH)
            except OSError as e:  # e.g. a network filesystem without locks
                logger.warning("%s: no file locks (%s): assuming one process per store", path, e)
                self.enabled = False

    @classmethod
    def for_root(cls, root: Path) -> _RootLock:
        key = os.path.realpath(root)
        with cls._registry_lock:
            ref = cls._registry.get(key)
            lock = ref() if ref is not None else None
            if lock is None:
                lock = cls(os.path.join(key, LOCK_NAME))
                cls._registry[key] = weakref.ref(lock)
            return lock

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Yields True, holding the lock exclusively, when no other process has the store
        open; False otherwise. The shared lock is held again afterwards."""
        if not self.enabled:
            yield True
            return
        with self._mutex:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            try:
                yield alone
            finally:
                # A conversion may drop the lock for a moment (flock(2)); this blocks until
                # another process's start-up cleanup, if one slipped in, is done.
                fcntl.flock(self.fd, fcntl.LOCK_SH)

    def __del__(self) -> None:
        with suppress(OSError, AttributeError):
            os.close(self.fd)


class AdapterStore:
    """Validated adapters persisted under ``root``, all for one base (recorded in base.json);
    every method is thread-safe (see the module docstring for processes)."""

    def __init__(
        self,
        root: Path,
        base: BaseShapes,
        max_rank: int,
        max_bytes: int = 256 << 20,
        shared: bool = False,
    ) -> None:
        self.root = Path(root)
        # shared: other servers write this root too; resolve names with latest_fresh.
        self.shared = shared
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._root = str(self.root)
        # _disk serializes what changes the tree (renames and their fsyncs); the index has its
        # own lock, held for microseconds, so readers never wait for a disk.
        self._disk = threading.Lock()
        self._index = StoreIndex()
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_base()
        self._lock_file = _RootLock.for_root(self.root)
        with self._lock_file.exclusive() as alone:
            for leftover in (_STAGING, _TRASH):
                if alone and (self.root / leftover).exists():
                    logger.info("removing leftover %s", self.root / leftover)
                    shutil.rmtree(self.root / leftover)
            (self.root / _STAGING).mkdir(exist_ok=True)
        tree = scan(self._root, self.base.layout.targets, _OWN_ENTRIES, repair=True)
        self._index.install(tree.versions, tree.high)
        logger.info(
            "adapter store %s: %d names, %d versions",
            self.root,
            len(tree.versions),
            sum(len(vs) for vs in tree.versions.values()),
        )

    def _check_base(self) -> None:
        """Refuse a store made for another base: its adapters would not fit this one."""
        path, want = self.root / BASE_NAME, _base_record(self.base)
        if path.is_file():
            try:
                have = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise StoreMismatch(
                    f"{path}: unreadable ({e}); remove it to bind the store to this model"
                ) from e
            if have != want:
                fam, n = (have.get("family"), have.get("n_layer")) if isinstance(have, dict) else (
                    "?", "?")
                raise StoreMismatch(
                    f"adapter store {self.root} holds adapters for another base model ({fam}, "
                    f"{n} layers; this one is {want['family']}, {want['n_layer']} layers); give "
                    "this model its own store (--adapter-store / HOTLORA_ADAPTER_STORE)"
                )
            return
        tmp = path.with_name(f".{BASE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        _write_synced(tmp, json.dumps(want, indent=2).encode())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    def refresh(self) -> None:
        """Rescan the tree: see what other processes uploaded or deleted since this one opened
        the store. Uploads and deletes of this process wait for it; lookups do not."""
        with self._disk:
            tree = scan(self._root, self.base.layout.targets, _OWN_ENTRIES, repair=False)
            self._index.install(tree.versions, tree.high)

    # ------------------------------------------------------------------ writing

    def put(
        self, name: str, config: bytes, weights: bytes, quota: Quota | None = None
    ) -> tuple[AdapterVersion, Adapter]:
        """Validate and store a new version of ``name`` (qualified: ``tenant/name`` for a
        tenant's adapter), within its namespace's ``quota``.

        Returns the version and the validated adapter, named ``version.key`` as ``load`` would
        name it. Any refusal raises AdapterError and leaves the store exactly as it was.
        """
        check_qualified(name)
        size = len(config) + len(weights)
        if size > self.max_bytes:
            raise AdapterTooLarge(
                name, f"upload is {size} bytes, over the {self.max_bytes}-byte limit", "size"
            )
        if quota is not None:  # early, so a refused upload is not even written; again below
            self._check_quota(name, len(weights), quota)
        staging = os.path.join(
            self._root, _STAGING, f"{disk_name(name)}.{os.getpid()}.{secrets.token_hex(8)}"
        )
        os.mkdir(staging)
        try:
            _write_synced(os.path.join(staging, CONFIG_NAME), config)
            _write_synced(os.path.join(staging, WEIGHTS_NAME), weights)
            # Validation reads the staged files, so what is stored is exactly what was checked.
            adapter = load_adapter(staging, name=name, base=self.base, max_rank=self.max_rank)
            lora = adapter.lora
            present = set() if lora is None else {m.target for m in lora.modules}
            meta = {
                "format": META_FORMAT,
                "kind": adapter.kind,
                "rank": adapter.rank,
                "target_modules": [t for t in self.base.layout.targets if t in present],
                "size_bytes": len(weights),
                "sha256": hashlib.sha256(weights).hexdigest(),
                "created": int(time.time()),
            }
            # meta.json holds no name or version: those are the path, fixed by the rename, so
            # everything but the rename can happen outside the lock.
            _write_synced(os.path.join(staging, META_NAME), json.dumps(meta, indent=2).encode())
            _fsync_dir(staging)
            staged = meta_from_json(
                name, 0, staging, meta, self.base.layout.targets, self._root
            )
            v = self._publish(staged, staging, quota)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("stored %s (%s, %d bytes, rank %d)", v.key, v.kind, v.size_bytes, v.rank)
        return v, adapter.renamed(v.key)

    def _check_quota(self, name: str, size: int, quota: Quota) -> None:
        usage = self._index.usage(split_name(name)[0])
        check_quota(name, size, quota, usage, self._index.latest(name) is None)

    def _publish(self, staged: AdapterVersion, staging: str, quota: Quota | None) -> AdapterVersion:
        """Rename a staged version into place under the next free number, durably, and list it
        (the quota is checked under the same lock, so racing uploads cannot both pass it)."""
        name = staged.name
        with self._disk:
            if quota is not None:
                self._check_quota(name, staged.size_bytes, quota)
            version = self._index.next_version(name)
            name_dir = os.path.join(self._root, disk_name(name))
            _mkdir(name_dir)
            for _ in range(_RENAME_TRIES):
                target = os.path.join(name_dir, f"v{version}")
                if os.path.lexists(target):  # someone else's files: never clobber
                    version += 1
                    continue
                try:
                    os.rename(staging, target)
                    break
                except FileNotFoundError:
                    if not os.path.isdir(staging):
                        raise
                    _mkdir(name_dir)  # another process deleted the name meanwhile
                except OSError as e:
                    # Another process took this number between the check and the rename.
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                        raise
                    version += 1
            else:
                raise OSError(f"no free version number for {name!r} after {_RENAME_TRIES} tries")
            # Both, always: the name directory's own entry may be new, or made by a process
            # that died before syncing it.
            _fsync_dir(name_dir)
            _fsync_dir(self._root)
            v = dataclasses.replace(staged, version=version)  # its location is now target
            self._index.add(v)
        return v

    def put_dir(
        self, name: str, src: Path, quota: Quota | None = None
    ) -> tuple[AdapterVersion, Adapter]:
        """``put`` the adapter_config.json + adapter_model.safetensors of a PEFT directory."""
        check_qualified(name)
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
        return self.put(name, config, weights, quota)

    def delete(self, name: str) -> list[AdapterVersion]:
        """Remove every version of ``name``; returns what was removed ([] if unknown).

        An invalid name is simply unknown: it is never turned into a path.
        """
        if not valid_qualified(name):
            return []
        disk = disk_name(name)
        trash = os.path.join(self._root, _TRASH, f"{disk}.{os.getpid()}.{secrets.token_hex(8)}")
        with self._disk:
            removed = self._index.remove(name)
            name_dir = os.path.join(self._root, disk)
            if not os.path.lexists(name_dir):
                return removed
            os.makedirs(os.path.dirname(trash), exist_ok=True)
            # One rename unlists everything at once; a crash during the slow rmtree leaves only
            # trash, which startup removes.
            os.rename(name_dir, trash)
            _fsync_dir(self._root)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted %s (%d versions)", name, len(removed))
        return removed

    # ------------------------------------------------------------------ reading the index

    def latest(self, name: str) -> AdapterVersion | None:
        return self._index.latest(name)

    def latest_fresh(self, name: str) -> AdapterVersion | None:
        """``latest(name)`` as the disk has it now, for a root that other processes write
        (``shared``): sees their uploads and deletes of ``name`` at once. One listdir of the
        name's directory; only when it disagrees with the index are the name's meta.json files
        read (under the write lock, so this process's own puts and deletes are never undone)."""
        if not valid_qualified(name):
            return None
        have = self._index.latest(name)
        top = top_version(self._root, name)
        if top is not None and have is not None and have.version == top:
            return have
        if top is None and have is None:
            return None
        with self._disk:
            self._sync_name(name)
            return self._index.latest(name)

    def _sync_name(self, name: str) -> None:
        """Replace the index's versions of ``name`` with the disk's (holding ``_disk``)."""
        listed, _ = read_name(self._root, name, self.base.layout.targets)
        current = self._index.versions(name)
        if [(v.version, v.sha256) for v in current] == [(v.version, v.sha256) for v in listed]:
            return
        self._index.remove(name)
        for v in listed:
            self._index.add(v)

    def get(self, name: str, version: int) -> AdapterVersion | None:
        return self._index.get(name, version)

    def names(self) -> list[str]:
        """Every qualified name with a listed version, sorted."""
        return self._index.names()

    def count(self) -> int:
        """How many names have a listed version (O(1); a store is never falsy, even empty)."""
        return self._index.count()

    def latest_all(self) -> list[AdapterVersion]:
        """The latest version of every name, sorted by qualified name."""
        return self._index.page(None, None)[0]

    def usage(self, tenant: str | None) -> Usage:
        """What a namespace holds (None: the shared one), for quotas."""
        return self._index.usage(tenant)

    @property
    def generation(self) -> int:
        """Grows with every change of the index: a listing rendered at one generation is
        current while it has not changed."""
        return self._index.generation

    def page(
        self, after: str | None = None, limit: int | None = None
    ) -> tuple[list[AdapterVersion], bool]:
        """The latest version of up to ``limit`` names sorted after ``after`` (None: from the
        first), by qualified name, and whether more follow. ``after`` need not be a stored name
        (e.g. one deleted since the previous page): the page starts where it would sort."""
        return self._index.page(after, limit)

    def view_page(
        self,
        namespaces: tuple[str | None, ...],
        after: str | None = None,
        limit: int | None = None,
    ) -> tuple[list[AdapterVersion], bool]:
        """``page`` over what sees only ``namespaces``, by short name, an earlier namespace's
        adapter hiding a later one's of the same name."""
        return self._index.view_page(namespaces, after, limit)

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name``, oldest first."""
        return self._index.versions(name)

    def load(self, v: AdapterVersion) -> Adapter:
        """Read a stored version back (for a cache miss), named ``v.key``: one read of its
        files and every validation of an upload but the hash. Thread-safe and free of store
        locks, so an engine can prefetch on any thread (or call ``load_adapter(v.path, ...)``
        in another process: it is the same function)."""
        return load_adapter(v.location, name=v.key, base=self.base, max_rank=self.max_rank)
