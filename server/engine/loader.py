"""Hugging Face GPT-2 directory -> a frozen `GPT2` on the chosen device and dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from server.engine.config import ModelConfig
from server.engine.errors import ModelLoadError
from server.engine.model import GPT2

log = logging.getLogger(__name__)

# Causal-mask buffers some checkpoints carry: not weights.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PICKLE_FILES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")


def _strip(key: str) -> str:
    for prefix in ("transformer.", "model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under hotlora's names (no `transformer.` prefix, no buffers)."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        pickles = [p for p in _PICKLE_FILES if (model_dir / p).exists()]
        if pickles:
            raise ModelLoadError(
                f"{model_dir}: only a pickle checkpoint ({pickles[0]}) was found; hotlora never "
                "unpickles weights: convert it to model.safetensors (safetensors format)"
            )
        raise ModelLoadError(f"{model_dir}: model.safetensors not found")
    try:
        raw = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from e
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.endswith(_BUFFER_SUFFIXES) or key == "lm_head.weight":
            continue  # lm_head is tied to wte
        state[_strip(key)] = tensor
    return state


def load_gpt2(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[GPT2, ModelConfig]:
    """Build the model from config.json + model.safetensors, checking every shape."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory")
    cfg = ModelConfig.from_file(model_dir / "config.json", name=model_dir.resolve().name)
    state = read_state_dict(model_dir)
    with torch.device("meta"):
        model = GPT2(cfg)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ModelLoadError(
            f"{model_dir}: checkpoint does not match config.json: missing {missing[:5]}, "
            f"unexpected {unknown[:5]}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ModelLoadError(
                f"{model_dir}: {key} has shape {tuple(state[key].shape)}, config implies {shape}"
            )
        if not state[key].is_floating_point():
            raise ModelLoadError(f"{model_dir}: {key} has non-float dtype {state[key].dtype}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False).eval()
    log.info(
        "loaded %s: %d layers, d=%d, on %s/%s", cfg.name, cfg.n_layer, cfg.n_embd, device, dtype
    )
    return model, cfg


def save_gpt2(model: GPT2, model_dir: str | Path) -> None:
    """Write model.safetensors + config.json in the Hugging Face GPT-2 layout."""
    import json

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {
        f"transformer.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()
    }
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    c = model.cfg
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "activation_function": c.activation_function,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": True,
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
