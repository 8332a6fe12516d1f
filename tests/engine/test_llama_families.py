"""Llama, Mistral, Qwen2 and Qwen3 bases against transformers, their PEFT adapters against peft,
and the mixed-batch rule on the Llama path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.layout import LLAMA_LAYOUT
from hotlora.server.engine import Engine, EngineConfig, ModelLoadError, SamplingParams
from hotlora.server.engine.loader import load_model
from tests.helpers import (
    LLAMA_FAMILIES,
    VOCAB,
    hf_with_deu,
    make_hf_llama,
    make_peft_adapter,
    random_deu,
    random_prompts,
    save_deu,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 on CPU: same math, same order as transformers

# peft LoraConfig variants on the Llama projections, each reproduced exactly.
VARIANTS: dict[str, dict[str, Any]] = {
    "all_linear": {"target_modules": "all-linear", "r": 4, "lora_alpha": 8},
    "attn_patterns": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4, "lora_alpha": 4,
        "use_rslora": True, "rank_pattern": {"k_proj": 2, "layers.0.self_attn.q_proj": 8},
        "alpha_pattern": {"v_proj": 7.0},
    },
    "mlp_layers": {"target_modules": ["gate_proj", "up_proj", "down_proj"],
                   "layers_to_transform": [1], "r": 3, "lora_alpha": 6},
    "regex": {"target_modules": r".*\.layers\.[02]\.(self_attn\.v_proj|mlp\.down_proj)",
              "r": 2, "lora_alpha": 2},
}


@pytest.mark.parametrize("family", sorted(LLAMA_FAMILIES))
def test_logits_match_transformers(tmp_path: Path, family: str) -> None:
    hf = make_hf_llama(tmp_path, family)
    model, cfg = load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert cfg.layout is LLAMA_LAYOUT
    ids = torch.randint(0, VOCAB, (3, 37), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(37).expand(3, 37)
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(model.logits(model(ids, pos)), want, **TOL)


@pytest.mark.parametrize("family", sorted(LLAMA_FAMILIES))
def test_cached_greedy_generation_matches_transformers(tmp_path: Path, family: str) -> None:
    """Prompts of different lengths in one batch: prefill, GQA KV cache and decode per row."""
    hf = make_hf_llama(tmp_path, family)
    engine = Engine.from_pretrained(tmp_path, EngineConfig(max_batch=4, max_adapters=1, max_rank=4))
    assert engine.kv.k.shape[2] == LLAMA_FAMILIES[family]["num_key_value_heads"]
    prompts = random_prompts(4, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params=params), strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        assert out.token_ids == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_cast_to_the_engine_dtype(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    make_hf_llama(tmp_path, "qwen2-bias-tied", dtype=dtype)
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == dtype for t in on_disk.values())
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    for name, p in model.named_parameters():  # type: ignore[attr-defined]
        assert p.dtype == torch.float32
        key = name if name.startswith("lm_head") else f"model.{name}"
        assert torch.equal(p, on_disk[key].float())


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "one", "llama3-gqa2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    a, _ = load_model(tmp_path / "one", torch.device("cpu"), torch.float32)
    b, _ = load_model(tmp_path / "sharded", torch.device("cpu"), torch.float32)
    for (ka, pa), (kb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):  # type: ignore[attr-defined]
        assert ka == kb and torch.equal(pa, pb)


# ---------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("llama")
    return path, make_hf_llama(path, "llama3-gqa2")


@pytest.fixture(scope="module")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, base: tuple[Path, Any]
) -> dict[str, tuple[Path, Any]]:
    out = {}
    for i, (name, kwargs) in enumerate(sorted(VARIANTS.items())):
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_peft_adapter(base[1], path, seed=20 + i, **kwargs))
    return out


def _engine(base_dir: Path) -> Engine:
    return Engine.from_pretrained(base_dir, EngineConfig(max_batch=16, max_adapters=8, max_rank=8))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_logits_equal_peft(
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
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # the adapter must matter, or the comparison proves nothing
            assert (base[1](torch.tensor([p])).logits[0] - want).abs().max() > 1e-3


def test_deu_on_the_swiglu_gate_equals_the_reference(
    base: tuple[Path, Any], tmp_path: Path
) -> None:
    deu = random_deu(3, 96, seed=5, layout=LLAMA_LAYOUT)
    from hotlora.adapters.format import BaseShapes

    shapes = BaseShapes.llama(3, 64, 96, 4, 2, head_dim=24)
    path = save_deu(tmp_path / "deu", deu, shapes)
    engine = _engine(base[0])
    engine.add_adapter("deu", path)
    ref = hf_with_deu(base[1], deu)
    for p, g in zip(random_prompts(3), engine.prompt_logits(random_prompts(3), ["deu"] * 3),
                    strict=True):
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0]
            plain = base[1](torch.tensor([p])).logits[0]
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
        assert (want - plain).abs().max() > 1e-3  # the DEU part must matter


def test_mixed_batch_rows_equal_solo_rows_and_merged_equals_unmerged(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    from hotlora.adapters.format import BaseShapes

    shapes = BaseShapes.llama(3, 64, 96, 4, 2, head_dim=24)
    deu = random_deu(3, 96, seed=7, layout=LLAMA_LAYOUT)
    engine = _engine(base[0])
    for name, (path, _) in adapters.items():
        engine.add_adapter(name, path)
    engine.add_adapter("deu", save_deu(tmp_path / "deu", deu, shapes))
    both = save_deu(tmp_path / "both", deu, shapes, lora_dir=adapters["all_linear"][0], name="b")
    engine.add_adapter("lora+deu", both)
    names: list[str | None] = [None, *sorted(adapters), "deu", "lora+deu", "all_linear", None]
    prompts = random_prompts(len(names), seed=11)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    mixed = engine.generate(prompts, names, params)
    mixed_logits = engine.prompt_logits(prompts, names)
    for i, (p, n) in enumerate(zip(prompts, names, strict=True)):
        assert engine.generate([p], [n], params)[0].token_ids == mixed[i].token_ids
        # Tokens are equal; logits to rounding (the base GEMM's blocking depends on batch size).
        torch.testing.assert_close(engine.prompt_logits([p], [n])[0], mixed_logits[i], **TOL)
    engine.merge_adapter("lora+deu")
    merged = engine.prompt_logits(prompts, names)
    for got, want in zip(merged, mixed_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    engine.unmerge_adapter()
    for got, want in zip(engine.prompt_logits(prompts, names), mixed_logits, strict=True):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------- refusals


def _edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gemma"}, r"'gemma' is not supported \(one of \['gpt2', 'llama'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
         r"rope_scaling type 'yarn' is not supported \(one of \('default', 'linear', 'llama3'\)"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs 'factor'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"hidden_size": None}, "missing field 'hidden_size'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"intermediate_size": 100}, r"mlp.gate_proj.weight has shape \(96, 64\), config implies"),
        ({"bos_token_id": [1, 2]}, "bos_token_id must be an int"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a positive number"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
         "needs 'low_freq_factor'"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    make_hf_llama(tmp_path, "llama3-gqa2")
    _edit_config(tmp_path, **changes)
    with pytest.raises(ModelLoadError, match=message):
        Engine.from_pretrained(tmp_path)


def test_missing_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    make_hf_llama(tmp_path, "qwen3-qknorm")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.self_attn.k_norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing \['layers.2.self_attn.k_norm.weight'\]"):
        Engine.from_pretrained(tmp_path)


def test_untied_config_on_a_tied_checkpoint_is_refused_naming_the_head(tmp_path: Path) -> None:
    make_hf_llama(tmp_path, "qwen2-bias-tied")
    _edit_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(ModelLoadError, match=r"missing \['lm_head.weight'\]"):
        Engine.from_pretrained(tmp_path)


def test_mistral_sliding_window_below_the_context_is_refused(tmp_path: Path) -> None:
    make_hf_llama(tmp_path, "mistral-gqa4")
    _edit_config(tmp_path, sliding_window=64)
    with pytest.raises(ModelLoadError, match="sliding_window=64 is smaller than the served"):
        Engine.from_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, EngineConfig(max_seq_len=64))
    assert engine.max_seq_len == 64  # a window at or above the served context is ignored


def test_pickle_checkpoint_refused(tmp_path: Path) -> None:
    make_hf_llama(tmp_path, "qwen2-bias-tied")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        Engine.from_pretrained(tmp_path)


def test_gpt2_adapter_is_refused_by_a_llama_base(base: tuple[Path, Any], tmp_path: Path) -> None:
    from hotlora.adapters.errors import AdapterError
    from tests.helpers import make_hf_model

    gpt2 = make_hf_model(tmp_path / "gpt2")
    make_peft_adapter(gpt2, tmp_path / "a")
    with pytest.raises(AdapterError, match="matches none of hotlora's target modules"):
        _engine(base[0]).add_adapter("a", tmp_path / "a")


def _edit_adapter(src: Path, dst: Path, config: dict[str, Any] | None = None,
                  tensors: Any = None) -> Path:
    """A copy of an adapter dir with config fields overridden and tensors transformed."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text()) | (config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(src / "adapter_model.safetensors")
    save_file(tensors(state) if tensors else state, dst / "adapter_model.safetensors")
    return dst


