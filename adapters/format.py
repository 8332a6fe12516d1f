"""Load and save PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Everything an adapter file claims is checked against the config and the base model before any
tensor data is read, so a refused adapter costs a header parse, not a load. Pickle checkpoints
(adapter_model.bin) are never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.layout import GPT2_LAYOUT, LLAMA_LAYOUT, ModuleLayout, gpt2_dims, llama_dims
from hotlora.adapters.lora_config import LoRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# PEFT saves without the adapter name; a raw PeftModel.state_dict() dump keeps ".default".
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight")
# Training-only state of VeLoRA / MonteCLoRA; eval-mode forward does not read it.
_TRAINING_STATE_RE = {
    "velora_config": re.compile(r"base_model\.model\..+\.lora_velora_embed(?:\.default)?"),
    "monteclora_config": re.compile(r"base_model\.model\..+\.lora_monteclora_sampler\..+"),
}
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_OTHER_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                 "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "C64": 8}
# Sub-byte dtypes safetensors knows (their byte size is not checked; they are never read).
_PACKED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")
_TORCH_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_MAX_CONFIG = 1024 * 1024


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: the family's module names, layer count, (d_in, d_out) per
    target."""

    n_layer: int
    dims: Mapping[str, tuple[int, int]]
    layout: ModuleLayout = GPT2_LAYOUT

    @classmethod
    def gpt2(cls, n_layer: int, n_embd: int, n_inner: int | None = None) -> BaseShapes:
        """The shapes of a GPT-2 block stack (n_inner defaults to 4 * n_embd, as in GPT2Config)."""
        return cls(n_layer, gpt2_dims(n_embd, n_inner or 4 * n_embd))

    @classmethod
    def llama(
        cls, n_layer: int, hidden: int, intermediate: int, n_head: int, n_kv_head: int,
        head_dim: int | None = None,
    ) -> BaseShapes:
        """The shapes of a Llama-family block stack (Llama, Mistral, Qwen2, Qwen3). head_dim
        defaults to hidden // n_head as in Llama; pass Qwen3's (its config default is 128)."""
        hd = head_dim or hidden // n_head
        return cls(n_layer, llama_dims(hidden, intermediate, n_head * hd, n_kv_head * hd),
                   LLAMA_LAYOUT)

    @property
    def d_ff(self) -> int:
        """Neurons per MLP layer: what a DEU adapter's per-layer parameters must cover."""
        return self.dims[self.layout.ff_target][1]


@dataclass(frozen=True)
class LoRAModule:
    """One adapted projection: y += scaling * (x @ A.T) @ B.T."""

    layer: int
    target: str
    A: Tensor  # (r, d_in) float32, contiguous
    B: Tensor  # (d_out, r) float32, contiguous
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class LoRAAdapter:
    name: str
    config: LoRAConfig
    modules: tuple[LoRAModule, ...]  # sorted by (layer, target)
    # Module-name prefix of the file's keys: the family's LM-head prefix ("transformer.",
    # "model.") or "" (bare model). Kept so a saved adapter loads back into the same peft class;
    # None means the family's LM-head prefix.
    key_prefix: str | None = None

    @property
    def prefix(self) -> str:
        return self.config.layout.model_prefix if self.key_prefix is None else self.key_prefix

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules), default=0)

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules for t in (m.A, m.B))


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header; start/stop are absolute byte offsets in the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def load_lora_adapter(
    path: str | os.PathLike[str], *, name: str, base: BaseShapes, max_rank: int
) -> LoRAAdapter:
    """Load a PEFT LoRA adapter directory; raise AdapterError for anything hotlora cannot serve."""
    raw, weights = read_adapter_dir(path, name)
    return lora_from_file(raw, read_header(weights, name), weights, name=name, base=base,
                          max_rank=max_rank)


def read_adapter_dir(path: str | os.PathLike[str], name: str) -> tuple[Any, Path]:
    """The parsed adapter_config.json of an adapter directory and its safetensors file's path."""
    root = Path(path)
    if not root.exists():
        raise AdapterError(name, f"adapter path {str(root)!r} does not exist", "path")
    if not root.is_dir():
        raise AdapterError(name, f"adapter path {str(root)!r} is not a directory", "path")
    raw = read_config(root / CONFIG_NAME, name)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        if (root / PICKLE_NAME).exists():
            raise AdapterError(
                name, f"only {PICKLE_NAME} (a pickle) is present; hotlora loads only "
                f"safetensors and never unpickles: re-save as {WEIGHTS_NAME}", PICKLE_NAME)
        raise AdapterError(name, f"{WEIGHTS_NAME} is missing", WEIGHTS_NAME)
    return raw, weights


