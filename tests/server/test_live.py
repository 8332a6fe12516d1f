"""A live uvicorn server on 127.0.0.1 driven by the real `openai` client and raw httpx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL, prompt_for
from hotlora.server.config import Settings
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from tests.server.support import LiveServer, free_port, slow_steps

openai = pytest.importorskip("openai")
MODEL = "hotlora-demo"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("store")
    # The engine on a thread of this process: the tests below slow its steps down in place
    # (tests/server/test_engine_process.py covers the engine in its own process).
    settings = Settings(
        adapter_store=store,
        port=free_port(),
        admin_key="admin",
        max_running=16,
        engine_process=False,
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Any:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="admin", max_retries=0)


def _upload(live: LiveServer, name: str, src: Path) -> dict[str, Any]:
    files = {
        "config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes()),
    }
    r = httpx.post(
        f"{live.url}/v1/adapters",
        data={"name": name},
        files=files,
        headers={"Authorization": "Bearer admin"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _solo(adapter_dir: Path | None, prompt: str, max_tokens: int, ignore_eos: bool = False) -> str:
    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=1, max_adapters=1))
    name = None
    if adapter_dir is not None:
        name = "a"
        engine.add_adapter(name, adapter_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    return engine.generate([prompt], [name], params)[0].text


def test_openai_client_completion_and_stream(client: Any) -> None:
    models = [m.id for m in client.models.list().data]
    assert models[0] == MODEL and {"reverse", "upper", "sort", "pirate"} <= set(models)
    r = client.completions.create(
        model="reverse", prompt=prompt_for("hello"), max_tokens=16, temperature=0
    )
    assert r.choices[0].text == " olleh" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 6 and r.object == "text_completion"
    chunks = list(
        client.completions.create(
            model="upper",
            prompt=prompt_for("hello"),
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == " HELLO"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)


def test_concurrent_requests_over_many_adapters_equal_solo_greedy(
    live: LiveServer, client: Any
) -> None:
    words = ["hotlora", "serving", "many", "adapters", "batch", "kernel"]
    cases: list[tuple[str | None, str]] = []
    for i, w in enumerate(words * 3):
        cases.append(([None, "reverse", "upper", "pirate"][i % 4], prompt_for(w)))
    cases += [("sort", prompt_for(d)) for d in ("4719", "80512", "99120")]

    def call(case: tuple[str | None, str]) -> str:
        adapter, prompt = case
        r = client.completions.create(
            model=adapter or MODEL, prompt=prompt, max_tokens=24, temperature=0
        )
        return str(r.choices[0].text)

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(call, cases))
    for (adapter, prompt), text in zip(cases, got, strict=True):
        want = _solo(None if adapter is None else DEMO_ADAPTERS / adapter, prompt, 24)
        assert text == want, (adapter, prompt)


def test_hot_swap_and_delete_while_a_stream_runs(live: LiveServer, client: Any) -> None:
    v1 = _upload(live, "swap", DEMO_ADAPTERS / "reverse")
    assert v1["version"] == 1
    prompt = prompt_for("streaming")
    n = 60
    old_text = _solo(DEMO_ADAPTERS / "reverse", prompt, n, ignore_eos=True)
    new_text = _solo(DEMO_ADAPTERS / "upper", prompt, n, ignore_eos=True)
    assert old_text != new_text
    real = slow_steps(live, 0.01)
    try:

        def swap(stream: bool) -> Any:
            return client.completions.create(
                model="swap",
                prompt=prompt,
                max_tokens=n,
                temperature=0,
                stream=stream,
                extra_body={"ignore_eos": True},
            )

        it = iter(swap(stream=True))
        got = next(it).choices[0].text
        v2 = _upload(live, "swap", DEMO_ADAPTERS / "upper")
        assert v2["version"] == 2
        assert live.engine.num_running >= 1  # the old stream is still decoding
        fresh = swap(stream=False)
        assert fresh.choices[0].text == new_text  # new requests get the new version at once
        # Delete while another request on the new version runs: it finishes, new ones 404.
        rit = iter(swap(stream=True))
        first = next(rit).choices[0].text
        r = httpx.delete(f"{live.url}/v1/adapters/swap", headers={"Authorization": "Bearer admin"})
        assert r.status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="swap", prompt=prompt, max_tokens=2)
        got += "".join(c.choices[0].text for c in it)
        assert got == old_text  # the stream kept the version it started with
        rest = first + "".join(c.choices[0].text for c in rit)
        assert rest == new_text
    finally:
        live.engine.step = real  # type: ignore[method-assign]
    deadline = time.monotonic() + 10
    while live.engine.adapters and any(
        a.startswith("swap@") for a in live.engine.adapters
    ):
        assert time.monotonic() < deadline, "retired versions must leave their slots"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_frees_its_row(live: LiveServer, stream: bool) -> None:
    real = slow_steps(live, 0.02)  # 100 tokens would take >= 2 s
    slow, running = live.engine.step, []

    def watched() -> Any:
        running.append(live.engine.num_running)
        return slow()

    live.engine.step = watched  # type: ignore[method-assign]
    body = {
        "model": "reverse",
        "prompt": prompt_for("gone"),
        "max_tokens": 100,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    try:
        start = time.monotonic()
        with httpx.Client(base_url=live.url, timeout=0.5) as c:
            if stream:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    next(r.iter_lines())  # one chunk, then hang up
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post("/v1/completions", json=body)
        # Its row is freed long before its 100 tokens (>= 2 s of steps) could have been made.
        while live.engine.num_running:
            assert time.monotonic() < start + 1.8, "the abandoned request kept its row"
            time.sleep(0.02)
        assert max(running) == 1  # it was decoding when the client left
    finally:
        live.engine.step = real  # type: ignore[method-assign]
