"""The base model against transformers' GPT2LMHeadModel, the independent reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotlora.server.engine import Engine, EngineConfig, ModelLoadError, SamplingParams
from hotlora.server.engine.loader import load_model
from tests.helpers import VOCAB, make_hf_model

CONFIGS = {
    "default": {},
    "odd_heads_bare_keys": {"n_embd": 45, "n_head": 3, "n_layer": 3, "bare_keys": True},
    "gelu_inner_scaled": {
        "n_layer": 3,
        "activation_function": "gelu",
        "n_inner": 80,
        "scale_attn_by_inverse_layer_idx": True,
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    hf = make_hf_model(tmp_path, **CONFIGS[name])
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(17).expand(3, 17)
    with torch.no_grad():
        want = hf(ids).logits
    got = model.logits(model(ids, pos))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cached_generation_matches_transformers_greedy(tmp_path: Path) -> None:
    """Prompts of different lengths in one batch: prefill, KV cache and decode per row."""
    hf = make_hf_model(tmp_path, n_layer=3)
    engine = Engine.from_pretrained(tmp_path, EngineConfig(max_batch=4, max_adapters=1, max_rank=4))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 11, 1, 8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params=params)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        assert out.token_ids == ref[0, len(prompt) :].tolist()
        assert out.finish_reason == "length"


def test_more_prompts_than_rows_rows_start_and_finish_at_different_steps(tmp_path: Path) -> None:
    make_hf_model(tmp_path)
    engine = Engine.from_pretrained(tmp_path, EngineConfig(max_batch=2, max_adapters=1, max_rank=4))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    lengths = [3, 9, 5, 2]
    outs = engine.generate(
        prompts,
        params=[SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths],
    )
    solo = [
        engine.generate([p], params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[
            0
        ]
        for p, n in zip(prompts, lengths, strict=True)
    ]
    assert [len(o.token_ids) for o in outs] == lengths
    assert [o.token_ids for o in outs] == [s.token_ids for s in solo]
    assert engine.kv.free_rows == 2 and not engine.has_unfinished()


def test_pickle_checkpoint_refused_naming_safetensors(tmp_path: Path) -> None:
    make_hf_model(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        Engine.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "corrupt",
    ["missing_config", "bad_json", "truncated_weights", "wrong_shape", "no_tokenizer", "not_a_dir"],
)
def test_bad_model_dirs_raise_model_load_error(tmp_path: Path, corrupt: str) -> None:
    from safetensors.torch import load_file, save_file

    make_hf_model(tmp_path)
    target = tmp_path
    if corrupt == "missing_config":
        (tmp_path / "config.json").unlink()
    elif corrupt == "bad_json":
        (tmp_path / "config.json").write_text("{not json")
    elif corrupt == "truncated_weights":
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif corrupt == "wrong_shape":
        state = load_file(tmp_path / "model.safetensors")
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:, :10].contiguous()
        save_file(state, tmp_path / "model.safetensors")
    elif corrupt == "no_tokenizer":
        (tmp_path / "tokenizer.json").unlink()
    else:
        target = tmp_path / "model.safetensors"
    with pytest.raises(ModelLoadError):
        Engine.from_pretrained(target)


def test_conv1d_weights_run_transposed_and_save_back_bit_exact(tmp_path: Path) -> None:
    """GPT-2's [in, out] projection weights are held [out, in] (contiguous, the fast GEMM
    layout) and written back in the checkpoint's layout: a load-save round trip is bit-exact."""
    from safetensors.torch import load_file

    from hotlora.server.engine.loader import save_model

    hf = make_hf_model(tmp_path / "src", n_embd=45, n_head=3, n_inner=80)
    model, _ = load_model(tmp_path / "src", torch.device("cpu"), torch.float32)
    for name, conv in hf.transformer.h[1].named_modules():
        if name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            ours = model.get_submodule(f"h.1.{name}").weight
            assert ours.is_contiguous() and torch.equal(ours, conv.weight.T), name
    save_model(model, tmp_path / "dst")  # type: ignore[arg-type]
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    dst = load_file(str(tmp_path / "dst" / "model.safetensors"))
    src = {k: v for k, v in src.items() if k in dst}  # buffers and the tied head are not ours
    assert src.keys() == dst.keys() and len(dst) == 4 + 12 * 2
    for key, tensor in dst.items():
        assert tensor.shape == src[key].shape and torch.equal(tensor, src[key]), key


def test_conv1d_shape_mismatch_names_the_checkpoint_layout(tmp_path: Path) -> None:
    """A wrong-shaped Conv1D weight is reported as the checkpoint stores it ([in, out]), not in
    the transposed layout hotlora holds it in."""
    import json

    make_hf_model(tmp_path, n_embd=48, n_head=3, n_inner=80)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_inner": 96}))
    with pytest.raises(
        ModelLoadError, match=r"h.0.mlp.c_fc.weight has shape \(48, 80\), config implies \(48, 96\)"
    ):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
