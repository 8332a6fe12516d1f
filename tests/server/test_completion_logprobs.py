"""/v1/completions' echo, logprobs, max_tokens 0, token-id batches, n and the logit options:
log-probabilities equal transformers + peft over the same tokens, alone and mixed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from hotlora.adapters.demo_tasks import DEMO_MODEL, demo_adapters, prompt_for
from tests.server.support import (
    DEMO,
    EXPECTED,
    PROMPT,
    assert_error,
    complete,
    make_settings,
    serve,
    sse_chunks,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32 on CPU


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serve(make_settings(tmp_path_factory.mktemp("lp"), max_queue=16)) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The demo base in transformers and each demo LoRA adapter on it in peft."""
    base = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    out: dict[str, Any] = {DEMO: base}
    for name, (path, _) in demo_adapters(DEMO_MODEL).items():
        if name in ("reverse", "upper"):
            fresh = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
            out[name] = peft.PeftModel.from_pretrained(fresh, path).eval()
    return out


def _ref_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (n, V)


def _score(client: TestClient, model: str, prompt: Any, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}
    r = client.post("/v1/completions", json={**body, **fields})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", [DEMO, "reverse", "upper"])
def test_echo_logprobs_equal_peft(
    client: TestClient, reference: dict[str, Any], model: str
) -> None:
    text = prompt_for("hotlora") + " aroltoh"
    choice = _score(client, model, text)["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    ids = list(text.encode())  # the demo tokenizer: one token per byte
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == list(range(len(ids)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = _ref_logprobs(reference[model], ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(
        torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64), want, **TOL
    )
    for tok, top, value in zip(
        lp["tokens"][1:], lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True
    ):
        values = list(top.values())
        assert values == sorted(values, reverse=True) and 2 <= len(top) <= 3
        assert top[tok] == value and max(values) >= value  # the chosen token is always listed


def test_scores_are_the_same_alone_batched_and_mixed_with_other_adapters(
    client: TestClient,
) -> None:
    prompts = [list((prompt_for(w) + " x").encode()) for w in ("ab", "hotlora", "zzzzzzz")]
    alone = {
        (m, i): _score(client, m, p)["choices"][0]["logprobs"]["token_logprobs"]
        for m in ("reverse", "upper")
        for i, p in enumerate(prompts)
    }
    # lm-evaluation-harness' request: a batch of token-id lists, max_tokens 1, logprobs 1
    batch = _score(client, "reverse", prompts, max_tokens=1, logprobs=1, temperature=0)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    for i, c in enumerate(batch["choices"]):
        got = c["logprobs"]["token_logprobs"]
        assert len(got) == len(prompts[i]) + 1  # the prompt, then the one generated token
        torch.testing.assert_close(
            torch.tensor(got[1:-1]), torch.tensor(alone[("reverse", i)][1:]), **TOL
        )

    def call(case: tuple[str, int]) -> list[float]:
        return _score(client, case[0], prompts[case[1]])["choices"][0]["logprobs"]["token_logprobs"]

    cases = [(m, i) for i in range(3) for m in ("upper", "reverse")] * 2
    with ThreadPoolExecutor(6) as pool:  # concurrent: rows of both adapters share batches
        for case, got in zip(cases, pool.map(call, cases), strict=True):
            torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(alone[case][1:]), **TOL)


def test_generated_logprobs_echo_and_stream(client: TestClient) -> None:
    plain = complete(client, "reverse", logprobs=3, echo=True).json()["choices"][0]
    assert plain["text"] == PROMPT + EXPECTED["reverse"]
    lp = plain["logprobs"]
    # the EOS that ended the row is reported after the text's tokens (as vLLM; lm-eval's
    # loglikelihood requests rely on one entry per prompt token plus one for the sampled token)
    assert lp["tokens"][-1] == "<|endoftext|>" and lp["token_logprobs"][-1] < 0
    assert "".join(lp["tokens"][:-1]) == plain["text"]
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    gen = len(EXPECTED["reverse"]) + 1  # + EOS
    for tok, top, value in zip(
        lp["tokens"][-gen:], lp["top_logprobs"][-gen:], lp["token_logprobs"][-gen:], strict=True
    ):
        assert next(iter(top)) == tok and top[tok] == value  # greedy: the chosen one is the best
    streamed = sse_chunks(complete(client, "reverse", logprobs=3, echo=True, stream=True))
    assert "".join(c["choices"][0]["text"] for c in streamed) == plain["text"]
    merged: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for c in streamed:
        for k in merged:
            merged[k] += (c["choices"][0]["logprobs"] or {}).get(k, [])
    assert merged == lp
    no_echo = complete(client, "reverse", logprobs=0).json()["choices"][0]
    assert no_echo["text"] == EXPECTED["reverse"] and no_echo["logprobs"]["text_offset"][0] == 0
    assert no_echo["logprobs"]["token_logprobs"] == lp["token_logprobs"][-gen:]
    assert all(
        len(t) == 1 for t in no_echo["logprobs"]["top_logprobs"]
    )  # k = 0: just the chosen one


def test_n_seed_and_multiple_prompts(client: TestClient) -> None:
    body: dict[str, Any] = {"temperature": 2.0, "seed": 3, "n": 2, "max_tokens": 8}
    prompts = ["out: out: in:", prompt_for("a b c d e f g h")]
    a = complete(client, DEMO, prompts, **body).json()
    b = complete(client, DEMO, prompts, **body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["choices"][0]["text"] != a["choices"][1]["text"]
    second = complete(client, DEMO, prompts[1], **{**body, "n": 1, "seed": 4}).json()
    assert second["choices"][0]["text"] == a["choices"][3]["text"]
    assert a["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)  # each prompt once


def test_logit_options_reach_the_engine(client: TestClient) -> None:
    a = ord("A")
    assert (
        complete(client, DEMO, logit_bias={str(a): 100}, max_tokens=4).json()["choices"][0]["text"]
        == "AAAA"
    )
    # " olleh" stops at the first "l" (not included); min_tokens keeps it from stopping earlier
    cut = complete(client, "reverse", stop_token_ids=[ord("l")]).json()["choices"][0]
    assert cut["text"] == " o" and cut["finish_reason"] == "stop"
    held = complete(client, "reverse", stop_token_ids=[ord("o")], min_tokens=2).json()["choices"][0]
    assert held["text"][1] != "o" and len(held["text"]) >= 2  # "o" cannot be the 2nd token
    # EOS made certain, held off by min_tokens for exactly 3 tokens
    eos = {"256": 100.0}
    assert complete(client, "reverse", logit_bias=eos).json()["choices"][0]["text"] == ""
    three = complete(client, "reverse", logit_bias=eos, min_tokens=3).json()["choices"][0]
    assert three["text"] == " ol" and three["finish_reason"] == "stop"
    # each penalty changes a seeded row (hand-checked against a reference in tests/engine)
    seeded: dict[str, Any] = {"prompt": "", "temperature": 1.0, "seed": 5, "max_tokens": 16}
    base = complete(client, DEMO, **seeded).json()["choices"][0]["text"]
    for field, value in (
        ("frequency_penalty", 2.0),
        ("presence_penalty", 2.0),
        ("repetition_penalty", 3.0),
    ):
        text = complete(client, DEMO, **seeded, **{field: value}).json()["choices"][0]["text"]
        assert text != base, field


def test_max_tokens_null_fills_the_context(client: TestClient) -> None:
    r = complete(client, DEMO, max_tokens=None, ignore_eos=True, stop=None).json()
    assert r["usage"]["total_tokens"] == 128 and r["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"logprobs": 21}, "logprobs", "20"),
        ({"logprobs": -1}, "logprobs", "0"),
        ({"max_tokens": 0}, "max_tokens", "echo"),
        ({"prompt": [[1, 2], [300]]}, "prompt", "[0, 257)"),
        ({"n": 17}, "n", "queue"),
        ({"prompt": [PROMPT] * 9, "n": 2}, "n", "18 rows"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "-2"),
        ({"repetition_penalty": 0}, "repetition_penalty", "0"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "100"),
        ({"logit_bias": {"400": 1}}, "logit_bias", "vocabulary"),
        ({"stop_token_ids": [1000]}, "stop_token_ids", "vocabulary"),
        ({"logit_bias": {"²": 1}}, "logit_bias", "token id"),
        ({"logit_bias": {"1" * 5000: 1}}, "logit_bias", "token id"),
        ({"min_tokens": 30}, "min_tokens", "max_tokens"),
        ({"min_tokens": -1}, "min_tokens", "0"),
        ({"seed": 2**64}, "seed", "less than"),
    ],
)
def test_bad_completion_fields_are_400(
    client: TestClient, fields: dict[str, Any], param: str, says: str
) -> None:
    assert_error(complete(client, "reverse", **fields), 400, param=param, contains=says)
