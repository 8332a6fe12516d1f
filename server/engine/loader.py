"""A Hugging Face model directory -> a frozen model of its family on the chosen device and dtype.

Reads config.json (the family comes from model_type) and model.safetensors or a sharded
model.safetensors.index.json, in fp32, fp16 or bf16, cast to the engine's dtype. Every tensor
the family expects must be there with its exact shape; nothing else may be. Pickle
checkpoints are never unpickled. `check_checkpoint` makes the same checks from the safetensors
headers alone (no weights read), so a server refuses a broken model before it starts anything.

A ModelLoadError's message is "<what is wrong>; <what to do>" where this module knows the fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hotlora.server.engine.errors import ModelLoadError
from hotlora.server.engine.models import (
    FAMILIES,
    GPT2,
    CausalLM,
    Family,
    Llama,
    ModelSpec,
    family_of,
)

log = logging.getLogger(__name__)

_PICKLE_FILES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")
_INDEX = "model.safetensors.index.json"
_MODEL_DIR = (
    "point --model at a Hugging Face model directory: config.json, model.safetensors and the "
    "tokenizer files"
)
_REEXPORT = "re-download or re-export the model"
# safetensors header dtypes -> torch (only whether a tensor is floating point matters here)
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                  "BF16": torch.bfloat16}


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
    if not model_dir.is_dir():
        what = "is not a directory" if model_dir.exists() else "does not exist"
        raise ModelLoadError(f"model directory {model_dir} {what}; {_MODEL_DIR}")
    path = model_dir / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{model_dir} has no config.json; {_MODEL_DIR}")
    raw = read_json(path)
    model_type = raw.get("model_type", "gpt2")  # GPT-2 configs predate the field
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} is not supported (one of {sorted(FAMILIES)}); "
            "serve a model of one of these families"
        )
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
    raise ModelLoadError(f"{model_dir}: neither model.safetensors nor {_INDEX} found; {_MODEL_DIR}")


def read_state_dict(model_dir: Path, family: Family, cfg: ModelSpec) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under hotlora's names (family prefixes and buffers dropped)."""
    state: dict[str, torch.Tensor] = {}
    for path in _shards(model_dir):
        try:
            raw = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(
                f"{path}: not a readable safetensors file ({e}); {_REEXPORT}"
            ) from e
        for key, tensor in raw.items():
            ours = family.key(key, cfg)
            if ours is not None:
                if ours in state:
                    raise ModelLoadError(f"{model_dir}: {key} appears twice; {_REEXPORT}")
                state[ours] = family.tensor(ours, tensor)
    return state


def _header_state(model_dir: Path, family: Family, cfg: ModelSpec) -> dict[str, torch.Tensor]:
    """`read_state_dict` from the safetensors headers alone: meta tensors of the right shapes
    and dtypes, no weight read."""
    state: dict[str, torch.Tensor] = {}
    for path in _shards(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                    ours = family.key(key, cfg)
                    if ours is None:
                        continue
                    if ours in state:
                        raise ModelLoadError(f"{model_dir}: {key} appears twice; {_REEXPORT}")
                    info = f.get_slice(key)
                    dtype = _HEADER_DTYPES.get(info.get_dtype(), torch.int8)
                    meta = torch.empty(info.get_shape(), dtype=dtype, device="meta")
                    state[ours] = family.tensor(ours, meta)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(
                f"{path}: not a readable safetensors file ({e}); {_REEXPORT}"
            ) from e
    return state


def _check_state(
    model_dir: Path, family: Family, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """Every tensor the model has (`params`) is in `state` with its shape and a float dtype,
    and nothing else is."""
    missing = sorted(set(params) - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        parts = [f"missing {missing[:5]}"] if missing else []
        parts += [f"unexpected {unknown[:5]}"] if unknown else []
        raise ModelLoadError(
            f"{model_dir}: checkpoint does not match config.json: {', '.join(parts)}; {_REEXPORT}"
        )
    for key, param in params.items():
        if tuple(state[key].shape) != tuple(param.shape):
            # Both shapes in the checkpoint's own layout (GPT-2 holds its Conv1D weights
            # transposed; family.tensor is its own inverse).
            got, want = (tuple(family.tensor(key, t).shape) for t in (state[key], param))
            raise ModelLoadError(
                f"{model_dir}: {key} has shape {got}, config implies {want}; {_REEXPORT}"
            )
        if not state[key].is_floating_point():
            raise ModelLoadError(
                f"{model_dir}: {key} has non-float dtype {state[key].dtype}; {_REEXPORT}"
            )


def check_checkpoint(model_dir: str | Path) -> tuple[Family, ModelSpec]:
    """The checks of `load_model` (config.json, every tensor's name, shape and dtype) from the
    safetensors headers only: milliseconds, even for a large model."""
    model_dir = Path(model_dir)
    family, cfg = read_config(model_dir)
    state = _header_state(model_dir, family, cfg)
    with torch.device("meta"):
        model = family.model(cfg)
    _check_state(model_dir, family, model.state_dict(), state)
    return family, cfg


def load_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[CausalLM, ModelSpec]:
    """Build the model from config.json + its safetensors, checking every key and shape."""
    model_dir = Path(model_dir)
    family, cfg = read_config(model_dir)
    state = read_state_dict(model_dir, family, cfg)
    with torch.device("meta"):
        model = family.model(cfg)
    _check_state(model_dir, family, model.state_dict(), state)  # meta params: names, shapes
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
