"""POST /v1/completions, GET /v1/models, /health and /ready against the demo model in-process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hotlora.adapters.demo_tasks import prompt_for
from tests.server.support import (
    DEMO,
    DEMO_NAMES,
    EXPECTED,
    PROMPT,
    SORT_EXPECTED,
    SORT_PROMPT,
    assert_error,
    complete,
    greedy_text,
    make_settings,
    metric,
    metric_samples,
    serve,
    sse_chunks,
)

CONTEXT = 128  # the demo model's n_positions


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serve(make_settings(tmp_path_factory.mktemp("api"))) as c:
        yield c


# ---------------------------------------------------------------- completions: results


@pytest.mark.parametrize(
    ("model", "prompt", "want"),
    [(m, PROMPT, t) for m, t in EXPECTED.items()] + [("sort", SORT_PROMPT, SORT_EXPECTED)],
)
def test_greedy_completion_of_base_and_each_adapter(
    client: TestClient, model: str, prompt: str, want: str
) -> None:
    r = complete(client, model, prompt)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == model
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": want, "logprobs": None, "finish_reason": "stop"}
    ]


def test_usage_counts_prompt_and_completion_tokens(client: TestClient) -> None:
    body = complete(client, "pirate").json()
    # One token per byte; the EOS that ends the answer is not part of the completion.
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT.encode()),
        "completion_tokens": len(EXPECTED["pirate"].encode()),
        "total_tokens": len(PROMPT.encode()) + len(EXPECTED["pirate"].encode()),
    }


def test_list_of_prompts_gives_one_indexed_choice_each(client: TestClient) -> None:
    words = ["hello", "abc", "planet"]
    r = complete(client, "reverse", [prompt_for(w) for w in words])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [" " + w[::-1] for w in words]
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    n_prompt = sum(len(prompt_for(w).encode()) for w in words)
    n_out = sum(len(w) + 1 for w in words)
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
    }


def test_token_id_prompt_equals_the_string_prompt(client: TestClient) -> None:
    ids = list(PROMPT.encode())  # the demo tokenizer: token id = byte value
    r = complete(client, "upper", ids)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == EXPECTED["upper"]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_finish_reason_length_when_max_tokens_runs_out(client: TestClient) -> None:
    body = complete(client, "reverse", max_tokens=3).json()
    assert body["choices"][0]["text"] == " ol"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("stop", "want"),
    [("l", " o"), (["zz", "le"], " ol"), (["h"], " olle"), ("q", " olleh")],
)
def test_stop_strings_end_the_text_before_the_match(
    client: TestClient, stop: str | list[str], want: str
) -> None:
    choice = complete(client, "reverse", stop=stop).json()["choices"][0]
    assert choice["text"] == want
    assert choice["finish_reason"] == "stop"


def test_same_seed_gives_the_same_sample(client: TestClient) -> None:
    fields: dict[str, Any] = {"temperature": 1.5, "top_k": 50, "max_tokens": 20, "seed": 1234}
    fields["ignore_eos"] = True  # 20 sampled tokens each, so a difference would show
    bodies = [complete(client, DEMO, **fields).json() for _ in range(3)]
    assert all(b["usage"]["completion_tokens"] == 20 for b in bodies)
    assert len({b["choices"][0]["text"] for b in bodies}) == 1
    # The seed is what fixes the sample: other seeds (fixed too, so this is deterministic) differ.
    others = {
        complete(client, DEMO, **{**fields, "seed": s}).json()["choices"][0]["text"]
        for s in (1, 2, 3)
    }
    assert len(others | {bodies[0]["choices"][0]["text"]}) > 1


@pytest.mark.parametrize("model", ["pirate", DEMO])
def test_streaming_concatenates_to_the_non_streaming_text(client: TestClient, model: str) -> None:
    r = complete(client, model, stream=True)
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r)
    assert len(chunks) >= 2  # really streamed, not one final chunk
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == model
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
        assert "usage" not in c
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == EXPECTED[model]


def test_streaming_with_include_usage_ends_with_a_usage_chunk(client: TestClient) -> None:
    want = complete(client, "upper").json()["usage"]
    r = complete(client, "upper", stream=True, stream_options={"include_usage": True})
    chunks = sse_chunks(r)
    *text_chunks, last = chunks
    assert last["choices"] == [] and last["usage"] == want
    assert last["id"] == text_chunks[0]["id"]
    assert all("usage" not in c for c in text_chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == EXPECTED["upper"]


def test_streaming_a_list_of_prompts_indexes_the_chunks(client: TestClient) -> None:
    words = ["hello", "abc"]
    chunks = sse_chunks(complete(client, "reverse", [prompt_for(w) for w in words], stream=True))
    for i, w in enumerate(words):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == " " + w[::-1]
        assert mine[-1]["finish_reason"] == "stop"


def test_a_mixed_concurrent_batch_gives_every_solo_result(client: TestClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # Base, LoRA and DEU rows together (the DEU demo adapter solves "adapter", see its README row).
    deu = ("upper-deu", prompt_for("adapter"), " ADAPTER")
    jobs = [*((m, PROMPT, t) for m, t in EXPECTED.items()), deu] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: greedy_text(client, job[0], job[1]), jobs))
    assert texts == [want for _, _, want in jobs]


# ---------------------------------------------------------------- completions: refusals


def test_unknown_model_is_404(client: TestClient) -> None:
    assert_error(
        complete(client, "no-such-adapter"),
        404,
        param="model",
        contains=("no-such-adapter", "/v1/models"),
    )


def test_malformed_json_is_400(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        content=b'{"model": "hotlora-demo", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, contains="not valid JSON")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", 42),
        ("prompt", {"text": "hi"}),
        ("max_tokens", "many"),
        ("temperature", "hot"),
        ("stream", "maybe"),
        ("stop", 7),
    ],
)
def test_wrong_field_types_are_400_naming_the_field(
    client: TestClient, field: str, value: object
) -> None:
    fields: dict[str, Any] = {field: value}
    err = assert_error(complete(client, DEMO, **fields), 400)
    assert err["param"] is not None and err["param"].split(".")[0] == field, err
    assert field in err["message"], err


def test_wrong_prompt_type_names_the_prompt_field_as_param(client: TestClient) -> None:
    assert_error(complete(client, DEMO, prompt=42), 400, param="prompt")


@pytest.mark.parametrize("missing", ["model", "prompt"])
def test_missing_required_field_is_400(client: TestClient, missing: str) -> None:
    body = {"model": DEMO, "prompt": PROMPT}
    del body[missing]
    r = client.post("/v1/completions", json=body)
    assert_error(r, 400, param=missing, contains="required")


@pytest.mark.parametrize(("max_tokens", "says"), [(0, "echo"), (-3, "0")])
def test_non_positive_max_tokens_is_400(client: TestClient, max_tokens: int, says: str) -> None:
    assert_error(
        complete(client, DEMO, max_tokens=max_tokens), 400, param="max_tokens", contains=says
    )


def test_max_tokens_beyond_the_context_is_400(client: TestClient) -> None:
    n = len(PROMPT.encode())
    ok = complete(client, DEMO, max_tokens=CONTEXT - n)  # exactly fills the context
    assert ok.status_code == 200, ok.text
    err = assert_error(
        complete(client, DEMO, max_tokens=CONTEXT - n + 1),
        400,
        param="max_tokens",
        contains=("lower max_tokens", str(CONTEXT)),
    )
    assert str(CONTEXT - n + 1) in err["message"]


def test_prompt_longer_than_the_context_is_400(client: TestClient) -> None:
    ok = complete(client, DEMO, "a" * (CONTEXT - 1), max_tokens=1)
    assert ok.status_code == 200, ok.text
    assert_error(
        complete(client, DEMO, "a" * CONTEXT, max_tokens=1),
        400,
        param="prompt",
        contains=("shorter", str(CONTEXT)),
    )


def test_prompt_token_ids_outside_the_vocabulary_are_400(client: TestClient) -> None:
    assert_error(complete(client, DEMO, [10, 257]), 400, param="prompt", contains="[0, 257)")


def test_empty_prompt_list_is_400(client: TestClient) -> None:
    assert_error(complete(client, DEMO, []), 400, param="prompt", contains="empty")


@pytest.mark.parametrize("n", [0, 129])
def test_n_out_of_range_is_400(client: TestClient, n: int) -> None:
    assert_error(complete(client, DEMO, n=n), 400, param="n")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 0),
        ("top_p", 1.01),
        ("top_k", -2),
    ],
)
def test_sampling_parameters_out_of_range_are_400(
    client: TestClient, field: str, value: float
) -> None:
    fields: dict[str, Any] = {field: value}
    assert_error(complete(client, DEMO, **fields), 400, param=field)


def test_empty_stop_string_is_400(client: TestClient) -> None:
    assert_error(complete(client, DEMO, stop=[""]), 400, contains="stop")


def test_refused_requests_leave_the_queue_empty(client: TestClient) -> None:
    complete(client, DEMO, max_tokens=0)
    complete(client, "nope")
    samples = metric_samples(client)
    assert metric(samples, "hotlora_num_requests_waiting") == 0
    assert metric(samples, "hotlora_num_requests_running") == 0


# ---------------------------------------------------------------- models, health, routing


def test_models_lists_the_base_first_then_every_adapter(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    base, *adapters = body["data"]
    assert base["id"] == DEMO and base["object"] == "model" and base["parent"] is None
    assert [a["id"] for a in adapters] == sorted(DEMO_NAMES)
    for a in adapters:
        assert a["object"] == "model"
        assert a["parent"] == DEMO and a["root"] == DEMO
        assert isinstance(a["created"], int)


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": DEMO}


def test_unknown_route_and_wrong_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/completions"), 405)


# ---------------------------------------------------------------- back-pressure


@pytest.fixture(scope="module")
def full_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """max_queue=0: no request may wait, so every completion is refused at submission."""
    with serve(make_settings(tmp_path_factory.mktemp("full"), max_queue=0)) as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(full_client: TestClient, stream: bool) -> None:
    r = complete(full_client, "reverse", stream=stream)
    assert_error(r, 429, contains="retry")
    assert int(r.headers["retry-after"]) >= 1


def test_queue_full_counts_rejections_and_leaves_nothing_waiting(
    full_client: TestClient,
) -> None:
    before = metric(metric_samples(full_client), "hotlora_requests_total", outcome="rejected")
    assert complete(full_client, DEMO, [PROMPT, PROMPT]).status_code == 429
    samples = metric_samples(full_client)
    assert metric(samples, "hotlora_requests_total", outcome="rejected") == before + 1
    assert metric(samples, "hotlora_num_requests_waiting") == 0
