"""Decode steps from captured graphs (server/engine/cuda_graphs.py) against eager steps.

Without a GPU the graph path runs with a capture that replays by calling the recorded step
again: it then reads every input from the same static block a CUDA graph would, so a step that
kept any per-step tensor outside that block (a stale meta, mask or index) would go wrong here as
it would on a GPU. The gpu-marked test captures real CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.format import BaseShapes
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from hotlora.server.engine.cuda_graphs import Capture, batch_buckets, replay_by_calling
from hotlora.server.engine.loader import load_model
from hotlora.server.engine.tokenizer import load_tokenizer
from tests.helpers import (
    make_hf_llama,
    make_hf_model,
    make_peft_adapter,
    random_deu,
    random_prompts,
    save_deu,
)

N_LAYER, N_EMBD = 2, 32
TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32: decode_attention's sums against SDPA's


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("graphs")
    hf = make_hf_model(root / "base", n_layer=N_LAYER, n_embd=N_EMBD, n_head=4)
    make_peft_adapter(hf, root / "lora", seed=3)
    make_peft_adapter(hf, root / "lora2", seed=4)
    deu = random_deu(N_LAYER, 4 * N_EMBD, seed=5)
    save_deu(root / "deu", deu, BaseShapes.gpt2(N_LAYER, N_EMBD))
    save_deu(root / "lora+deu", deu, BaseShapes.gpt2(N_LAYER, N_EMBD), root / "lora", "lora+deu")
    return root


def _engine(
    base: Path, capture: Capture | None, device: str = "cpu", dtype: Any = torch.float32
) -> Engine:
    config = EngineConfig(max_batch=8, max_adapters=6, max_rank=8, cuda_graphs=capture is not None)
    model, _ = load_model(base, torch.device(device), dtype)
    return Engine(model, load_tokenizer(base), config, base, graph_capture=capture)


def _generate(engine: Engine, names: list[str | None], seed: int) -> list[tuple[list, list]]:
    """Each row's (token ids, logprobs); rows end at different steps, so the batch shrinks
    through several buckets."""
    prompts = random_prompts(len(names), seed=seed)
    ids = []
    for i, (p, n) in enumerate(zip(prompts, names, strict=True)):
        params = SamplingParams(max_tokens=2 + 3 * i, temperature=0.0, ignore_eos=True, logprobs=3)
        ids.append(engine.add_request(p, n, params))
    got: dict[str, tuple[list, list]] = {r: ([], []) for r in ids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id][0].extend(o.new_token_ids)
            got[o.request_id][1].extend(o.logprobs)
    return [got[r] for r in ids]


def _assert_same(graphed: list[tuple[list, list]], eager: list[tuple[list, list]]) -> None:
    for (g_ids, g_lps), (e_ids, e_lps) in zip(graphed, eager, strict=True):
        assert g_ids == e_ids
        assert len(g_lps) == len(e_lps) == len(e_ids)
        for lg, le in zip(g_lps, e_lps, strict=True):
            assert lg.token_id == le.token_id
            torch.testing.assert_close(lg.logprob, le.logprob, **TOL)


def test_buckets_are_powers_of_two_and_the_max() -> None:
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)


def test_graph_decode_equals_eager_over_mixed_adapters_and_shrinking_batches(
    gpt2_dir: Path,
) -> None:
    names = [None, "lora", "deu", "lora+deu", "lora2", None, "lora"]
    results = []
    for capture in (None, replay_by_calling):
        engine = _engine(gpt2_dir / "base", capture)
        for name in ("lora", "lora2", "deu", "lora+deu"):
            engine.add_adapter(name, gpt2_dir / name)
        results.append(_generate(engine, names, seed=1))
    graphs = engine.graphs
    assert graphs is not None
    # 7 rows pad to 8, then shrink through 4, 2 and 1; the adapters change the variant.
    assert graphs.replays > 0 and graphs.captures >= 4
    _assert_same(results[1], results[0])


def test_base_only_steps_use_the_graph_without_adapter_ops(gpt2_dir: Path) -> None:
    eager = _generate(_engine(gpt2_dir / "base", None), [None] * 3, seed=2)
    engine = _engine(gpt2_dir / "base", replay_by_calling)
    _assert_same(_generate(engine, [None] * 3, seed=2), eager)
    assert engine.graphs is not None and engine.graphs.replays > 0
    assert {variant for _, variant in engine.graphs._graphs} == {(False, False, False)}


def test_merging_in_place_keeps_the_graphs_and_serves_like_eager(gpt2_dir: Path) -> None:
    names = ["lora", None, "lora2", "lora"]
    results = []
    for capture in (None, replay_by_calling):
        engine = _engine(gpt2_dir / "base", capture)
        engine.add_adapter("lora", gpt2_dir / "lora")
        engine.add_adapter("lora2", gpt2_dir / "lora2")
        _generate(engine, names, seed=3)  # graphs captured against the pristine weights
        weight = engine.model.target(0, 0).weight
        engine.merge_adapter("lora")
        assert engine.model.target(0, 0).weight is weight  # merged in place: graphs stay valid
        merged = _generate(engine, names, seed=4)
        engine.unmerge_adapter()
        results.append((merged, _generate(engine, names, seed=5)))
    for graphed, eager in zip(results[1], results[0], strict=True):
        _assert_same(graphed, eager)


def test_padding_rows_write_only_the_scratch_row(gpt2_dir: Path) -> None:
    engine = _engine(gpt2_dir / "base", replay_by_calling)
    engine.add_adapter("lora", gpt2_dir / "lora")
    prompts = random_prompts(3, seed=6)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, "lora", params)
    engine.step()  # prefill: rows 0-2
    free = slice(3, engine.kv.max_rows)  # rows 3..7: free; the 3-row decode pads to 4
    k_free, v_free = engine.kv.k[:, free].clone(), engine.kv.v[:, free].clone()
    scratch = engine.kv.scratch_row
    assert scratch == engine.kv.max_rows
    k_scratch = engine.kv.k[:, scratch].clone()
    engine.step()
    assert engine.graphs is not None and engine.graphs.replays == 1
    assert torch.equal(engine.kv.k[:, free], k_free) and torch.equal(engine.kv.v[:, free], v_free)
    assert not torch.equal(engine.kv.k[:, scratch], k_scratch)


@pytest.mark.parametrize("family", ["llama3-gqa2", "mistral-gqa4"])
def test_graph_decode_on_grouped_query_llamas(family: str, tmp_path: Path) -> None:
    make_hf_llama(tmp_path / "base", family, seed=1)
    results = []
    for capture in (None, replay_by_calling):
        engine = _engine(tmp_path / "base", capture)
        results.append(_generate(engine, [None] * 5, seed=7))
    assert engine.graphs is not None and engine.graphs.replays > 0
    _assert_same(results[1], results[0])


def test_a_failed_capture_serves_those_steps_eagerly(gpt2_dir: Path) -> None:
    def failing(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")

    eager = _generate(_engine(gpt2_dir / "base", None), [None] * 3, seed=8)
    engine = _engine(gpt2_dir / "base", failing)
    _assert_same(_generate(engine, [None] * 3, seed=8), eager)
    graphs = engine.graphs
    assert graphs is not None and graphs.captures == graphs.replays == 0
    assert graphs._graphs and all(g is None for g in graphs._graphs.values())  # tried once each


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graphs_decode_like_the_eager_cuda_engine(gpt2_dir: Path, dtype: torch.dtype) -> None:
    from hotlora.server.engine.cuda_graphs import cuda_capture

    names = [None, "lora", "deu", "lora+deu", "lora2", None, "lora"]
    results = []
    for graphs in (False, True):
        capture = cuda_capture(torch.device("cuda")) if graphs else None
        engine = _engine(gpt2_dir / "base", capture, device="cuda", dtype=dtype)
        for name in ("lora", "lora2", "deu", "lora+deu"):
            engine.add_adapter(name, gpt2_dir / name)
        results.append(_generate(engine, names, seed=1))
        engine.merge_adapter("lora")
        results.append(_generate(engine, names, seed=2))
    assert engine.graphs is not None and engine.graphs.replays > 0
    for graphed, eager in ((results[2], results[0]), (results[3], results[1])):
        agree = sum(g[0] == e[0] for g, e in zip(graphed, eager, strict=True))
        # Half precision: another attention kernel may flip a near-tie; most rows must agree.
        assert agree >= len(names) - 1, agree


@pytest.mark.gpu
def test_cuda_graphs_on_a_grouped_query_llama(tmp_path: Path) -> None:
    from hotlora.server.engine.cuda_graphs import cuda_capture

    make_hf_llama(tmp_path / "base", "llama3-gqa2", seed=1)
    results = []
    for graphs in (False, True):
        capture = cuda_capture(torch.device("cuda")) if graphs else None
        engine = _engine(tmp_path / "base", capture, device="cuda", dtype=torch.float32)
        results.append(_generate(engine, [None] * 5, seed=7))
    assert engine.graphs is not None and engine.graphs.replays > 0
    _assert_same(results[1], results[0])
