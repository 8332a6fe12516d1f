"""AdapterStore at scale: the in-memory index (lookups, sorted pages, generations), crash
safety at every step of a put and a delete (simulated, and a real SIGKILL), and concurrent
writers: threads of one process, two store objects (two processes' views), two processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save

import hotlora.adapters.store as store_mod
from hotlora.adapters.format import WEIGHTS_NAME
from hotlora.adapters.store import AdapterStore, AdapterVersion
from tests.adapters.conftest import BASE, valid_config, valid_tensors

REPO = Path(__file__).resolve().parents[2]
CONFIG = json.dumps(valid_config()).encode()
WEIGHTS = save(valid_tensors(), metadata={"format": "pt"})


def open_store(root: Path) -> AdapterStore:
    return AdapterStore(root, BASE, max_rank=8, max_bytes=1 << 20)


def put(store: AdapterStore, name: str) -> AdapterVersion:
    return store.put(name, CONFIG, WEIGHTS)[0]


def snapshot(store: AdapterStore) -> dict[str, Any]:
    """Everything the index answers, to compare two stores' views."""
    walked, after = [], None
    while True:
        page, more = store.page(after, 7)
        walked += page
        if not more:
            break
        after = page[-1].name
    return {
        "names": store.names(),
        "latest": store.latest_all(),
        "versions": {n: store.versions(n) for n in store.names()},
        "walk": walked,
        "len": store.count(),
    }


def staging_of(root: Path) -> list[Path]:
    return sorted((root / ".staging").iterdir()) if (root / ".staging").exists() else []


# ---------------------------------------------------------------------------- the index


