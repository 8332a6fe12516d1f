"""lm-evaluation-harness scores a demo adapter through a live server exactly as offline.

lm_eval's `local-completions` model (what `lm_eval --model local-completions` runs) drives a real
uvicorn server on the GPT-2 demo model: the multiple-choice task needs `echo` + `logprobs` with
token-id prompts, the generation task greedy decoding with stop strings. Every number must equal
`training.evaluate`, which scores the same tasks with the offline engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL
from hotlora.server.engine import Engine, EngineConfig
from hotlora.training.eval_tasks import EVAL_TASKS, TASK_DIR
from hotlora.training.eval_tasks.hotlora_data import read_items
from hotlora.training.evaluate import TaskScore, encode_pair, eos_strings, evaluate, loglikelihoods
from hotlora.training.make_eval_tasks import stale

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from lm_eval.tasks import TaskManager  # noqa: E402

DEMO = DEMO_MODEL.name  # the base model's id on the server
MC, GEN = "hotlora_reverse_mc", "hotlora_reverse_gen"
TASKS = [MC, GEN]
MODELS = ["reverse", DEMO]  # the adapter, and the base model by its id
LIMIT = 20  # items per task (the files hold 40): 100 loglikelihood + 20 generation requests


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live server on the demo model with the demo adapters (`reverse` among them)."""
    from tests.server.support import LiveServer, free_port, make_settings

    port = free_port()
    settings = make_settings(tmp_path_factory.mktemp("lm_eval"), host="127.0.0.1", port=port)
    with LiveServer(settings) as server:
        yield server.url


@pytest.fixture(scope="module")
def harness(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """lm_eval's results (with samples) per model, both tasks in one run, run from a directory
    unrelated to the repo so that the task data must be found without the working directory."""
    manager = TaskManager(include_path=str(TASK_DIR))
    out: dict[str, dict[str, Any]] = {}
    cwd = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        for model in MODELS:
            model_args = (
                f"model={model},base_url={base_url}/v1/completions,"
                f"tokenizer_backend=huggingface,tokenizer={DEMO_MODEL}"
            )
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=model_args,
                tasks=TASKS,
                task_manager=manager,
                limit=LIMIT,
                log_samples=True,
                bootstrap_iters=0,
            )
            assert results is not None
            out[model] = results
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="module")
def engine() -> Engine:
    # the server's defaults (cuda + fp16 when there is a GPU, else cpu + fp32)
    eng = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=32, max_adapters=1))
    eng.add_adapter("reverse", DEMO_ADAPTERS / "reverse")
    return eng


@pytest.fixture(scope="module")
def offline(engine: Engine) -> dict[tuple[str, str], TaskScore]:
    return {
        (model, task): evaluate(engine, None if model == DEMO else model, task, LIMIT)
        for model in MODELS
        for task in TASKS
    }


def _tol(engine: Engine) -> float:
    """How close the server's loglikelihoods must be: the same forward pass on the same
    device, so fp32 agrees to rounding; fp16 (a GPU) leaves more room."""
    return 1e-4 if engine.dtype == torch.float32 else 2e-2


