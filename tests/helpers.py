"""Test builders: tiny random GPT-2 checkpoints made by transformers, adapters made by peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hotlora.adapters.demo_tasks import build_tokenizer

VOCAB = 257  # the demo byte-level tokenizer, so every test model can also decode text


def make_hf_model(
    path: Path,
    *,
    n_embd: int = 48,
    n_layer: int = 2,
    n_head: int = 4,
    bare_keys: bool = False,
    seed: int = 0,
    **extra: Any,
) -> Any:
    """A random GPT2LMHeadModel saved with save_pretrained (safetensors) + the demo tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=96,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=256,
        eos_token_id=256,
        **extra,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a wrong layout cannot pass
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if bare_keys:  # the original gpt2 upload's layout: no "transformer." prefix
        f = path / "model.safetensors"
        state = {k.removeprefix("transformer."): v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})
    build_tokenizer().save(str(path / "tokenizer.json"))
    return model


def make_peft_adapter(hf_model: Any, path: Path, seed: int = 1, **lora_kwargs: Any) -> Any:
    """Wrap a copy of hf_model with a peft LoRA (random non-zero A and B) and save it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]}
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(path)
    return peft_model


def random_deu(
    n_layer: int,
    d_ff: int,
    *,
    seed: int,
    layers: tuple[int, ...] | None = None,
    group_size: int = 1,
    gain: float = 0.5,
    layout: Any = None,
) -> Any:
    """load_tests/common.py's random DEU adapter, for the base the tests call "test-base"."""
    from common import random_deu as make

    return make(
        n_layer,
        d_ff,
        seed=seed,
        layers=layers,
        group_size=group_size,
        gain=gain,
        base_name="test-base",
        layout=layout,
    )


def save_deu(
    path: Path, deu: Any, base: Any, lora_dir: Path | None = None, name: str = "deu"
) -> Path:
    """Write a DEU (or, with the PEFT LoRA directory `lora_dir`, a LoRA+DEU) adapter dir."""
    from hotlora.adapters.adapter import Adapter, save_adapter
    from hotlora.adapters.format import load_lora_adapter

    lora = None
    if lora_dir is not None:
        lora = load_lora_adapter(lora_dir, name=name, base=base, max_rank=64)
    save_adapter(path, Adapter(name, lora, deu))
    return path


def hf_with_deu(model: Any, deu: Any) -> Any:
    """A copy of an HF GPT-2 or Llama-family model (or PeftModel) whose MLP activations add
    gain * D(h), D from the independent textbook reference (kernels.reference), not from the code
    under test."""
    import copy

    from hotlora.kernels.reference import deu_unit_reference

    model = copy.deepcopy(model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers
    for layer in deu.config.layers:
        params = deu.neuron_params(layer)  # (6, d_ff)

        def hook(_: Any, inputs: tuple[torch.Tensor], out: torch.Tensor, p: Any = params) -> Any:
            return out + p[5] * deu_unit_reference(inputs[0], p)

        mlp = blocks[layer].mlp
        (mlp.act if hasattr(mlp, "act") else mlp.act_fn).register_forward_hook(hook)
    return model


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n byte-token prompts of 3-13 tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(k),), generator=gen).tolist()
        for k in torch.randint(3, 14, (n,), generator=gen)
    ]


# Odd Llama-family shapes: GQA group sizes 1, 2 and 4, head_dim != hidden / heads, scaled RoPE,
# tied and untied heads, Qwen2's q/k/v biases, Qwen3's q/k norms, 2-5 layers.
LLAMA_FAMILIES: dict[str, dict[str, Any]] = {
    "llama3-gqa2": {
        "model_type": "llama", "num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 24,
        "rope_theta": 500000.0, "attention_bias": True, "mlp_bias": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    },
    "llama-linear-mha-tied": {
        "model_type": "llama", "num_hidden_layers": 2, "num_key_value_heads": 4,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True,
    },
    "mistral-gqa4": {"model_type": "mistral", "num_hidden_layers": 4, "num_key_value_heads": 1,
                     "sliding_window": 4096},
    "qwen2-bias-tied": {"model_type": "qwen2", "num_hidden_layers": 2, "num_key_value_heads": 2,
                        "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen3-qknorm": {"model_type": "qwen3", "num_hidden_layers": 5, "num_key_value_heads": 2,
                     "head_dim": 20},
}


def make_hf_llama(path: Path, family: str, seed: int = 0, dtype: Any = None) -> Any:
    """A random Llama/Mistral/Qwen2/Qwen3 CausalLM (LLAMA_FAMILIES[family]) saved with
    save_pretrained + the demo tokenizer; norms and biases perturbed so no layout error hides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(LLAMA_FAMILIES[family])
    cfg = AutoConfig.for_model(
        kw.pop("model_type"), vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_attention_heads=4, max_position_embeddings=128, bos_token_id=None,
        eos_token_id=256, **kw,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p) if "norm" in name or name.endswith("bias") else 0)
    if dtype is not None:
        model.to(dtype).save_pretrained(path)
        model.float()
    else:
        model.save_pretrained(path)
    build_tokenizer().save(str(path / "tokenizer.json"))
    return model