def lora_from_file(
    raw: Any, entries: list[Entry], weights: Path, *, name: str, base: BaseShapes, max_rank: int
) -> LoRAAdapter:
    """The LoRA adapter a PEFT config and the LoRA tensors of a safetensors file describe."""
    config = LoRAConfig.from_dict(raw, name, base.layout, base.n_layer)
    prefix, plan = _plan(entries, config, name, base, max_rank)
    by_key = {e.key: e for e in entries}
    tensors = read_tensors(weights, name, [by_key[k] for pair in plan.values() for k in pair])
    modules = []
    for (layer, target), (a_key, b_key) in sorted(plan.items()):
        module_name = base.layout.module_name(prefix, layer, target)
        modules.append(LoRAModule(layer, target, tensors[a_key], tensors[b_key],
                                  config.scaling_for(module_name)))
    return LoRAAdapter(name, config, tuple(modules), key_prefix=prefix)


def save_lora_adapter(path: str | os.PathLike[str], adapter: LoRAAdapter) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout, creating the dir."""
    write_adapter_dir(path, adapter.config.to_dict(), lora_tensors(adapter))


def lora_tensors(adapter: LoRAAdapter) -> dict[str, Tensor]:
    """The adapter's PEFT-keyed float32 CPU tensors, checked against its config."""
    name, config = adapter.name, adapter.config
    prefix = _save_layout(adapter)
    tensors: dict[str, Tensor] = {}
    for m in adapter.modules:
        module_name = config.layout.module_name(prefix, m.layer, m.target)
        r = config.rank_for(module_name)
        if m.A.dim() != 2 or m.B.dim() != 2 or m.A.shape[0] != r or m.B.shape[1] != r:
            raise AdapterError(name, f"{module_name}: A {tuple(m.A.shape)} / B "
                               f"{tuple(m.B.shape)} do not have the config's rank {r}", "modules")
        expected = config.scaling_for(module_name)
        # The file stores no scaling: it is re-derived from the config on load.
        if not math.isclose(m.scaling, expected, rel_tol=1e-9, abs_tol=0.0):
            raise AdapterError(name, f"{module_name}: scaling {m.scaling} differs from the "
                               f"config's {expected}", "scaling")
        key = f"base_model.model.{module_name}"
        # clone: safetensors refuses tensors that share storage (e.g. views of a packed buffer).
        a = m.A.detach().to("cpu", torch.float32).clone()  # (r, d_in)
        b = m.B.detach().to("cpu", torch.float32).clone()  # (d_out, r)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    return tensors


