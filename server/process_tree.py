"""The processes a `hotlora serve --replicas` run started, so that stopping it leaves none.

`ray.init()` without an address starts a local cluster: gcs_server, the raylet, the dashboard
and its modules, the log monitor, and the workers (the replicas, each with its engine process).
`ray.shutdown()` stops the processes the driver launched itself, but the raylet's own children
(DashboardAgent, RuntimeEnvAgent, workers) can outlive it: once their parent is gone they are
re-parented to init and nothing links them to this run any more. So `ProcessTree` records this
process' descendants while the tree is intact (every second, from before `ray.init`), and
`reap` ends whatever of them is still alive after the shutdown: SIGTERM, then SIGKILL.

Only descendants are recorded: a cluster this process joined (`--ray-address`) is not its own
and is left alone. psutil is a dependency of the `ray` extra, the only user of this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import psutil

log = logging.getLogger("hotlora.ray")


class ProcessTree:
    """This process' descendants, recorded by `track` (or `watch`) and ended by `reap`."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        # (pid, create time): a pid the system reuses later is another process
        self._seen: dict[tuple[int, float], psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self) -> None:
        """Record every descendant alive now."""
        try:
            children = self._me.children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            for child in children:
                try:
                    key = (child.pid, child.create_time())
                except psutil.Error:
                    continue  # gone already
                self._seen.setdefault(key, child)

    def watch(self, interval_s: float = 1.0) -> None:
        """Track on a daemon thread every `interval_s` until `reap`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.track()

        self.track()
        self._thread = threading.Thread(target=loop, name="hotlora-process-tree", daemon=True)
        self._thread.start()

    def alive(self) -> list[Any]:
        """The recorded processes still running (zombies count as gone: they hold nothing)."""
        with self._lock:
            procs = list(self._seen.values())
        out = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def reap(self, grace_s: float = 1.0, term_s: float = 2.0) -> int:
        """Stop watching; give the recorded processes `grace_s` to exit, SIGTERM the rest and
        give them `term_s`, then SIGKILL what is left. Returns how many had to be signalled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.track()
        _, left = psutil.wait_procs(self.alive(), timeout=grace_s)
        if not left:
            return 0
        log.warning(
            "stopping %d process(es) the Ray cluster left behind: %s",
            len(left),
            ", ".join(_name(p) for p in left),
        )
        for proc in left:
            _signal(proc, "terminate")
        _, stubborn = psutil.wait_procs(left, timeout=term_s)
        for proc in stubborn:
            _signal(proc, "kill")
        psutil.wait_procs(stubborn, timeout=term_s)
        return len(left)


def _signal(proc: Any, how: str) -> None:
    with contextlib.suppress(psutil.Error):  # exited meanwhile
        getattr(proc, how)()


def _name(proc: Any) -> str:
    try:
        return f"{proc.name()} ({proc.pid})"
    except psutil.Error:
        return str(proc.pid)