def _nan_first(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    return state


def _narrow_q(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k in sorted(state) if "q_proj.lora_A" in k)
    state[key] = state[key][:, :-8].contiguous()  # trained for a narrower hidden size
    return state


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "all"}, None, "only 'none' is supported"),
        ({"mystery_field": 3}, None, "unknown field"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, None, "also matches 'model.embed_tokens'"),
        ({"target_modules": ["c_attn"]}, None, "matches none of hotlora's target modules"),
        (None, _nan_first, "NaN or Inf"),
        (None, _narrow_q, r"shape \(4, 56\) does not fit; expected \(4, 64\)"),
    ],
)
def test_llama_adapter_refusals_name_the_field(
    adapters: dict[str, tuple[Path, Any]], base: tuple[Path, Any], tmp_path: Path,
    config: dict[str, Any] | None, tensors: Any, message: str,
) -> None:
    from hotlora.adapters.errors import AdapterError

    bad = _edit_adapter(adapters["all_linear"][0], tmp_path / "bad", config, tensors)
    engine = _engine(base[0])
    with pytest.raises(AdapterError, match=message):
        engine.add_adapter("bad", bad)
    assert engine.adapters == [] and engine.free_slots == 8  # nothing changed


def test_llama_pickle_only_adapter_is_refused(base: tuple[Path, Any], tmp_path: Path) -> None:
    from hotlora.adapters.errors import AdapterError

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(AdapterError, match="never unpickles"):
        _engine(base[0]).add_adapter("p", tmp_path / "p")


