"""hotlora's adapter format against peft as the independent reference, in both directions."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotlora.adapters.format import LoRAAdapter, load_lora_adapter, save_lora_adapter
from hotlora.adapters.lora_config import TARGETS
from tests.adapters.conftest import BASE, peft_adapter, peft_lora_modules, tiny_gpt2

# peft LoraConfig kwargs; each must be matched module-for-module, tensor-for-tensor.
VARIANTS: dict[str, dict[str, Any]] = {
    "list": {"target_modules": ["c_attn", "c_proj", "c_fc"]},
    "subset": {"target_modules": ["c_attn"], "r": 2, "lora_alpha": 3},
    "c_proj_both": {"target_modules": ["c_proj"]},
    "dotted": {"target_modules": ["mlp.c_proj", "attn.c_attn"]},
    "regex": {"target_modules": r".*\.(0|2)\.(attn\.c_attn|mlp\.c_fc)"},
    "all_linear": {"target_modules": "all-linear", "r": 2},
    "rslora": {"target_modules": ["c_attn", "c_fc"], "use_rslora": True, "r": 8, "lora_alpha": 4},
    "patterns": {
        "target_modules": ["c_attn", "c_proj", "c_fc"], "r": 4,
        "rank_pattern": {"c_fc": 2, "h.0.attn.c_attn": 6, r"h\.2\.attn\.c_proj": 1},
        "alpha_pattern": {"c_proj": 5.0, r"transformer\.h\.1\.mlp\.c_fc": 7},
    },
    "rslora_patterns": {
        "target_modules": ["c_attn", "c_fc"], "use_rslora": True, "r": 4,
        "rank_pattern": {"c_fc": 3}, "alpha_pattern": {"h.1.attn.c_attn": 2.5},
    },
    "layers": {"target_modules": ["c_attn", "mlp.c_proj"], "layers_to_transform": [0, 2]},
    "layer_int_pattern": {"target_modules": ["c_fc"], "layers_to_transform": 1,
                          "layers_pattern": "h"},
    "layer_empty_pattern": {"target_modules": ["c_attn"], "layers_to_transform": [1],
                            "layers_pattern": ""},
    "layer_no_match_pattern": {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1],
                               "layers_pattern": ["layers", "h"]},
    # An exact module name bypasses layers_to_transform in peft.
    "exact_name": {"target_modules": ["transformer.h.1.mlp.c_fc", "c_attn"],
                   "layers_to_transform": [0]},
    "exclude": {"target_modules": ["c_attn", "c_proj"], "exclude_modules": ["h.1.attn.c_proj"]},
    "exclude_regex": {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*\.2\..*"},
    "bare": {"target_modules": ["c_attn", "c_fc"], "bare": True},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    out = {}
    for i, (name, kwargs) in enumerate(sorted(VARIANTS.items())):
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, peft_adapter(path, seed=100 + i, **kwargs))
    return out


def _load(path: Path, name: str = "x") -> LoRAAdapter:
    return load_lora_adapter(path, name=name, base=BASE, max_rank=8)


def _prefix(variant: str) -> str:
    return "" if VARIANTS[variant].get("bare") else "transformer."


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_matches_peft(saved: dict[str, tuple[Path, Any]], variant: str) -> None:
    path, model = saved[variant]
    adapter = _load(path)
    wrapped = peft_lora_modules(model)
    prefix = _prefix(variant)
    got = {f"{prefix}h.{m.layer}.{m.target}": m for m in adapter.modules}
    assert set(got) == set(wrapped)
    assert [(m.layer, m.target) for m in adapter.modules] == sorted(
        (m.layer, m.target) for m in adapter.modules)
    for name, layer in wrapped.items():
        m = got[name]
        assert torch.equal(m.A, layer.lora_A["default"].weight)
        assert torch.equal(m.B, layer.lora_B["default"].weight)
        assert m.A.dtype == torch.float32 and m.A.is_contiguous() and m.B.is_contiguous()
        assert m.scaling == layer.scaling["default"]
        assert m.rank == layer.r["default"]
    assert adapter.rank == max(layer.r["default"] for layer in wrapped.values())
    assert adapter.size_bytes == 4 * sum(m.A.numel() + m.B.numel() for m in adapter.modules)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matching_rules_agree_with_peft(saved: dict[str, tuple[Path, Any]], variant: str) -> None:
    """targets()/rank_for()/scaling_for() on every module name of the model, not just targets."""
    path, model = saved[variant]
    config = _load(path).config
    wrapped = peft_lora_modules(model)
    names = [n.removeprefix("base_model.model.") for n, _ in model.named_modules()]
    names = [n for n in names if n and ".lora_" not in n and ".base_layer" not in n
             and not n.endswith(".lora_dropout")]
    assert any(n.endswith(".ln_1") for n in names)
    for n in names:
        assert config.targets(n) == (n in wrapped), n
    for n, layer in wrapped.items():
        assert config.rank_for(n) == layer.r["default"]
        assert config.scaling_for(n) == layer.scaling["default"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_adapter_loads_in_peft(
    saved: dict[str, tuple[Path, Any]], variant: str, tmp_path: Path
) -> None:
    from peft import PeftModel

    path, model = saved[variant]
    save_lora_adapter(tmp_path / "out", _load(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(
            tiny_gpt2(bare=bool(VARIANTS[variant].get("bare"))), tmp_path / "out").eval()
    ref, got = peft_lora_modules(model), peft_lora_modules(reloaded)
    assert set(got) == set(ref)
    for name, layer in ref.items():
        assert torch.equal(got[name].lora_A["default"].weight, layer.lora_A["default"].weight)
        assert torch.equal(got[name].lora_B["default"].weight, layer.lora_B["default"].weight)
        assert got[name].scaling["default"] == layer.scaling["default"]
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        out_ref, out_got = model(input_ids=ids)[0], reloaded(input_ids=ids)[0]
    assert torch.equal(out_got, out_ref)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hotlora_round_trip_is_exact(
    saved: dict[str, tuple[Path, Any]], variant: str, tmp_path: Path
) -> None:
    first = _load(saved[variant][0])
    save_lora_adapter(tmp_path / "a", first)
    second = _load(tmp_path / "a")
    assert second.config == first.config
    assert second.config.to_dict() == first.config.to_dict()
    assert len(second.modules) == len(first.modules)
    for m1, m2 in zip(first.modules, second.modules, strict=True):
        assert (m1.layer, m1.target, m1.scaling) == (m2.layer, m2.target, m2.scaling)
        assert torch.equal(m1.A, m2.A) and torch.equal(m1.B, m2.B)
    save_lora_adapter(tmp_path / "b", second)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_saved_config_keeps_peft_fields(saved: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    path = saved["patterns"][0]
    original = json.loads((path / "adapter_config.json").read_text())
    save_lora_adapter(tmp_path, _load(path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    # Everything peft wrote survives; only target_modules' order may differ (peft saves a set).
    assert set(written["target_modules"]) == set(original.pop("target_modules"))
    assert {k: written[k] for k in original} == original
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["bias"] == "none"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_precision_load_as_float32(
    saved: dict[str, tuple[Path, Any]], dtype: torch.dtype, tmp_path: Path
) -> None:
    path = saved["list"][0]
    state = load_file(path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_bytes((path / "adapter_config.json").read_bytes())
    save_file({k: v.to(dtype) for k, v in state.items()}, tmp_path / "adapter_model.safetensors")
    adapter = _load(tmp_path)
    for m in adapter.modules:
        key = f"base_model.model.transformer.h.{m.layer}.{m.target}"
        assert m.A.dtype == torch.float32 and m.B.dtype == torch.float32
        assert torch.equal(m.A, state[f"{key}.lora_A.weight"].to(dtype).float())
        assert torch.equal(m.B, state[f"{key}.lora_B.weight"].to(dtype).float())


def test_adapter_named_keys_are_accepted(
    saved: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    """A raw PeftModel.state_dict() dump keeps the adapter name: '...lora_A.default.weight'."""
    path, model = saved["subset"]
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert all(".default.weight" in k for k in state)
    (tmp_path / "adapter_config.json").write_bytes((path / "adapter_config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "adapter_model.safetensors")
    got, want = _load(tmp_path), _load(path)
    for m1, m2 in zip(got.modules, want.modules, strict=True):
        assert torch.equal(m1.A, m2.A) and torch.equal(m1.B, m2.B)


@pytest.mark.parametrize("variant", ["velora", "monteclora", "mica_init"])
def test_variants_with_plain_inference_math_load(variant: str, tmp_path: Path) -> None:
    """VeLoRA/MonteCLoRA carry training-only tensors; their eval forward is plain LoRA."""
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    kwargs: dict[str, Any] = {
        "velora": {"velora_config": VeloraConfig(num_groups=4)},
        "monteclora": {"monteclora_config": MontecloraConfig()},
        "mica_init": {"init_lora_weights": "mica"},
    }[variant]
    model = peft_adapter(tmp_path, seed=7, target_modules=["c_attn"], **kwargs)
    adapter = _load(tmp_path)
    wrapped = peft_lora_modules(model)
    assert {f"transformer.h.{m.layer}.{m.target}" for m in adapter.modules} == set(wrapped)
    for m in adapter.modules:
        layer = wrapped[f"transformer.h.{m.layer}.{m.target}"]
        assert torch.equal(m.A, layer.lora_A["default"].weight)
        assert torch.equal(m.B, layer.lora_B["default"].weight)


def test_from_dict_accepts_programmatic_config() -> None:
    """The form the trainer builds: dotted target names, alpha as float."""
    from hotlora.adapters.lora_config import LoRAConfig

    cfg = LoRAConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 6.0,
                                "target_modules": list(TARGETS)}, adapter="t")
    assert all(cfg.targets(f"transformer.h.5.{t}") for t in TARGETS)
    assert not cfg.targets("lm_head")
    assert cfg.scaling_for("transformer.h.0.attn.c_attn") == 1.5
    assert cfg.to_dict()["lora_alpha"] == 6.0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"use_dora": True}, "use_dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
])
def test_peft_made_unsupported_adapters_refused(
    kwargs: dict[str, Any], field: str, tmp_path: Path
) -> None:
    from hotlora.adapters.errors import AdapterError

    peft_adapter(tmp_path, seed=3, target_modules=["c_attn"], **kwargs)
    with pytest.raises(AdapterError, match=field) as info:
        _load(tmp_path)
    assert info.value.field == field
