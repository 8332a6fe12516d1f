"""A Hugging Face model directory -> a frozen model of its family on the chosen device and dtype.

Reads config.json (the family comes from model_type) and model.safetensors or a sharded
model.safetensors.index.json, in fp32, fp16 or bf16, cast to the engine's dtype. Every tensor
the family expects must be there with its exact shape; nothing else may be. Pickle
checkpoints are never unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from server.engine.errors import ModelLoadError
from server.engine.models import GPT2, CausalLM, Family, Llama, ModelSpec, family_of

log = logging.getLogger(__name__)

_PICKLE_FILES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")
_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: {path.name} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw


def read_config(model_dir: Path) -> tuple[Family, ModelSpec]:
    """The family and its validated config, from config.json."""
    raw = read_json(model_dir / "config.json")
    family = family_of(raw)
    return family, cast(ModelSpec, family.config(raw, model_dir.resolve().name))


def _shards(model_dir: Path) -> list[Path]:
    single, index = model_dir / "model.safetensors", model_dir / _INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: weight_map must be a non-empty object")
        if not all(isinstance(n, str) for n in weight_map.values()):
            raise ModelLoadError(f"{index}: every weight_map value must be a shard file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise ModelLoadError(f"{index}: shard {name!r} must be a file name in {model_dir}")
            if not (model_dir / name).is_file():
                raise ModelLoadError(f"{index}: shard {name} is missing")
        return [model_dir / n for n in names]
    pickles = [p for p in _PICKLE_FILES if (model_dir / p).exists()]
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: only a pickle checkpoint ({pickles[0]}) was found; hotlora never "
            "unpickles weights: convert it to model.safetensors (safetensors format)"
        )
    raise ModelLoadError(f"{model_dir}: neither model.safetensors nor {_INDEX} found")


def read_state_dict(model_dir: Path, family: Family, cfg: ModelSpec) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under hotlora's names (family prefixes and buffers dropped)."""
    state: dict[str, torch.Tensor] = {}
    for path in _shards(model_dir):
        try:
            raw = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from e
        for key, tensor in raw.items():
            ours = family.key(key, cfg)
            if ours is not None:
                if ours in state:
                    raise ModelLoadError(f"{model_dir}: {key} appears twice")
                state[ours] = family.tensor(ours, tensor)
    return state


def load_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[CausalLM, ModelSpec]:
    """Build the model from config.json + its safetensors, checking every key and shape."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory")
    family, cfg = read_config(model_dir)
    state = read_state_dict(model_dir, family, cfg)
    with torch.device("meta"):
        model = family.model(cfg)
    params = model.state_dict()  # meta tensors: names and shapes
    expected = {k: tuple(p.shape) for k, p in params.items()}
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ModelLoadError(
            f"{model_dir}: checkpoint does not match config.json: missing {missing[:5]}, "
            f"unexpected {unknown[:5]}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            # Both shapes in the checkpoint's own layout (GPT-2 holds its Conv1D weights
            # transposed; family.tensor is its own inverse).
            got, want = (tuple(family.tensor(key, t).shape) for t in (state[key], params[key]))
            raise ModelLoadError(f"{model_dir}: {key} has shape {got}, config implies {want}")
        if not state[key].is_floating_point():
            raise ModelLoadError(f"{model_dir}: {key} has non-float dtype {state[key].dtype}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False).eval()
    with torch.no_grad():
        cast(CausalLM, model).fuse_projections()
    log.info("loaded %s (%s): %d layers on %s/%s", cfg.name, cfg.layout.family, cfg.n_layer,
             device, dtype)
    return cast(CausalLM, model), cfg


def save_model(model: GPT2 | Llama, model_dir: str | Path) -> None:
    """Write model.safetensors + config.json in the family's Hugging Face layout."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.hf_state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.cfg.to_hf_dict()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