# bf16 engine vs the fp32 engine, same adapters, at a stated tolerance (bf16 keeps 8 mantissa
# bits; 3 layers of rounding gave a largest difference of 0.074 here), and rows of a mixed
# batch equal their solo rows' tokens.
BF16_TOL = {"rtol": 0.05, "atol": 0.15}


def test_bf16_engine_matches_fp32_and_mixed_rows_equal_solo(
    base: tuple[Path, Any], adapters: dict[str, tuple[Path, Any]]
) -> None:
    engines = {
        dtype: Engine.from_pretrained(
            base[0], EngineConfig(max_batch=16, max_adapters=8, max_rank=8, dtype=dtype)
        )
        for dtype in ("float32", "bfloat16")
    }
    for engine in engines.values():
        for name, (path, _) in adapters.items():
            engine.add_adapter(name, path)
    names: list[str | None] = [None, *sorted(adapters), "all_linear"]
    prompts = random_prompts(len(names), seed=13)
    want = engines["float32"].prompt_logits(prompts, names)
    bf16 = engines["bfloat16"]
    got = bf16.prompt_logits(prompts, names)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **BF16_TOL)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    mixed = bf16.generate(prompts, names, params)
    for p, n, m in zip(prompts, names, mixed, strict=True):
        assert bf16.generate([p], [n], params)[0].token_ids == m.token_ids


