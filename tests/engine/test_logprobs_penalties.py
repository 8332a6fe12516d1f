"""Log-probabilities (prompt and generated) against peft, and every logit adjustment
(penalties, logit_bias, min_tokens, stop_token_ids) against a hand-written reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from hotlora.server.engine.sampling import RowHistory, adjust_logits
from tests.helpers import make_hf_model, make_peft_adapter, random_prompts

TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32 on CPU
EOS = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Any, dict[str, Any]]:
    base_dir = tmp_path_factory.mktemp("base")
    hf = make_hf_model(base_dir, n_layer=2, n_embd=48, n_head=4)
    peft = {}
    engine = Engine.from_pretrained(
        base_dir, EngineConfig(max_batch=12, max_adapters=4, max_rank=8)
    )
    for i, (name, kw) in enumerate({"a": {}, "b": {"r": 2, "target_modules": ["c_attn"]}}.items()):
        path = tmp_path_factory.mktemp(name)
        peft[name] = make_peft_adapter(hf, path, seed=20 + i, **kw)
        engine.add_adapter(name, path)
    return engine, hf, peft


def _ref_model(models: tuple[Engine, Any, dict[str, Any]], adapter: str | None) -> Any:
    return models[1] if adapter is None else models[2][adapter]


def _ref_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of the reference model's logits at every position (n, V), in fp64."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _assert_same_logprobs(got: Any, want: Any) -> None:
    """Equal ids, values equal to float tolerance (a mixed batch pads: other GEMM shapes)."""
    assert got is not None and want is not None and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.token_id == w.token_id and [t for t, _ in g.top] == [t for t, _ in w.top]
        values = [g.logprob] + [v for _, v in g.top]
        torch.testing.assert_close(
            torch.tensor(values), torch.tensor([w.logprob] + [v for _, v in w.top]), **TOL
        )


def test_prompt_logprobs_equal_peft_alone_and_in_a_mixed_batch(
    models: tuple[Engine, Any, dict[str, Any]],
) -> None:
    engine = models[0]
    rows: list[str | None] = ["a", None, "b", "a", None]
    prompts = random_prompts(len(rows), seed=11)
    score = SamplingParams(max_tokens=0, prompt_logprobs=3)
    others = [  # other rows' options must not change a scoring row
        SamplingParams(max_tokens=4, temperature=0.9, seed=1, repetition_penalty=1.5),
        score,
        SamplingParams(max_tokens=3, temperature=0.0, logprobs=5, logit_bias={7: 50.0}),
        score,
        SamplingParams(max_tokens=0, prompt_logprobs=0),
    ]
    mixed = engine.generate(prompts, rows, others)
    for p, a, params, out in zip(prompts, rows, others, mixed, strict=True):
        if params.prompt_logprobs is None:
            continue
        alone = engine.generate([p], [a], params)[0]
        _assert_same_logprobs(out.prompt_logprobs, alone.prompt_logprobs)
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        want = _ref_logprobs(_ref_model(models, a), p)
        got = out.prompt_logprobs[1:]
        assert [g.token_id for g in got if g is not None] == p[1:]
        chosen = torch.tensor([g.logprob for g in got if g is not None], dtype=torch.float64)
        torch.testing.assert_close(
            chosen, want[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0], **TOL
        )
        for i, g in enumerate(got):
            assert g is not None and len(g.top) == params.prompt_logprobs
            if g.top:
                top_v, top_i = want[i].topk(len(g.top))
                assert [t for t, _ in g.top] == top_i.tolist()
                torch.testing.assert_close(
                    torch.tensor([v for _, v in g.top], dtype=torch.float64), top_v, **TOL
                )
        assert out.token_ids == [] and out.finish_reason == "length"


def test_generated_logprobs_are_the_raw_distribution(
    models: tuple[Engine, Any, dict[str, Any]],
) -> None:
    engine = models[0]
    p = random_prompts(1, seed=4)[0]
    # temperature and penalties change the sampler, not the reported log-probabilities
    for params in (
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=4, ignore_eos=True),
        SamplingParams(
            max_tokens=6,
            temperature=1.3,
            seed=5,
            logprobs=2,
            ignore_eos=True,
            frequency_penalty=1.0,
            repetition_penalty=1.2,
        ),
    ):
        out = engine.generate([p], ["a"], params)[0]
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
        ref = _ref_logprobs(models[2]["a"], p + out.token_ids)
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = ref[len(p) - 1 + i]
            assert lp.token_id == tok
            torch.testing.assert_close(
                torch.tensor(lp.logprob, dtype=torch.float64), row[tok], **TOL
            )
            vals = [v for _, v in lp.top]
            assert vals == sorted(vals, reverse=True) and len(vals) == params.logprobs
            assert [t for t, _ in lp.top] == row.topk(len(vals)).indices.tolist()
            if params.greedy:  # the greedy token is the most likely one
                assert lp.top[0][0] == tok and lp.top[0][1] == lp.logprob


def test_adjust_logits_matches_the_hand_computed_formula() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.5])
    params = SamplingParams(
        logit_bias={1: 5.0},
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=1.0,
    )
    got = adjust_logits(logits, params, RowHistory([0, 4], [2, 2, 3], frozenset({4})))
    # bias: [2, 4, .5, 3, -.5]; repetition over prompt+output {0, 2, 3, 4}: positive / 2,
    # negative * 2 -> [1, 4, .25, 1.5, -1]; output counts [0, 0, 2, 1, 0]:
    # - 0.5 * count - 1.0 * (count > 0) -> [1, 4, -1.75, 0, -1]
    assert got.tolist() == [1.0, 4.0, -1.75, 0.0, -1.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -0.5]  # the input is not changed
    masked = adjust_logits(
        logits, SamplingParams(min_tokens=2, max_tokens=4), RowHistory([], [1], frozenset({3, 4}))
    )
    assert masked[3] == masked[4] == float("-inf") and masked[:3].tolist() == [2.0, -1.0, 0.5]
    done = adjust_logits(logits, SamplingParams(min_tokens=1), RowHistory([], [1], frozenset({3})))
    assert done.tolist() == logits.tolist()


def _reference_greedy(model: Any, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    """Greedy decoding with the penalties applied by hand to the reference model's logits."""
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            row = model(torch.tensor([ids])).logits[0, -1].double()
        for t, b in params.logit_bias:
            row[t] += b
        for t in set(ids):  # repetition: prompt and output tokens
            row[t] = (
                row[t] / params.repetition_penalty
                if row[t] > 0
                else row[t] * params.repetition_penalty
            )
        for t in set(out):
            row[t] -= params.frequency_penalty * out.count(t) + params.presence_penalty
        tok = int(row.argmax())
        ids.append(tok)
        out.append(tok)
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 0.7, "frequency_penalty": -0.5, "logit_bias": {65: 3.0, 66: -2.0}},
    ],
)
def test_penalised_greedy_equals_the_reference_alone_and_mixed(
    models: tuple[Engine, Any, dict[str, Any]], penalties: dict[str, Any]
) -> None:
    engine = models[0]
    prompts = random_prompts(3, seed=8)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, **penalties)
    plain = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = _reference_greedy(models[2]["b"], prompts[1], params, 10)
    alone = engine.generate([prompts[1]], ["b"], params)[0].token_ids
    mixed = engine.generate(prompts, ["a", "b", None], [plain, params, plain])
    assert alone == mixed[1].token_ids == want
    assert want != engine.generate([prompts[1]], ["b"], plain)[0].token_ids  # it did something
    for i, a in ((0, "a"), (2, None)):  # the penalised row changes no other row
        assert mixed[i].token_ids == engine.generate([prompts[i]], [a], plain)[0].token_ids


