"""Sampling parameters, seeds, stop strings, EOS, and the detokenizer."""

from __future__ import annotations

import pytest
import torch

from hotlora.adapters.demo_tasks import build_tokenizer
from hotlora.server.engine import Engine, EngineConfig, RequestError, SamplingParams
from hotlora.server.engine.sampling import _filter, sample
from hotlora.server.engine.tokenizer import Detokenizer
from tests.helpers import make_hf_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = tmp_path_factory.mktemp("m")
    make_hf_model(path)
    return Engine.from_pretrained(path, EngineConfig(max_batch=8, max_adapters=1, max_rank=4))


def test_same_seed_same_text_alone_and_inside_a_mixed_batch(engine: Engine) -> None:
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    alone = engine.generate(["hello"], params=p)[0].token_ids
    again = engine.generate(["hello"], params=p)[0].token_ids
    others = [
        SamplingParams(max_tokens=5, temperature=0.8, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0),
    ]
    batch = engine.generate(["abc", "hello", "xyz"], params=[others[0], p, others[1]])
    assert alone == again == batch[1].token_ids
    other_seed = engine.generate(
        ["hello"], params=SamplingParams(max_tokens=16, seed=8, ignore_eos=True)
    )
    assert other_seed[0].token_ids != alone


def test_top_k_one_is_greedy(engine: Engine) -> None:
    greedy = engine.generate(
        ["abc"], params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    topk = engine.generate(
        ["abc"],
        params=SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3, ignore_eos=True),
    )
    assert greedy[0].token_ids == topk[0].token_ids


def test_filter_keeps_exactly_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_filter(logits, top_k=0, top_p=0.8))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(_filter(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [True, True, True, False]
    kept = torch.isfinite(_filter(logits, top_k=0, top_p=0.1))
    assert kept.tolist() == [True, False, False, False]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    gens = [torch.Generator().manual_seed(0)]
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample(probs.log()[None], [SamplingParams(temperature=1.0)], gens)[0]] += 1
    assert torch.allclose(counts / 2000, probs, atol=0.04)


def test_stop_string_cuts_text_and_finishes(engine: Engine) -> None:
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = engine.generate(["hello"], params=p)[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    out = engine.generate(
        ["hello"],
        params=SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]),
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]


def test_eos_finishes_with_stop_and_is_not_emitted(engine: Engine) -> None:
    p = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompt = [5, 6, 7]
    full = engine.generate([prompt], params=p)[0].token_ids
    engine.eos_token_ids, saved = frozenset({full[3]}), engine.eos_token_ids
    try:
        out = engine.generate([prompt], params=SamplingParams(max_tokens=30, temperature=0.0))[0]
    finally:
        engine.eos_token_ids = saved
    assert out.finish_reason == "stop"
    assert out.token_ids == full[: full.index(full[3])]


def test_detokenizer_holds_back_partial_utf8_and_stop_prefixes() -> None:
    tok = build_tokenizer()
    ids = tok.encode("héllo wor").ids
    d = Detokenizer(tok, stop=("world",))
    pieces = [d.update(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == "héllo "  # "wor" may still become "world"
    assert all("\ufffd" not in p for p in pieces)
    d.update(tok.encode("héllo world!").ids)
    assert d.stopped and d.text == "héllo "


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": -3},
        {"min_tokens": -1},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.1},
        {"repetition_penalty": 0.0},
        {"logit_bias": {5: 101.0}},
        {"logit_bias": {-1: 1.0}},
        {"stop_token_ids": [-2]},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
        {"logprobs": True},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": [""]},
    ],
)
def test_bad_sampling_params_raise_naming_their_field(kwargs: dict[str, object]) -> None:
    # The error carries the request field to fix (the API's `param`) from where it is raised,
    # so rewording a message never changes the API.
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.param == next(iter(kwargs)), str(e.value)


def test_min_tokens_over_max_tokens_names_min_tokens() -> None:
    with pytest.raises(RequestError) as e:
        SamplingParams(max_tokens=2, min_tokens=3)
    assert e.value.param == "min_tokens"


def test_bad_requests_raise_and_queue_nothing(engine: Engine) -> None:
    with pytest.raises(RequestError, match="not loaded"):
        engine.generate(["a", "b"], ["nope", None])
    with pytest.raises(RequestError, match="context"):
        engine.generate(["a"], params=SamplingParams(max_tokens=10_000))
    with pytest.raises(RequestError, match="shorter"):
        engine.generate([[1] * 500])
    with pytest.raises(RequestError, match="lengths must match"):
        engine.generate(["a", "b"], [None])
    assert not engine.has_unfinished()