def test_every_eos_id_of_generation_config_ends_a_request(tmp_path: Path) -> None:
    make_hf_llama(tmp_path, "qwen3-qknorm")
    engine = Engine.from_pretrained(tmp_path, EngineConfig(max_batch=2, max_adapters=1))
    prompt = random_prompts(1, seed=17)[0]
    free = engine.generate([prompt], params=SamplingParams(max_tokens=12, temperature=0.0,
                                                            ignore_eos=True))[0].token_ids
    checked = 0
    for i, stop_id in ((2, free[2]), (4, free[4])):
        if stop_id in free[:i] or VOCAB - 1 in free[:i]:
            continue  # an earlier occurrence would stop first; nothing to check at i
        checked += 1
        gen = {"eos_token_id": [VOCAB - 1, stop_id]}  # the list's second id must stop it too
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
        engine = Engine.from_pretrained(tmp_path, EngineConfig(max_batch=2, max_adapters=1))
        assert stop_id in engine.eos_token_ids
        out = engine.generate([prompt], params=SamplingParams(max_tokens=12, temperature=0.0))[0]
        assert out.finish_reason == "stop" and out.token_ids == free[:i]
    assert checked, f"the seeded output {free} repeats too early to test with"


def test_null_fields_mean_their_defaults(tmp_path: Path) -> None:
    """Mistral-style configs write "head_dim": null; transformers then derives the default."""
    hf = make_hf_llama(tmp_path, "llama-linear-mha-tied")  # 4 KV heads of 16 = the defaults
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg |= {"head_dim": None, "num_key_value_heads": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, spec = load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert (spec.head_dim, spec.n_kv_head) == (16, 4)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(model.logits(model(ids, torch.arange(9)[None])), want, **TOL)


def test_adapters_for_layers_past_48_load_on_a_deep_base(tmp_path: Path) -> None:
    """An 80-layer base (Llama 3 70B's depth): its adapters are checked at its own depth."""
    from hotlora.adapters.format import BaseShapes, load_lora_adapter, write_adapter_dir

    shapes = BaseShapes.llama(80, 8, 16, 2, 1)
    key = "base_model.model.model.layers.70.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)}
    for targets in (r"model\.layers\.70\.self_attn\.q_proj", ["model.layers.70.self_attn.q_proj"]):
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": targets}
        write_adapter_dir(tmp_path / "deep", config, tensors)
        adapter = load_lora_adapter(tmp_path / "deep", name="deep", base=shapes, max_rank=2)
        assert [(m.layer, m.target) for m in adapter.modules] == [(70, "self_attn.q_proj")]



@pytest.mark.parametrize(
    ("family", "changes", "max_seq_len", "refused"),
    [
        # Mistral without the key: transformers' 4096 window, honoured up to a 4096 context.
        ("mistral-gqa4", {"sliding_window": None, "max_position_embeddings": 8192}, 4096, False),
        ("mistral-gqa4", {"sliding_window": None, "max_position_embeddings": 8192}, 4097, True),
        # Qwen2 windows only with use_sliding_window, on layers from max_window_layers on.
        ("qwen2-bias-tied", {"use_sliding_window": True, "sliding_window": 64,
                             "max_window_layers": 1, "layer_types": None}, 128, True),
        ("qwen2-bias-tied", {"use_sliding_window": True, "sliding_window": 64,
                             "max_window_layers": 2, "layer_types": None}, 128, False),
        ("qwen2-bias-tied", {"use_sliding_window": False, "sliding_window": 64}, 128, False),
    ],
)
def test_sliding_window_defaults_follow_transformers(
    tmp_path: Path, family: str, changes: dict[str, Any], max_seq_len: int, refused: bool
) -> None:
    make_hf_llama(tmp_path, family)
    _edit_config(tmp_path, **changes)  # a None value removes the key
    config = EngineConfig(max_batch=1, max_adapters=1, max_seq_len=max_seq_len)
    if refused:
        with pytest.raises(ModelLoadError, match="is smaller than the served context"):
            Engine.from_pretrained(tmp_path, config)
    else:
        assert Engine.from_pretrained(tmp_path, config).max_seq_len == max_seq_len


def test_null_numbers_mean_their_defaults(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path, "qwen2-bias-tied")  # rms_norm_eps 1e-6 and theta 1e6 on disk
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rms_norm_eps"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, spec = load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert spec.rms_norm_eps == 1e-6  # type: ignore[attr-defined]
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(model.logits(model(ids, torch.arange(9)[None])), want, **TOL)
