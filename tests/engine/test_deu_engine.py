"""DEU and LoRA+DEU adapters in the engine: against transformers (+ peft) with the activation
replaced by an independent reference, the identity at gain 0, and the mixed-batch rule across
all four row kinds (base, LoRA, DEU, LoRA+DEU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import BaseShapes
from hotlora.server.engine import Engine, EngineConfig, EngineError, SamplingParams
from tests.helpers import (
    hf_with_deu,
    make_hf_model,
    make_peft_adapter,
    random_deu,
    random_prompts,
    save_deu,
)

N_LAYER, N_EMBD = 3, 48
D_FF = 4 * N_EMBD
BASE = BaseShapes.gpt2(N_LAYER, N_EMBD)
TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32 on CPU against an fp32 HF forward

# name -> (DEU layers, group_size, with a LoRA part)
VARIANTS: dict[str, tuple[tuple[int, ...] | None, int, bool]] = {
    "deu": (None, 1, False),
    "deu-grouped": (None, 4, False),
    "deu-layer-subset": ((1,), 1, False),
    "lora+deu": ((0, 2), 1, True),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("base")
    return path, make_hf_model(path, n_layer=N_LAYER, n_embd=N_EMBD, n_head=4)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, base: tuple[Path, Any]) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("lora")
    return path, make_peft_adapter(base[1], path, seed=3)


@pytest.fixture(scope="module")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, lora: tuple[Path, Any]
) -> dict[str, tuple[Path, Any]]:
    """name -> (directory, DEUAdapter)."""
    out = {}
    for i, (name, (layers, k, with_lora)) in enumerate(sorted(VARIANTS.items())):
        deu = random_deu(N_LAYER, D_FF, seed=20 + i, layers=layers, group_size=k)
        path = tmp_path_factory.mktemp(name)
        out[name] = (save_deu(path, deu, BASE, lora[0] if with_lora else None, name), deu)
    return out


def _engine(base_dir: Path) -> Engine:
    return Engine.from_pretrained(base_dir, EngineConfig(max_batch=16, max_adapters=8, max_rank=8))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_hf_with_reference_activation(
    variant: str,
    base: tuple[Path, Any],
    lora: tuple[Path, Any],
    adapters: dict[str, tuple[Path, Any]],
) -> None:
    path, deu = adapters[variant]
    reference = hf_with_deu(lora[1] if VARIANTS[variant][2] else base[1], deu)
    engine = _engine(base[0])
    engine.add_adapter(variant, path)
    prompts = random_prompts(4, seed=1)
    got = engine.prompt_logits(prompts, [variant] * len(prompts))
    with torch.no_grad():
        for ids, logits in zip(prompts, got, strict=True):
            want = reference(torch.tensor([ids])).logits[0]  # (n, V)
            torch.testing.assert_close(logits, want, **TOL)


def test_zero_gain_is_the_base_model_exactly(base: tuple[Path, Any], tmp_path: Path) -> None:
    deu = random_deu(N_LAYER, D_FF, seed=5)
    for p in deu.params.values():
        p[5].zero_()
    engine = _engine(base[0])
    engine.add_adapter("zero", save_deu(tmp_path / "zero", deu, BASE))
    prompts = random_prompts(3, seed=2)
    plain = engine.prompt_logits(prompts)
    adapted = engine.prompt_logits(prompts, ["zero"] * len(prompts))
    for a, b in zip(plain, adapted, strict=True):
        assert torch.equal(a, b)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, [None, "zero", "zero"], params)
    assert [o.token_ids for o in outs] == [
        o.token_ids for o in engine.generate(prompts, None, params)
    ]


def _mixed_engine(base_dir: Path, lora_dir: Path, adapters: dict[str, tuple[Path, Any]]) -> Engine:
    engine = _engine(base_dir)
    engine.add_adapter("lora", lora_dir)
    for name, (path, _) in adapters.items():
        engine.add_adapter(name, path)
    return engine


def test_mixed_batch_of_all_four_kinds_equals_each_row_alone(
    base: tuple[Path, Any], lora: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engine = _mixed_engine(base[0], lora[0], adapters)
    kinds = [None, "lora", "deu", "lora+deu", "deu-grouped", "deu-layer-subset"]
    names = [kinds[i % len(kinds)] for i in range(12)]
    prompts = random_prompts(len(names), seed=3)
    mixed = engine.prompt_logits(prompts, names)
    for p, name, got in zip(prompts, names, mixed, strict=True):
        (solo,) = engine.prompt_logits([p], [name])
        torch.testing.assert_close(got, solo, rtol=1e-5, atol=1e-5)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    together = engine.generate(prompts, names, params)
    for p, name, out in zip(prompts, names, together, strict=True):
        (alone,) = engine.generate([p], [name], params)
        assert out.token_ids == alone.token_ids, name


def test_merged_lora_deu_serves_like_unmerged_and_deu_alone_cannot_merge(
    base: tuple[Path, Any], lora: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engine = _mixed_engine(base[0], lora[0], adapters)
    names = [None, "lora+deu", "deu", "lora", "lora+deu"]
    prompts = random_prompts(len(names), seed=4)
    before = engine.prompt_logits(prompts, names)
    engine.merge_adapter("lora+deu")
    after = engine.prompt_logits(prompts, names)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    engine.unmerge_adapter()
    with pytest.raises(EngineError, match="no LoRA part"):
        engine.merge_adapter("deu")
    assert engine.merged_adapter is None


def test_a_refused_deu_adapter_changes_nothing(base: tuple[Path, Any], tmp_path: Path) -> None:
    engine = _engine(base[0])
    wrong = random_deu(N_LAYER, D_FF // 2, seed=6)  # trained for a narrower MLP
    path = save_deu(tmp_path / "wrong", wrong, BaseShapes.gpt2(N_LAYER, N_EMBD // 2))
    free = engine.free_slots
    with pytest.raises(AdapterError, match="does not fit"):
        engine.add_adapter("wrong", path)
    assert engine.free_slots == free and engine.adapters == []


def test_removing_a_deu_adapter_frees_its_slot_for_the_next_one(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engine = Engine.from_pretrained(base[0], EngineConfig(max_batch=4, max_adapters=1))
    engine.add_adapter("a", adapters["deu"][0])
    (with_a,) = engine.prompt_logits([[1, 2, 3]], ["a"])
    engine.remove_adapter("a")
    engine.add_adapter("b", adapters["deu-layer-subset"][0])
    (with_b,) = engine.prompt_logits([[1, 2, 3]], ["b"])
    fresh = _engine(base[0])
    fresh.add_adapter("b", adapters["deu-layer-subset"][0])
    (want,) = fresh.prompt_logits([[1, 2, 3]], ["b"])
    # b covers layer 1 only: a's planes in layers 0 and 2 must be gone, not left behind.
    assert torch.equal(with_b, want) and not torch.allclose(with_a, with_b)
    assert engine.adapter_kinds() == {"b": "deu"}