def test_logit_bias_min_tokens_and_stop_token_ids(
    models: tuple[Engine, Any, dict[str, Any]],
) -> None:
    engine = models[0]
    p = random_prompts(1, seed=2)[0]
    forced = engine.generate(
        [p], None, SamplingParams(max_tokens=5, temperature=0.0, logit_bias={70: 100.0})
    )
    assert forced[0].token_ids == [70] * 5
    # EOS made certain: min_tokens holds it off for exactly 3 tokens, then it ends the row
    eager = SamplingParams(max_tokens=8, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=3)
    out = engine.generate([p], ["a"], eager)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "stop" and EOS not in out.token_ids
    assert (
        engine.generate(
            [p], ["a"], SamplingParams(max_tokens=8, temperature=0.0, logit_bias={EOS: 100.0})
        )[0].token_ids
        == []
    )
    # a stop token id ends the row and is not part of the output
    free = engine.generate(
        [p], ["a"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = engine.generate(
        [p],
        ["a"],
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
    )[0]
    assert stopped.token_ids == free.token_ids[:first] and stopped.finish_reason == "stop"
    # below min_tokens a stop token id cannot be sampled
    held = engine.generate(
        [p],
        ["a"],
        SamplingParams(
            max_tokens=8,
            temperature=0.0,
            ignore_eos=True,
            stop_token_ids=[stop_at],
            min_tokens=first + 1,
        ),
    )[0]
    assert len(held.token_ids) > first and held.token_ids[first] != stop_at


def test_token_ids_outside_the_vocabulary_are_refused(
    models: tuple[Engine, Any, dict[str, Any]],
) -> None:
    from hotlora.server.engine import RequestError

    engine = models[0]
    for params in (SamplingParams(logit_bias={257: 1.0}), SamplingParams(stop_token_ids=[999])):
        with pytest.raises(RequestError, match="vocabulary"):
            engine.generate(["abc"], params=params)
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    "bad",
    [
        SamplingParams(max_tokens=6, temperature=1.0, repetition_penalty=1e-40, seed=1),
        SamplingParams(max_tokens=6, temperature=1e-45, seed=1),
        SamplingParams(max_tokens=6, temperature=1.0, min_tokens=3, stop_token_ids=range(257)),
        SamplingParams(max_tokens=6, temperature=0.0, min_tokens=3, stop_token_ids=range(257)),
    ],
)
def test_an_extreme_row_never_fails_the_batch(
    models: tuple[Engine, Any, dict[str, Any]], bad: SamplingParams
) -> None:
    engine = models[0]
    prompts = random_prompts(3, seed=9)
    good = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, ["a", "b", None], [good, bad, good])
    assert outs[1].finish_reason in ("stop", "length")
    for i, a in ((0, "a"), (2, None)):
        assert outs[i].token_ids == engine.generate([prompts[i]], [a], good)[0].token_ids
