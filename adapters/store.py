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

import bisect
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.adapter import Adapter, load_adapter
from adapters.errors import AdapterError
from adapters.format import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, BaseShapes

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per store, unchecked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

NAME_RE = r"[A-Za-z0-9._-]{1,64}"
META_NAME = "meta.json"
BASE_NAME = "base.json"  # at the root: the base every stored adapter was validated against
LOCK_NAME = ".lock"  # at the root: every process with the store open holds a shared flock
_NAME = re.compile(NAME_RE)
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,17})")
_STAGING = ".staging"
_TRASH = ".trash"
_OWN_ENTRIES = frozenset({_STAGING, _TRASH, BASE_NAME, f".{BASE_NAME}.tmp", LOCK_NAME})
_META_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RENAME_TRIES = 1000  # version numbers skipped at most when other processes race for them


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


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One stored, validated and immutable upload of an adapter."""

    name: str
    version: int  # 1, 2, 3 ... per name; never reused within a process (see module docstring)
    root: str  # the store's directory (one string shared by all of a store's versions)
    kind: str  # "lora" | "deu" | "lora+deu"
    rank: int
    target_modules: tuple[str, ...]  # targets present in the file, in the layout's order
    size_bytes: int  # size of adapter_model.safetensors
    sha256: str  # hex digest of adapter_model.safetensors
    created: int  # unix seconds

    @property
    def location(self) -> str:
        """The directory holding adapter_config.json + adapter_model.safetensors."""
        return os.path.join(self.root, self.name, f"v{self.version}")

    @property
    def path(self) -> Path:
        """The version's directory as a Path (built on demand: the index keeps none)."""
        return Path(self.location)

    @property
    def key(self) -> str:
        """The engine's resident-adapter name for this version ("@" cannot occur in a name)."""
        return f"{self.name}@{self.version}"


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


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except OSError:
        return False


class _Interned:
    """Shares the target tuples and kind strings that thousands of versions repeat."""

    def __init__(self) -> None:
        self._targets: dict[tuple[str, ...], tuple[str, ...]] = {}

    def targets(self, targets: list[str]) -> tuple[str, ...]:
        t = tuple(sys.intern(x) for x in targets)
        return self._targets.setdefault(t, t)