def write_adapter_dir(
    path: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> None:
    """Write adapter_config.json + adapter_model.safetensors, creating the directory.

    Each file is written to a temporary name and renamed, so a crash or a concurrent load never
    sees a half-written file.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(root / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    # Serialized here and written by Python: safetensors' save_file creates its file 0600.
    blob = save(dict(tensors), metadata={"format": "pt"})
    _atomic_write(root / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(blob))


def _atomic_write(target: Path, write: Callable[[str], object]) -> None:
    # A plain unique name rather than mkstemp, whose 0600 mode would survive the rename.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_layout(adapter: LoRAAdapter) -> str:
    """Check that the config targets every module under the adapter's key layout: PEFT
    re-derives the module set from the config on load, so anything else would not round-trip."""
    prefix, layout = adapter.prefix, adapter.config.layout
    if prefix not in layout.prefixes:
        raise AdapterError(adapter.name, f"must be one of {layout.prefixes}, got {prefix!r}",
                           "key_prefix")
    for m in adapter.modules:
        module_name = layout.module_name(prefix, m.layer, m.target)
        if m.target not in layout.targets or not adapter.config.targets(module_name):
            raise AdapterError(adapter.name, f"the config does not target {module_name!r}",
                               "target_modules")
    return prefix


def read_config(path: Path, name: str) -> Any:
    if not path.is_file():
        raise AdapterError(name, f"{CONFIG_NAME} is missing", CONFIG_NAME)
    try:
        if path.stat().st_size > _MAX_CONFIG:
            raise AdapterError(name, f"larger than {_MAX_CONFIG} bytes", CONFIG_NAME)
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(name, f"cannot be read as JSON: {e}", CONFIG_NAME) from e


def read_header(path: Path, name: str) -> list[Entry]:
    """Parse and sanity-check the safetensors header without touching tensor data."""

    def bad(why: str) -> AdapterError:
        return AdapterError(name, f"corrupt safetensors file: {why}", WEIGHTS_NAME)

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise bad(f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise AdapterError(name, f"cannot be read: {e}", WEIGHTS_NAME) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    data_size = size - 8 - n
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            if not (isinstance(info, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())):
                raise bad("__metadata__ is not an object of strings")
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(isinstance(o, int) for o in info["data_offsets"])):
            raise bad(f"malformed header entry for {key!r}")
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        itemsize = _FLOAT_DTYPES.get(dtype) or _OTHER_DTYPES.get(dtype)
        if itemsize is None and dtype not in _PACKED_DTYPES:
            raise bad(f"unknown dtype {dtype!r} of {key!r}")
        if not 0 <= begin <= end <= data_size or (
            itemsize is not None and end - begin != math.prod(shape) * itemsize
        ):
            raise bad(f"data offsets of {key!r} do not match its shape or the file size")
        entries.append(Entry(key, dtype, shape, 8 + n + begin, 8 + n + end))
    # What safetensors itself requires: the tensors tile the data exactly, without gaps or
    # overlaps (read_tensors reads the bytes directly, so this is checked here).
    position = 8 + n
    for entry in sorted(entries, key=lambda x: (x.start, x.stop)):
        if entry.start != position:
            raise bad(f"data of {entry.key!r} does not start where the previous tensor ends")
        position = entry.stop
    if position != size:
        raise bad(f"the tensors cover {position - 8 - n} of the {data_size} data bytes")
    return entries


def _plan(
    entries: list[Entry], config: LoRAConfig, name: str, base: BaseShapes, max_rank: int
) -> tuple[str, dict[tuple[int, str], tuple[str, str]]]:
    """Map every tensor key to (layer, target) and check it against config and base shapes.

    Returns the key layout's module prefix and (layer, target) -> (lora_A key, lora_B key).
    """
    skip = [pattern for field, pattern in _TRAINING_STATE_RE.items()
            if config.raw.get(field) is not None]
    layout = base.layout
    module_re = layout.module_re
    halves: dict[tuple[int, str], dict[str, Entry]] = {}
    prefixes: set[str] = set()
    for e in entries:
        if any(p.fullmatch(e.key) for p in skip):
            continue
        m = _KEY_RE.fullmatch(e.key)
        mm = module_re.fullmatch(m.group("module")) if m else None
        if m is None or mm is None:
            raise AdapterError(name, "tensor key maps to no hotlora module (expected "
                               f"base_model.model.[{layout.model_prefix}]{layout.blocks}.{{i}}."
                               "{target}.lora_{A,B}.weight)", e.key)
        layer, target, prefix = int(mm.group("layer")), mm.group("target"), mm.group("prefix") or ""
        module_name = m.group("module")
        if target not in layout.targets:
            raise AdapterError(name, f"target {target!r} is not one of {layout.targets}", e.key)
        if layer >= base.n_layer:
            raise AdapterError(name, f"layer {layer} is beyond the base's {base.n_layer} layers",
                               e.key)
        if not config.targets(module_name):
            raise AdapterError(name, f"the config does not target {module_name!r}", e.key)
        prefixes.add(prefix)
        if len(prefixes) > 1:
            raise AdapterError(name, f"keys mix the {layout.model_prefix}{layout.blocks} and bare "
                               f"{layout.blocks} layouts", e.key)
        half = halves.setdefault((layer, target), {})
        if m.group("ab") in half:
            raise AdapterError(name, f"duplicate lora_{m.group('ab')} for {module_name!r}", e.key)
        half[m.group("ab")] = e

    if not halves:
        raise AdapterError(name, "contains no LoRA tensors", WEIGHTS_NAME)
    prefix = prefixes.pop()
    for module_name, layer, target in layout.iter_targets(prefix, base.n_layer):
        if config.targets(module_name) and (layer, target) not in halves:
            raise AdapterError(name, f"the config targets {module_name!r} but the file has no "
                               "tensors for it (adapter trained for a different base?)",
                               "target_modules")

    plan: dict[tuple[int, str], tuple[str, str]] = {}
    for (layer, target), half in halves.items():
        module_name = layout.module_name(prefix, layer, target)
        if "A" not in half:
            raise AdapterError(name, "lora_B without its lora_A", half["B"].key)
        if "B" not in half:
            raise AdapterError(name, "lora_A without its lora_B", half["A"].key)
        a, b = half["A"], half["B"]
        r = config.rank_for(module_name)
        if r > max_rank:
            raise AdapterError(name, f"rank {r} exceeds max_rank {max_rank}", a.key)
        if target not in base.dims:
            raise AdapterError(name, f"the base has no shape for {target!r}", a.key)
        d_in, d_out = base.dims[target]
        for e, want in ((a, (r, d_in)), (b, (d_out, r))):
            if e.shape != want:
                raise AdapterError(name, f"shape {e.shape} does not fit; expected {want} "
                                   f"(rank {r} from the config)", e.key)
            if e.dtype not in _FLOAT_DTYPES:
                raise AdapterError(name, f"dtype {e.dtype} is not one of "
                                   f"{sorted(_FLOAT_DTYPES)}", e.key)
        plan[(layer, target)] = (a.key, b.key)
    return prefix, plan


def read_tensors(path: Path, name: str, entries: Sequence[Entry]) -> dict[str, Tensor]:
    """The float tensors `entries` (from `read_header`) name, as contiguous float32 CPU tensors,
    checked finite in one pass (about 1 ms for 9 MB).

    The file is mapped, privately and read-only in effect (as safetensors' own loader maps it),
    and float32 tensors (the common case) are views of the mapping: nothing is copied, pages are
    mapped straight from the page cache, and the CPU cache's bytes are the page cache's. A
    stored file is never rewritten in place (the store only renames and unlinks), which a
    mapping needs: truncating a mapped file would fault its readers. F16/BF16/F64 tensors and
    misaligned ones are converted or copied. A NaN or Inf (after the float32 cast, so float64
    values beyond float32's range count) is refused, naming its tensor.
    """
    def bad(why: str) -> AdapterError:
        return AdapterError(name, f"corrupt safetensors file: {why}", WEIGHTS_NAME)

    if not entries:
        return {}
    for e in entries:
        if e.dtype not in _TORCH_FLOATS:
            raise AdapterError(name, f"dtype {e.dtype} is not one of {sorted(_FLOAT_DTYPES)}",
                               e.key)
    if sys.byteorder != "little":  # safetensors is little-endian; torch views are native
        raise AdapterError(name, "reading safetensors needs a little-endian machine",
                           WEIGHTS_NAME)
    lo, hi = min(e.start for e in entries), max(e.stop for e in entries)
    try:
        size = path.stat().st_size
        if size < hi:  # changed since its header was read
            raise bad(f"{size} bytes, but its header describes {hi}")
        # shared=False: MAP_PRIVATE. Unlike Python's mmap it keeps no file descriptor open.
        storage = cast(torch.UntypedStorage, torch.UntypedStorage.from_file(str(path), False, size))
    except (OSError, RuntimeError) as err:
        raise AdapterError(name, f"cannot be read: {err}", WEIGHTS_NAME) from err
    buf = torch.empty(0, dtype=torch.uint8).set_(storage)  # (size,) bytes of the file
    out: dict[str, Tensor] = {}
    float32_bytes = 0
    for e in entries:
        dtype, itemsize = _TORCH_FLOATS[e.dtype], _FLOAT_DTYPES[e.dtype]
        raw = buf[e.start:e.stop]
        if e.start % itemsize:
            raw = raw.clone()  # a fresh, aligned allocation: a dtype view needs alignment
        t = raw.view(dtype).view(e.shape)  # A: (r, d_in), B: (d_out, r)
        if dtype == torch.float32 and raw.data_ptr() == buf.data_ptr() + e.start:
            float32_bytes += e.stop - e.start
        else:
            t = t.to(torch.float32).contiguous()
        out[e.key] = t
    # One pass over [lo, hi) when the tensors read tile it as float32 views, else one per
    # tensor. numpy's isfinite runs on the calling thread: a torch reduction this size would
    # wake the intra-op thread pool, which stalls whenever the engine's forward pass (or
    # anything else) has the other cores.
    tiled = float32_bytes == hi - lo and len({e.key for e in entries}) == len(entries)
    if tiled and bool(np.isfinite(buf[lo:hi].numpy().view(np.float32)).all()):
        return out
    for key, t in out.items():
        if not bool(np.isfinite(t.numpy()).all()):
            raise AdapterError(name, "contains NaN or Inf", key)
    return out
