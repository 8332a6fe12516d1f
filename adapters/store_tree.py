"""Reading the adapter store's directory tree: every name and version directory, each
version's meta.json checked against its files. Shared by start-up, ``refresh`` and the
per-name re-read a shared store does at request time."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from typing import Any

from hotlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from hotlora.adapters.version import (
    BASE_NAME,
    AdapterVersion,
    disk_name,
    from_disk_name,
    valid_qualified,
)

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
META_FORMAT = 1
VERSION_DIR = re.compile(r"v([1-9][0-9]{0,17})")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except OSError:
        return False


class Interned:
    """Shares the target tuples and kind strings that thousands of versions repeat."""

    def __init__(self) -> None:
        self._targets: dict[tuple[str, ...], tuple[str, ...]] = {}

    def targets(self, targets: list[str]) -> tuple[str, ...]:
        t = tuple(sys.intern(x) for x in targets)
        return self._targets.setdefault(t, t)


def meta_from_json(
    name: str,
    version: int,
    location: str,
    meta: Any,
    targets_known: tuple[str, ...],
    root: str,
    interned: Interned | None = None,
) -> AdapterVersion:
    """An AdapterVersion of the store at ``root`` from meta.json content, checked against the
    files in ``location``; ValueError if anything is off."""
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
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
    interned = interned or Interned()
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


@dataclass
class Tree:
    """What a scan of the directory tree found."""

    versions: dict[str, list[AdapterVersion]]  # listed versions per name, oldest first
    high: dict[str, int]  # the highest version number seen per name, listed or not


def scan(root: str, targets: tuple[str, ...], skip: frozenset[str], repair: bool) -> Tree:
    """Read every name and version directory under ``root`` but ``skip``. With ``repair``, a
    version directory without meta.json (not made by a store: a copy interrupted by a crash)
    is removed."""
    tree = Tree({}, {})
    interned = Interned()
    with os.scandir(root) as it:
        entries = sorted((e.name, e.is_dir()) for e in it if e.name not in skip)
    for entry, is_dir in entries:
        if entry.startswith(f".{BASE_NAME}.") and entry.endswith(".tmp"):
            continue  # an interrupted base.json write
        name = from_disk_name(entry)
        if not is_dir or not valid_qualified(name) or disk_name(name) != entry:
            logger.warning("ignoring %s: not an adapter name directory", f"{root}/{entry}")
            continue
        listed, high = read_name(root, name, targets, repair, interned)
        if high:
            tree.high[name] = high
        if listed:
            tree.versions[name] = listed
    return tree


def read_name(
    root: str,
    name: str,
    targets: tuple[str, ...],
    repair: bool = False,
    interned: Interned | None = None,
) -> tuple[list[AdapterVersion], int]:
    """The listed versions of ``name`` (oldest first) and the highest version number seen."""
    name_dir = os.path.join(root, disk_name(name))
    try:
        with os.scandir(name_dir) as it:
            vdirs = sorted((e.name, e.is_dir()) for e in it)
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        logger.error("not listing %s: %s", name_dir, e)
        return [], 0
    listed: list[AdapterVersion] = []
    high = 0
    for vname, vis_dir in vdirs:
        m = VERSION_DIR.fullmatch(vname)
        vdir = os.path.join(name_dir, vname)
        if m is None or not vis_dir:
            logger.warning("ignoring %s: not a version directory", vdir)
            continue
        version = int(m.group(1))
        try:
            with open(os.path.join(vdir, META_NAME), "rb") as f:
                raw = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # meta.json is written before the rename, so this is not a store-made version;
            # most likely a copy interrupted by a crash.
            if repair:
                logger.warning("removing %s: no %s", vdir, META_NAME)
                shutil.rmtree(vdir, ignore_errors=True)
            continue
        except OSError as e:
            high = max(high, version)
            logger.error("not listing %s: %s", vdir, e)
            continue
        high = max(high, version)
        try:
            v = meta_from_json(name, version, vdir, json.loads(raw), targets, root, interned)
        except ValueError as e:
            # Damage after a completed put is not a crash leftover: keep the files for
            # inspection, but never serve them (and never reuse the number).
            logger.error("not listing %s: %s", vdir, e)
            continue
        listed.append(v)
    listed.sort(key=lambda v: v.version)
    return listed, high


def top_version(root: str, name: str) -> int | None:
    """The highest version directory of ``name`` on disk (None: no such name)."""
    try:
        entries = os.listdir(os.path.join(root, disk_name(name)))
    except OSError:
        return None
    numbers = [int(m.group(1)) for e in entries if (m := VERSION_DIR.fullmatch(e))]
    return max(numbers, default=None)
