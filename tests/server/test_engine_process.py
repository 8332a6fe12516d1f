"""The engine core in its own process: cancellation, crash and stop across the boundary."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from hotlora.adapters.demo_tasks import DEMO_MODEL, build_tokenizer, prompt_for
from hotlora.server.engine import EngineConfig, ModelLoadError
from hotlora.server.engine.client import EngineClient
from hotlora.server.engine.core import CoreConfig, LoopConfig
from hotlora.server.engine.inputs import InputProcessor
from hotlora.server.metrics import Metrics
from tests.server.support import (
    LiveServer,
    free_port,
    make_settings,
    metric,
    metric_samples,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer GPT-2 with a 2048-token context: a request can decode for a second or two."""
    path = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=257, n_positions=2048, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=256, eos_token_id=256,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    build_tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def server(long_model: Path, tmp_path: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path, model=long_model, served_model_name="long", port=free_port(), host="127.0.0.1"
    )
    assert settings.engine_process
    with LiveServer(settings) as srv:
        yield srv


def _metric(url: str, name: str) -> float:
    with httpx.Client(base_url=url) as c:
        return metric(metric_samples(c), name)  # type: ignore[arg-type]


def _long_body(stream: bool) -> dict[str, object]:
    return {
        "model": "long", "prompt": prompt_for("x"), "max_tokens": 2000, "temperature": 0,
        "ignore_eos": True, "stream": stream,
    }  # fmt: skip


def test_the_engine_runs_in_its_own_process(server: LiveServer) -> None:
    pid = server.state.client.pid
    assert pid is not None and pid != os.getpid()
    r = httpx.post(f"{server.url}/v1/completions", json={**_long_body(False), "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row_in_the_engine_process(
    server: LiveServer, stream: bool
) -> None:
    with httpx.Client(base_url=server.url, timeout=0.3) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=_long_body(True)) as r:
                next(r.iter_lines())  # one chunk, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=_long_body(False))
    deadline = time.monotonic() + 1.0
    while _metric(server.url, "hotlora_num_requests_running"):
        assert time.monotonic() < deadline, "the abandoned request kept its row"
        time.sleep(0.02)
    assert _metric(server.url, "hotlora_generation_tokens_total") < 1500


def test_a_streamed_request_with_many_choices_frees_every_row_on_disconnect(
    server: LiveServer,
) -> None:
    body = {**_long_body(True), "n": 4}
    with (
        httpx.Client(base_url=server.url, timeout=5) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        next(r.iter_lines())  # one chunk, then hang up
    deadline = time.monotonic() + 1.0
    while _metric(server.url, "hotlora_num_requests_running"):
        assert time.monotonic() < deadline, "an abandoned choice kept its row"
        time.sleep(0.02)
    assert _metric(server.url, "hotlora_generation_tokens_total") < 4 * 1500


def test_a_crashed_engine_fails_requests_and_readiness_but_not_the_api(server: LiveServer) -> None:
    url = server.url
    assert httpx.get(f"{url}/ready").status_code == 200
    with (
        httpx.Client(base_url=url, timeout=10) as c,
        c.stream("POST", "/v1/completions", json=_long_body(True)) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        pid = server.state.client.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.strip()]
    assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]"
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 503 and "engine" in ready.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={**_long_body(False), "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert httpx.get(f"{url}/health").status_code == 200  # the API itself still answers
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_a_graceful_stop_ends_the_engine_process(long_model: Path, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, model=long_model, served_model_name="long", port=free_port(), host="127.0.0.1"
    )
    with LiveServer(settings) as srv:
        client = srv.state.client
        process = client._process
        assert process is not None and process.is_alive()
    process.join(timeout=10)
    assert process.exitcode == 0 and not client.running


def test_a_model_that_fails_to_load_fails_start_up_with_its_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (broken / f).write_bytes((DEMO_MODEL / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    config = EngineConfig(max_batch=2, max_adapters=1)
    client = EngineClient(
        InputProcessor.from_model_dir(broken, config),
        CoreConfig(broken, config, LoopConfig(False, 1.0, 1), 1 << 20),
        max_queue=4,
        metrics=Metrics(),
    )
    with pytest.raises(ModelLoadError, match="safetensors"):
        asyncio.run(client.start())
    assert not client.running