def test_pages_walk_every_name_once_in_order(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    names = [f"n{i:02d}" for i in range(23)]
    for name in reversed(names):
        put(store, name)
    put(store, "n05")  # a second version: still one entry, the newest
    full, more = store.page()
    assert [v.name for v in full] == names and not more
    assert store.latest_all() == full and store.names() == names and store.count() == 23
    assert full[5].version == 2
    seen: list[str] = []
    after = None
    while True:
        page, more = store.page(after, 5)
        seen += [v.name for v in page]
        if not more:
            break
        after = page[-1].name
    assert seen == names
    assert store.page(None, 0) == ([], True)
    assert store.page("n22", 5) == ([], False)
    assert [v.name for v in store.page("a", 2)[0]] == ["n00", "n01"]  # sorts before all
    # A cursor whose item was deleted still marks its place.
    store.delete("n10")
    page, _ = store.page("n10", 2)
    assert [v.name for v in page] == ["n11", "n12"]


def test_lookups(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    v1, v2, v3 = put(store, "a"), put(store, "a"), put(store, "a")
    assert store.latest("a") == v3 and store.get("a", 2) == v2 and store.get("a", 1) == v1
    assert store.get("a", 4) is None and store.get("a", 0) is None and store.get("b", 1) is None
    assert store.versions("a") == [v1, v2, v3]
    assert store.versions("a") is not store.versions("a")  # a copy: callers cannot corrupt it


def test_generation_moves_with_every_change_and_only_then(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    g0 = store.generation
    put(store, "a")
    g1 = store.generation
    store.latest_all(), store.page(None, 3), store.names()
    assert g1 > g0 and store.generation == g1
    with pytest.raises(Exception):  # noqa: B017 - a refusal is no change
        store.put("a", b"{", WEIGHTS)
    assert store.generation == g1
    store.delete("a")
    assert store.generation > g1
    g2 = store.generation
    assert store.delete("a") == [] and store.generation == g2


def test_versions_pickle_and_are_small(tmp_path: Path) -> None:
    """A version crosses to the engine process by pickle; the index stays compact."""
    store = open_store(tmp_path / "s")
    v = put(store, "a")
    again = pickle.loads(pickle.dumps(v))
    assert again == v and again.path == v.path == store.root / "a" / "v1" and again.key == "a@1"
    for i in range(1, 400):
        src, dst = v.path, store.root / f"n{i:03d}" / "v1"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            os.link(f, dst / f.name)
    tracemalloc.start()
    big = open_store(store.root)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert big.count() == 400
    assert used / 400 < 1500, f"{used / 400:.0f} bytes per version"  # ~600 measured
    # Versions of one store share their target tuples.
    assert len({id(x.target_modules) for x in big.latest_all()}) == 1


def test_lookups_never_wait_for_an_upload_s_disk(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "s")
    put(store, "a")
    in_fsync, release = threading.Event(), threading.Event()
    real = store_mod._fsync_dir

    def slow_fsync(path: str | Path) -> None:
        if str(path).endswith("/b"):  # the name directory of the put below
            in_fsync.set()
            release.wait(10)
        real(path)

    monkeypatch.setattr(store_mod, "_fsync_dir", slow_fsync)
    t = threading.Thread(target=put, args=(store, "b"))
    t.start()
    try:
        assert in_fsync.wait(10)
        t0 = time.perf_counter()
        assert store.latest("a") is not None and store.latest("b") is None
        assert [v.name for v in store.latest_all()] == ["a"]
        assert time.perf_counter() - t0 < 1.0
    finally:
        release.set()
        t.join()
    assert store.latest("b") is not None  # listed once durable


# ---------------------------------------------------------------------------- crash safety


class Crash(BaseException):
    """The process dies here: nothing after it runs, no cleanup either."""


class CrashAt:
    """Counts the steps of a put or delete that touch the disk; dies at step `at`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
        self.at, self.steps, self.crashed = at, 0, False
        mp = monkeypatch
        for name in ("_write_synced", "_fsync_dir", "_mkdir"):
            mp.setattr(store_mod, name, self._wrap(getattr(store_mod, name)))
        real_rename, real_makedirs = os.rename, os.makedirs
        mp.setattr(store_mod.os, "rename", self._wrap(real_rename))
        mp.setattr(store_mod.os, "makedirs", self._wrap(real_makedirs))
        real_rmtree = store_mod.shutil.rmtree

        def rmtree(*a: Any, **k: Any) -> None:
            if not self.crashed:  # a dead process cleans nothing up
                self._step()
                real_rmtree(*a, **k)

        mp.setattr(store_mod.shutil, "rmtree", rmtree)

    def _step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.crashed = True
            raise Crash(f"step {self.at}")

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            self._step()  # before the step: it did not happen
            out = fn(*a, **k)
            self._step()  # after it: it did
            return out

        return wrapped


def _crash_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                action: Callable[[AdapterStore], Any],
                check: Callable[[AdapterStore, AdapterVersion, bool], None]) -> int:
    """Run `action` on a store holding one acknowledged upload, dying at step 1, 2, ... until
    it completes; after each death reopen the store (as a restart would) and `check` it."""
    at = 1
    while True:
        root = tmp_path / f"crash-{at}"
        acked = put(open_store(root), "a")
        store = open_store(root)
        with monkeypatch.context() as mp:
            crash = CrashAt(mp, at)
            try:
                action(store)
                finished = True
            except Crash:
                finished = False
        reopened = open_store(root)
        assert staging_of(root) == [] and not (root / ".trash").exists(), f"step {at}"
        check(reopened, acked, finished)
        if finished:
            return crash.steps
        at += 1


def test_a_crash_at_any_step_of_a_put_loses_nothing_acknowledged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def check(store: AdapterStore, acked: AdapterVersion, finished: bool) -> None:
        versions = store.versions("a")
        assert versions[0] == acked and len(versions) in (1, 2)
        if finished:
            assert len(versions) == 2
        for v in versions:  # whatever is listed is whole and loads
            assert (v.path / WEIGHTS_NAME).read_bytes() == WEIGHTS
            store.load(v)
        assert put(store, "a").version == versions[-1].version + 1

    steps = _crash_runs(monkeypatch, tmp_path, lambda s: put(s, "a"), check)
    assert steps >= 12  # every write, fsync, mkdir and the rename was a crash point


def test_a_crash_at_any_step_of_a_delete_is_all_or_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def check(store: AdapterStore, acked: AdapterVersion, finished: bool) -> None:
        assert store.versions("a") in ([acked], [])
        if finished:
            assert store.versions("a") == []
        if store.versions("a"):
            store.load(acked)

    _crash_runs(monkeypatch, tmp_path, lambda s: s.delete("a"), check)


_CHILD_PUTS = """
import sys, json
from pathlib import Path
from hotlora.adapters.store import AdapterStore
from tests.adapters.conftest import BASE
from tests.adapters.test_store_index import CONFIG, WEIGHTS
store = AdapterStore(Path(sys.argv[1]), BASE, max_rank=8, max_bytes=1 << 20)
print("open", flush=True)
for i in range(int(sys.argv[3])):
    v, _ = store.put(sys.argv[2], CONFIG, WEIGHTS)
    print(json.dumps([v.name, v.version]), flush=True)
"""


def _child(root: Path, name: str, puts: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_PUTS, str(root), name, str(puts)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigkill_mid_upload_loses_no_acknowledged_upload(tmp_path: Path) -> None:
    root = tmp_path / "s"
    open_store(root)
    child = _child(root, "a", 100_000)
    assert child.stdout is not None
    acked: list[tuple[str, int]] = []
    try:
        first = child.stdout.readline().strip()
        assert first == "open", child.stderr.read() if child.stderr else ""
        while len(acked) < 5:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            acked.append(tuple(json.loads(line)))
        time.sleep(0.003)  # somewhere inside a later put
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    store = open_store(root)
    listed = {(v.name, v.version) for v in store.versions("a")}
    assert set(acked) <= listed
    for v in store.versions("a"):
        assert v.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
        store.load(v)
    assert staging_of(root) == []


# ---------------------------------------------------------------------------- concurrency


def test_threads_uploading_and_deleting_keep_index_and_disk_in_step(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    returned: list[AdapterVersion] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def uploader(name: str, n: int) -> None:
        try:
            for _ in range(n):
                returned.append(put(store, name))
        except BaseException as e:  # surfaced below
            errors.append(e)

    def deleter(name: str) -> None:
        try:
            while not stop.is_set():
                store.delete(name)
                time.sleep(0.001)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=uploader, args=(n, 8))
               for n in ("x", "x", "y", "z")]
    deleters = [threading.Thread(target=deleter, args=("x",))]
    for t in threads + deleters:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in deleters:
        t.join()
    assert errors == []
    # Numbers are never reused within the process, deletes or not.
    for name in ("x", "y", "z"):
        numbers = [v.version for v in returned if v.name == name]
        assert len(numbers) == len(set(numbers))
    assert [v.version for v in store.versions("y")] == list(range(1, 9))
    assert staging_of(store.root) == []
    assert snapshot(open_store(store.root)) == snapshot(store)  # the disk says the same


def test_two_stores_on_one_root_never_clobber_and_refresh_sees_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two store objects on one root: what two processes see (one index each)."""
    root = tmp_path / "s"
    a, b = open_store(root), open_store(root)
    va = put(a, "n")
    assert b.latest("n") is None  # b's index is its own
    # b's next number would be 1: it finds a's v1 and takes 2. Even when the check misses
    # the other's directory (a race), the rename refuses to replace it and b moves on.
    real_lexists = os.path.lexists
    missed: list[Any] = []

    def lexists_missing_v1(p: Any) -> bool:
        if str(p).endswith("/n/v1") and not missed:
            missed.append(p)
            return False
        return real_lexists(p)

    monkeypatch.setattr(store_mod.os.path, "lexists", lexists_missing_v1)
    vb = put(b, "n")
    monkeypatch.undo()
    assert missed and (va.version, vb.version) == (1, 2)
    assert (va.path / WEIGHTS_NAME).read_bytes() == WEIGHTS  # untouched
    assert a.versions("n") == [va] and b.versions("n") == [vb]
    b.refresh()
    assert [v.version for v in b.versions("n")] == [1, 2]
    a.delete("n")
    b.refresh()
    assert b.latest("n") is None
    assert put(b, "n").version == 3  # numbers b has seen are never reused


def test_two_processes_uploading_one_name_get_distinct_versions(tmp_path: Path) -> None:
    root = tmp_path / "s"
    open_store(root)
    children = [_child(root, "same", 6) for _ in range(2)]
    acked = []
    for c in children:
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0, err
        acked += [tuple(json.loads(line)) for line in out.splitlines()[1:]]
    assert len(acked) == 12 and len(set(acked)) == 12
    store = open_store(root)
    assert {(v.name, v.version) for v in store.versions("same")} == set(acked)
    assert staging_of(root) == []


_CHILD_HOLDS = """
import sys, time
from pathlib import Path
from hotlora.adapters.store import AdapterStore
from tests.adapters.conftest import BASE
store = AdapterStore(Path(sys.argv[1]), BASE, max_rank=8)
(Path(sys.argv[1]) / ".staging" / "in-flight").mkdir()
print("ready", flush=True)
time.sleep(60)
"""


def test_start_up_cleans_leftovers_only_when_no_other_process_has_the_store(
    tmp_path: Path,
) -> None:
    root = tmp_path / "s"
    open_store(root)
    child = subprocess.Popen([sys.executable, "-c", _CHILD_HOLDS, str(root)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        open_store(root)  # another process's upload in flight: left alone
        assert (root / ".staging" / "in-flight").is_dir()
    finally:
        child.kill()
        child.communicate()
    open_store(root)  # alone again (the dead process's lock went with it): cleaned
    assert staging_of(root) == []


def test_version_fields_are_what_put_returned(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    v = put(store, "a")
    again = open_store(store.root).latest("a")
    assert again is not None
    assert dataclasses.asdict(again) == dataclasses.asdict(v)
