"""Locust load test for hotlora (or the baseline): completions, streams and adapter admin.

Users (weights are relative; the admin is always exactly one user):
  CompletionUser  POST /v1/completions, non-streamed, over the base and the served adapters
  StreamUser      the same with stream=true; locust's own entry "SSE stream (headers)" times
                  the response headers only, so it also reports "SSE complete" (the whole
                  stream, to [DONE]) and "SSE TTFT" (to the first chunk), request type SSE
  AdminUser       uploads, replaces (a new version under the same name) and deletes adapters
                  named locust-admin-<k>; traffic users never target those, so no 404s

Headless (loopback only; the host must be http://127.0.0.1:<port>):

    locust -f load_tests/locustfile.py --headless -u 10 -r 2 -t 30s --host http://127.0.0.1:8000

Environment: HOTLORA_LOCUST_MODEL_DIR (base dir the admin's synthetic adapters are shaped for;
default the demo model), HOTLORA_LOCUST_ADMIN_KEY / HOTLORA_LOCUST_API_KEY (bearer keys).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

import common

MODEL_DIR = Path(os.environ.get("HOTLORA_LOCUST_MODEL_DIR", str(common.DEMO_MODEL)))
ADMIN_KEY = os.environ.get("HOTLORA_LOCUST_ADMIN_KEY")
API_KEY = os.environ.get("HOTLORA_LOCUST_API_KEY")
ADMIN_PREFIX = "locust-admin-"
_ADAPTERS: list[Path] = []  # synthetic adapter dirs, written once per locust process
_TMP: tempfile.TemporaryDirectory[str] | None = None


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    global _TMP
    common.check_loopback(environment.host or "")
    _TMP = tempfile.TemporaryDirectory(prefix="locust-adapters-")
    dims = common.base_dims(MODEL_DIR)
    for i, rank in enumerate((4, 8, 16)):
        _ADAPTERS.append(common.make_adapter(Path(_TMP.name) / f"v{i}", dims, rank=rank, seed=i))


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    if _TMP is not None:
        _TMP.cleanup()


def _prompt() -> str:
    word = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(3, 8)))
    return f"in: {word}\nout:"


class _Traffic(HttpUser):
    abstract = True
    wait_time = between(0.1, 0.5)
    models: list[str]

    def on_start(self) -> None:
        common.check_loopback(self.host or "")
        r = self.client.get("/v1/models", headers=common.auth(API_KEY), name="/v1/models")
        ids = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
        self.models = [m for m in ids if not m.startswith(ADMIN_PREFIX)] or ids

    def body(self) -> dict[str, Any]:
        return {
            "model": random.choice(self.models),
            "prompt": _prompt(),
            "max_tokens": random.randint(4, 24),
            "temperature": random.choice([0.0, 0.8]),
        }


class CompletionUser(_Traffic):
    weight = 3

    @task
    def complete(self) -> None:
        body = self.body()
        with self.client.post(
            "/v1/completions",
            json=body,
            headers=common.auth(API_KEY),
            name="/v1/completions",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
                r.failure(f"no finish_reason: {r.text[:200]}")


class StreamUser(_Traffic):
    weight = 3

    @task
    def stream(self) -> None:
        body = {**self.body(), "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first: float | None = None
        with self.client.post(
            "/v1/completions",
            json=body,
            headers=common.auth(API_KEY),
            stream=True,
            name="SSE stream (headers)",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            done, finish, size = False, None, 0
            for raw in r.iter_lines():
                line = raw.decode() if isinstance(raw, bytes) else raw
                size += len(line)
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    r.failure(f"SSE error event: {obj['error']}")
                    return
                if obj.get("choices"):
                    if first is None:
                        first = time.perf_counter()
                    finish = obj["choices"][0].get("finish_reason") or finish
            if not done or finish is None:
                r.failure(f"incomplete stream (done={done}, finish={finish})")
                return
        end = time.perf_counter()
        events.request.fire(
            request_type="SSE",
            name="SSE complete",
            response_time=(end - t0) * 1e3,
            response_length=size,
            exception=None,
            context={},
        )
        if first is not None:
            events.request.fire(
                request_type="SSE",
                name="SSE TTFT",
                response_time=(first - t0) * 1e3,
                response_length=0,
                exception=None,
                context={},
            )


class AdminUser(HttpUser):
    fixed_count = 1  # exactly one admin, whatever -u is
    wait_time = between(1.0, 2.0)

    def on_start(self) -> None:
        common.check_loopback(self.host or "")
        self.present: set[str] = set()
        self.k = 0

    def _upload(self, name: str, label: str) -> None:
        files = common.adapter_files(random.choice(_ADAPTERS))
        with self.client.post(
            "/v1/adapters",
            data={"name": name},
            files=files,
            headers=common.auth(ADMIN_KEY),
            name=label,
            catch_response=True,
        ) as r:
            if r.status_code != 201:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            else:
                self.present.add(name)

    @task(2)
    def upload(self) -> None:
        if len(self.present) >= 4:
            return self.delete()
        self.k += 1
        self._upload(f"{ADMIN_PREFIX}{self.k}", "POST /v1/adapters (new)")

    @task(2)
    def replace(self) -> None:
        if not self.present:
            return self.upload()
        self._upload(random.choice(sorted(self.present)), "POST /v1/adapters (replace)")

    @task(1)
    def delete(self) -> None:
        if not self.present:
            return self.upload()
        name = random.choice(sorted(self.present))
        with self.client.delete(
            f"/v1/adapters/{name}",
            headers=common.auth(ADMIN_KEY),
            name="DELETE /v1/adapters/{name}",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            self.present.discard(name)

    def on_stop(self) -> None:
        for name in sorted(self.present):
            self.client.delete(
                f"/v1/adapters/{name}",
                headers=common.auth(ADMIN_KEY),
                name="DELETE /v1/adapters/{name}",
            )
        self.present.clear()
