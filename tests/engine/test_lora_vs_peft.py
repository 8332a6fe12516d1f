"""hotlora's LoRA math against peft's PeftModel, and the mixed-batch rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from tests.helpers import make_hf_model, make_peft_adapter, random_prompts

# Each is a peft LoraConfig variant hotlora must reproduce exactly.
VARIANTS: dict[str, dict[str, Any]] = {
    "all_targets": {"target_modules": ["c_attn", "c_proj", "c_fc"]},
    "subset": {"target_modules": ["c_attn"], "r": 2, "lora_alpha": 3},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4},
    "patterns": {
        "r": 4,
        "rank_pattern": {"c_fc": 2, "h.0.attn.c_attn": 8},
        "alpha_pattern": {"c_proj": 5.0},
    },
    "layers_to_transform": {"layers_to_transform": [1], "target_modules": ["c_attn", "c_fc"]},
    "regex": {"target_modules": r".*\.(1|2)\.mlp\.c_proj"},
}
TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32 on CPU


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("base")
    return path, make_hf_model(path, n_layer=3, n_embd=48, n_head=4)


@pytest.fixture(scope="module")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, base: tuple[Path, Any]
) -> dict[str, tuple[Path, Any]]:
    out = {}
    for i, (name, kwargs) in enumerate(sorted(VARIANTS.items())):
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_peft_adapter(base[1], path, seed=10 + i, **kwargs))
    return out


def _engine(base_dir: Path) -> Engine:
    return Engine.from_pretrained(base_dir, EngineConfig(max_batch=16, max_adapters=8, max_rank=8))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_peft(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]], variant: str
) -> None:
    path, peft_model = adapters[variant]
    engine = _engine(base[0])
    engine.add_adapter(variant, path)
    prompts = random_prompts(3)
    got = engine.prompt_logits(prompts, [variant] * 3)
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = peft_model(torch.tensor([p])).logits[0]
        torch.testing.assert_close(g, want, **TOL)
    # and the adapter really changes the output (a no-op adapter would pass the check above)
    with torch.no_grad():
        plain = base[1](torch.tensor([prompts[0]])).logits[0]
    assert (got[0] - plain).abs().max() > 1e-2


def test_mixed_batch_rows_equal_solo_rows(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engine = _engine(base[0])
    names = sorted(VARIANTS)
    for name in names:
        engine.add_adapter(name, adapters[name][0])
    rows: list[str | None] = [None, *names, None, *names[:3]]  # base rows interleaved, repeats
    prompts = random_prompts(len(rows), seed=3)
    mixed = engine.prompt_logits(prompts, rows)
    for p, a, m in zip(prompts, rows, mixed, strict=True):
        torch.testing.assert_close(m, engine.prompt_logits([p], [a])[0], **TOL)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    batch = engine.generate(prompts, rows, params)
    for p, a, out in zip(prompts, rows, batch, strict=True):
        assert out.token_ids == engine.generate([p], [a], params)[0].token_ids


def test_mixed_batch_greedy_equals_peft_generate(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engine = _engine(base[0])
    names = ["all_targets", "rslora", "patterns", "regex"]
    for name in names:
        engine.add_adapter(name, adapters[name][0])
    prompts = random_prompts(4, seed=5)
    outs = engine.generate(
        prompts, names, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    for p, name, out in zip(prompts, names, outs, strict=True):
        with torch.no_grad():
            ref = adapters[name][1].generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.token_ids == ref[0, len(p) :].tolist()


def test_merged_adapter_rows_equal_unmerged(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engine = _engine(base[0])
    names = ["all_targets", "patterns", "subset"]
    for name in names:
        engine.add_adapter(name, adapters[name][0])
    rows: list[str | None] = ["all_targets", None, "patterns", "all_targets", "subset", None]
    prompts = random_prompts(len(rows), seed=7)
    before = engine.prompt_logits(prompts, rows)
    pristine = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.merge_adapter("all_targets")
    assert engine.merged_adapter == "all_targets"
    changed = [k for k, v in engine.model.state_dict().items() if not torch.equal(v, pristine[k])]
    assert changed, "merging must change the target weights"
    merged = engine.prompt_logits(prompts, rows)
    for b, m in zip(before, merged, strict=True):
        torch.testing.assert_close(m, b, rtol=1e-4, atol=2e-4)
    engine.unmerge_adapter()
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, pristine[k]), f"{k} not restored bit-exactly"
    assert all(
        torch.equal(a, b) for a, b in zip(engine.prompt_logits(prompts, rows), before, strict=True)
    )


def test_removed_adapter_frees_slot_and_rejected_adapter_changes_nothing(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    from hotlora.adapters.errors import AdapterError

    engine = _engine(base[0])
    engine.add_adapter("a", adapters["all_targets"][0])
    prompts = random_prompts(2, seed=9)
    before = engine.prompt_logits(prompts, ["a", None])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        (adapters["rslora"][0] / "adapter_config.json").read_text()
    )
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError):
        engine.add_adapter("b", bad)
    assert engine.adapters == ["a"]
    after = engine.prompt_logits(prompts, ["a", None])
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    engine.remove_adapter("a")
    assert engine.adapters == [] and engine.free_slots == engine.config.max_adapters