def _samples(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = results["samples"][task]
    return sorted(samples, key=lambda s: int(s["doc_id"]))


def test_task_files_are_generated() -> None:
    """The shipped yaml/jsonl are what `python -m hotlora.training.make_eval_tasks` writes."""
    assert stale() == []
    items = read_items(EVAL_TASKS[MC].data_path)
    assert len(items) == 40 and len({it["word"] for it in items}) == 40
    for it in items:
        assert it["prompt"] == f"in: {it['word']}\nout:"
        assert it["completion"] == " " + it["word"][::-1] == " " + it["choices"][it["label"]]
        assert len(set(it["choices"])) == len(it["choices"]) == 5
    assert len({it["label"] for it in items}) > 1  # the right answer moves around


def test_offline_tokenization_is_lm_eval_s(engine: Engine) -> None:
    """training.evaluate builds the very token ids lm_eval sends (no server contacted)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        model="reverse",
        base_url="http://127.0.0.1:9/v1/completions",
        tokenizer_backend="huggingface",
        tokenizer=str(DEMO_MODEL),
    )
    for it in read_items(EVAL_TASKS[MC].data_path):
        for choice in it["choices"]:
            cont = EVAL_TASKS[MC].target_delimiter + choice
            assert encode_pair(engine, it["prompt"], cont) == lm._encode_pair(it["prompt"], cont)
        prompt_ids = engine.tokenizer.encode(it["prompt"], add_special_tokens=False)
        assert prompt_ids == lm.tok_encode(it["prompt"])
    assert eos_strings(engine) == [lm.eos_string]


def test_offline_scores(offline: dict[tuple[str, str], TaskScore]) -> None:
    """The adapter solves both tasks; the base (which copies) fails them."""
    for task in TASKS:
        assert offline[("reverse", task)].accuracy == 1.0
        assert offline[(DEMO, task)].accuracy == 0.0
    assert set(offline[(DEMO, GEN)].predictions) != {""}


def test_echo_logprobs_have_one_entry_per_prompt_token_plus_one(
    base_url: str, engine: Engine
) -> None:
    """The shape lm_eval's parse_logprobs relies on: it sums token_logprobs[ctxlen:-1], so the
    echoed arrays must hold every prompt token and then the one sampled token, even when that
    token is EOS (here the adapter's greedy next token after its own answer)."""
    import httpx

    ctx, cont = encode_pair(engine, "in: hello\nout:", " olleh")
    ids = ctx + cont
    body = {
        "model": "reverse",
        "prompt": [ids],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }  # exactly what LocalCompletionsAPI._create_payload sends for a loglikelihood request
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("in: hello\nout: olleh"), choice["text"]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1, lp
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    tol = _tol(engine)
    want, greedy = loglikelihoods(engine, "reverse", [("in: hello\nout:", " olleh")])[0]
    assert sum(lp["token_logprobs"][len(ctx) : -1]) == pytest.approx(want, rel=tol, abs=tol)
    toks, tops = lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1]
    assert greedy and all(t == max(top.values()) for t, top in zip(toks, tops, strict=True))


@pytest.mark.parametrize("model", MODELS)
def test_lm_eval_accuracy_equals_offline(
    model: str,
    harness: dict[str, dict[str, Any]],
    offline: dict[tuple[str, str], TaskScore],
) -> None:
    results = harness[model]["results"]
    assert results[MC]["acc,none"] == offline[(model, MC)].accuracy
    assert results[GEN]["exact_match,none"] == offline[(model, GEN)].accuracy


@pytest.mark.parametrize("model", MODELS)
def test_lm_eval_loglikelihoods_equal_offline(
    model: str,
    harness: dict[str, dict[str, Any]],
    offline: dict[tuple[str, str], TaskScore],
    engine: Engine,
) -> None:
    """Every choice's (loglikelihood, is_greedy), read by lm_eval from the server's echoed
    `logprobs.token_logprobs[ctxlen:-1]` and `top_logprobs`, is the engine's."""
    samples, tol = _samples(harness[model], MC), _tol(engine)
    assert len(samples) == LIMIT
    for s, want in zip(samples, offline[(model, MC)].choice_scores, strict=True):
        got = [tuple(r[0]) for r in s["resps"]]
        word = s["doc"]["word"]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=tol, abs=tol), (
            word,
            s["doc"]["choices"],
        )
        assert [g for _, g in got] == [g for _, g in want], (word, s["doc"]["choices"])


@pytest.mark.parametrize("model", MODELS)
def test_lm_eval_generations_equal_offline(
    model: str,
    harness: dict[str, dict[str, Any]],
    offline: dict[tuple[str, str], TaskScore],
) -> None:
    """The very generated text (greedy, stopped at "\n" or EOS, the stop string cut)."""
    texts = [s["resps"][0][0] for s in _samples(harness[model], GEN)]
    assert texts == list(offline[(model, GEN)].predictions)


def test_adapter_beats_base(harness: dict[str, dict[str, Any]]) -> None:
    adapter, base = harness["reverse"]["results"], harness[DEMO]["results"]
    assert adapter[MC]["acc,none"] == 1.0 > base[MC]["acc,none"]
    assert adapter[GEN]["exact_match,none"] == 1.0 > base[GEN]["exact_match,none"]


def test_remote_tokenizer_backend_needs_no_local_tokenizer(
    base_url: str, offline: dict[tuple[str, str], TaskScore], tmp_path: Path
) -> None:
    """`tokenizer_backend=remote` tokenizes through the server's /tokenizer_info, /tokenize and
    /detokenize: the same scores without pointing lm_eval at the model directory."""
    limit = 5
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=reverse,base_url={base_url}/v1/completions,tokenizer_backend=remote",
        tasks=[MC],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert results is not None
    got = [[tuple(r[0]) for r in s["resps"]] for s in _samples(results, MC)]
    want = offline[("reverse", MC)].choice_scores[:limit]
    for g, w in zip(got, want, strict=True):
        assert [ll for ll, _ in g] == pytest.approx([ll for ll, _ in w], rel=1e-4, abs=1e-4)
        assert [greedy for _, greedy in g] == [greedy for _, greedy in w]