def _meta_from_json(
    name: str,
    version: int,
    location: str,
    meta: Any,
    targets_known: tuple[str, ...],
    root: str,
    interned: _Interned | None = None,
) -> AdapterVersion:
    """An AdapterVersion of the store at ``root`` from meta.json content, checked against the
    files in ``location``; ValueError if anything is off."""
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
    # Only the size is checked: hashing every stored adapter would make startup slow.
    try:
        st = os.stat(f"{location}/{WEIGHTS_NAME}")
        weights_ok = stat.S_ISREG(st.st_mode) and st.st_size == meta["size_bytes"]
    except OSError:
        weights_ok = False
    if not weights_ok:
        raise ValueError(f"{WEIGHTS_NAME} is missing or not {meta['size_bytes']} bytes")
    if not _is_file(f"{location}/{CONFIG_NAME}"):
        raise ValueError(f"{CONFIG_NAME} is missing")
    interned = interned or _Interned()
    assert isinstance(targets, list)
    return AdapterVersion(
        name=name,
        version=version,
        root=root,
        kind=sys.intern(meta["kind"]),
        rank=meta["rank"],
        target_modules=interned.targets(targets),
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


@dataclass
class _Tree:
    """What a scan of the directory tree found."""

    versions: dict[str, list[AdapterVersion]]  # listed versions per name, oldest first
    high: dict[str, int]  # the highest version number seen per name, listed or not


class AdapterStore:
    """Validated adapters persisted under ``root``, all for one base (recorded in base.json);
    every method is thread-safe (see the module docstring for processes)."""

    def __init__(
        self, root: Path, base: BaseShapes, max_rank: int, max_bytes: int = 256 << 20
    ) -> None:
        self.root = Path(root)
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._root = str(self.root)
        # _disk serializes what changes the tree (renames and their fsyncs); _index guards the
        # in-memory index for microseconds at a time, so readers never wait for a disk.
        self._disk = threading.Lock()
        self._index = threading.Lock()
        # Listed versions per name, oldest first (names with none are absent).
        self._versions: dict[str, list[AdapterVersion]] = {}
        self._sorted: list[str] = []  # the names of _versions, sorted
        # Version numbers seen but not (or no longer) listed, so numbers are never reused: only
        # names whose highest number is above their newest listed version are here.
        self._high: dict[str, int] = {}
        self._generation = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_base()
        self._lock_file = _RootLock.for_root(self.root)
        with self._lock_file.exclusive() as alone:
            for leftover in (_STAGING, _TRASH):
                if alone and (self.root / leftover).exists():
                    logger.info("removing leftover %s", self.root / leftover)
                    shutil.rmtree(self.root / leftover)
            (self.root / _STAGING).mkdir(exist_ok=True)
        self._install(self._scan(repair=True))
        logger.info(
            "adapter store %s: %d names, %d versions",
            self.root,
            len(self._versions),
            sum(len(vs) for vs in self._versions.values()),
        )

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
        tmp = path.with_name(f".{BASE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        _write_synced(tmp, json.dumps(want, indent=2).encode())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    # ------------------------------------------------------------------ reading the tree

    def _scan(self, repair: bool) -> _Tree:
        """Read every name and version directory. With ``repair``, a version directory without
        meta.json (not made by a store: a copy interrupted by a crash) is removed."""
        tree = _Tree({}, {})
        targets, interned, root = self.base.layout.targets, _Interned(), self._root
        with os.scandir(root) as it:
            names = sorted((e.name, e.is_dir()) for e in it if e.name not in _OWN_ENTRIES)
        for name, is_dir in names:
            if name.startswith(f".{BASE_NAME}.") and name.endswith(".tmp"):
                continue  # an interrupted base.json write
            if not is_dir or not _valid_name(name):
                logger.warning("ignoring %s: not an adapter name directory", f"{root}/{name}")
                continue
            name_dir = os.path.join(root, name)
            try:
                with os.scandir(name_dir) as it:
                    vdirs = sorted((e.name, e.is_dir()) for e in it)
            except OSError as e:
                logger.error("not listing %s: %s", name_dir, e)
                continue
            listed: list[AdapterVersion] = []
            for vname, vis_dir in vdirs:
                m = _VERSION_DIR.fullmatch(vname)
                vdir = os.path.join(name_dir, vname)
                if m is None or not vis_dir:
                    logger.warning("ignoring %s: not a version directory", vdir)
                    continue
                version = int(m.group(1))
                try:
                    with open(os.path.join(vdir, META_NAME), "rb") as f:
                        raw = f.read()
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    # meta.json is written before the rename, so this is not a store-made
                    # version; most likely a copy interrupted by a crash.
                    if repair:
                        logger.warning("removing %s: no %s", vdir, META_NAME)
                        shutil.rmtree(vdir, ignore_errors=True)
                    continue
                except OSError as e:
                    tree.high[name] = max(tree.high.get(name, 0), version)
                    logger.error("not listing %s: %s", vdir, e)
                    continue
                tree.high[name] = max(tree.high.get(name, 0), version)
                try:
                    meta = json.loads(raw)
                    v = _meta_from_json(name, version, vdir, meta, targets, root, interned)
                except ValueError as e:
                    # Damage after a completed put is not a crash leftover: keep the files for
                    # inspection, but never serve them (and never reuse the number).
                    logger.error("not listing %s: %s", vdir, e)
                    continue
                listed.append(v)
            if listed:
                listed.sort(key=lambda v: v.version)
                tree.versions[name] = listed
        return tree

    def _install(self, tree: _Tree) -> None:
        """Make a scan the index, keeping every version number this process has seen."""
        high = dict(self._high)
        for name, vs in self._versions.items():
            high[name] = max(high.get(name, 0), vs[-1].version)
        for name, h in tree.high.items():
            high[name] = max(high.get(name, 0), h)
        with self._index:
            self._versions = tree.versions
            self._sorted = sorted(tree.versions)
            self._high = {
                n: h for n, h in high.items()
                if n not in tree.versions or tree.versions[n][-1].version < h
            }
            self._generation += 1

    def refresh(self) -> None:
        """Rescan the tree: see what other processes uploaded or deleted since this one opened
        the store. Uploads and deletes of this process wait for it; lookups do not."""
        with self._disk:
            self._install(self._scan(repair=False))

    # ------------------------------------------------------------------ writing

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
        staging = os.path.join(
            self._root, _STAGING, f"{name}.{os.getpid()}.{secrets.token_hex(8)}"
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
            _write_synced(os.path.join(staging, META_NAME), json.dumps(meta, indent=2).encode())
            _fsync_dir(staging)
            staged = _meta_from_json(
                name, 0, staging, meta, self.base.layout.targets, self._root
            )
            v = self._publish(staged, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("stored %s (%s, %d bytes, rank %d)", v.key, v.kind, v.size_bytes, v.rank)
        return v, adapter.renamed(v.key)

    def _publish(self, staged: AdapterVersion, staging: str) -> AdapterVersion:
        """Rename a staged version into place under the next free number, durably, and list it."""
        name = staged.name
        with self._disk:
            listed = self._versions.get(name)
            version = max(self._high.get(name, 0), listed[-1].version if listed else 0) + 1
            name_dir = os.path.join(self._root, name)
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
            with self._index:
                versions = self._versions.get(name)
                if versions is None:
                    self._versions[name] = [v]
                    bisect.insort(self._sorted, name)
                else:
                    versions.append(v)
                if self._high.get(name, 0) <= version:
                    self._high.pop(name, None)
                self._generation += 1
        return v

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

    def delete(self, name: str) -> list[AdapterVersion]:
        """Remove every version of ``name``; returns what was removed ([] if unknown).

        An invalid name is simply unknown: it is never turned into a path.
        """
        if not _valid_name(name):
            return []
        trash = os.path.join(self._root, _TRASH, f"{name}.{os.getpid()}.{secrets.token_hex(8)}")
        with self._disk:
            with self._index:
                removed = self._versions.pop(name, [])
                if removed:
                    del self._sorted[bisect.bisect_left(self._sorted, name)]
                    self._high[name] = max(self._high.get(name, 0), removed[-1].version)
                    self._generation += 1
            name_dir = os.path.join(self._root, name)
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
        with self._index:
            versions = self._versions.get(name)
            return versions[-1] if versions else None

    def get(self, name: str, version: int) -> AdapterVersion | None:
        with self._index:
            versions = self._versions.get(name)
            if not versions:
                return None
            i = bisect.bisect_left(versions, version, key=lambda v: v.version)
            return versions[i] if i < len(versions) and versions[i].version == version else None

    def names(self) -> list[str]:
        """Every name with a listed version, sorted."""
        with self._index:
            return list(self._sorted)

    def count(self) -> int:
        """How many names have a listed version (O(1); a store is never falsy, even empty)."""
        return len(self._sorted)

    @property
    def generation(self) -> int:
        """Grows with every change of the index: a listing rendered at one generation is
        current while it has not changed."""
        return self._generation

    def latest_all(self) -> list[AdapterVersion]:
        """The latest version of every name, sorted by name."""
        with self._index:
            versions = self._versions
            return [versions[n][-1] for n in self._sorted]

    def page(
        self, after: str | None = None, limit: int | None = None
    ) -> tuple[list[AdapterVersion], bool]:
        """The latest version of up to ``limit`` names sorted after ``after`` (None: from the
        first), by name, and whether more follow. ``after`` need not be a stored name (e.g. one
        deleted since the previous page): the page starts where it would sort."""
        with self._index:
            names = self._sorted
            i = 0 if after is None else bisect.bisect_right(names, after)
            j = len(names) if limit is None else min(len(names), i + max(limit, 0))
            return [self._versions[n][-1] for n in names[i:j]], j < len(names)

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name``, oldest first."""
        with self._index:
            return list(self._versions.get(name, ()))

    def load(self, v: AdapterVersion) -> Adapter:
        """Read a stored version back (for a cache miss), named ``v.key``: one read of its
        files and every validation of an upload but the hash. Thread-safe and free of store
        locks, so an engine can prefetch on any thread (or call ``load_adapter(v.path, ...)``
        in another process: it is the same function)."""
        return load_adapter(v.location, name=v.key, base=self.base, max_rank=self.max_rank)
