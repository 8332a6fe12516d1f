"""Parse and validate a PEFT ``adapter_config.json`` for LoRA, and PEFT's module-matching rules.

The matching rules are ported from peft 0.21 (``check_target_module_exists`` in
``peft/tuners/tuners_utils.py`` and ``get_pattern_key`` in ``peft/utils/other.py``) so that an
adapter is applied to exactly the modules PEFT would have wrapped, with the rank and scaling PEFT
would have given each one. peft itself is never imported here.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.layout import GPT2_LAYOUT, ModuleLayout

# GPT-2 block projections: the default layout's targets, kept for callers that only know GPT-2.
TARGETS = GPT2_LAYOUT.targets

# Blocks probed when a config is checked without its base (gpt2-xl has 48); with the base, its
# own depth is used (Llama 3 70B has 80).
_PROBE_LAYERS = 48
_MAX_PROBE_LAYERS = 1024

_ALL_LINEAR = "all-linear"

# init_lora_weights values that only choose the starting A/B: the saved A/B are the whole story.
_HARMLESS_INITS = ("gaussian", "eva", "orthogonal", "mica")
# These rewrite (or quantize) the base weights at init, so the saved A/B are relative to a base
# hotlora does not have. PEFT resets the field to true when it converts such an adapter back.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")

# Must be false: each changes the forward math (or adds tensors) beyond y += s * B(A x).
_MUST_BE_FALSE = {
    "use_dora": "DoRA (magnitude-scaled weights) is not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "use_qalora": "QALoRA (pooled inputs) is not supported",
}
# Must be null or empty.
_MUST_BE_EMPTY = {
    "modules_to_save": "fully trained extra modules are not supported",
    "target_parameters": "LoRA on raw parameters is not supported",
    "layer_replication": "layer replication changes the layer stack",
    "trainable_token_indices": "trainable token embeddings are not supported",
}
# Must be null: LoRA variants whose inference forward differs from plain LoRA.
_MUST_BE_NULL = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA (truncated base + singular-value diagonal) is not supported",
}
# Known fields that do not change inference: training-only knobs, init-only sub-configs, and
# VeLoRA/MonteCLoRA, whose eval-mode forward is plain LoRA (peft/tuners/lora/variants.py).
_IGNORED = frozenset({
    "auto_mapping", "peft_version", "revision", "inference_mode", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", "runtime_config", "ensure_weight_tying", "velora_config",
    "monteclora_config",
})
_HANDLED = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules",
    "exclude_modules", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
})

# adapter_config.json as peft 0.21 writes it with every field at its default.
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none", "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": True, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "peft_type": "LORA", "peft_version": None, "qalora_group_size": 16, "r": 8, "rank_pattern": {},
    "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


def _is_empty(v: object) -> bool:
    return v is None or (isinstance(v, list | dict | tuple | str) and len(v) == 0)


def _str_or_strs(v: object) -> bool:
    if isinstance(v, str):
        return True
    return isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)


def _regex(adapter: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterError(adapter, f"invalid regular expression {pattern!r}: {e}", key) from e


def _layer_index(key: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """PEFT's layer-index extraction: the first numbered segment (or the one after a pattern)."""
    match: re.Match[str] | None = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """peft.utils.other.get_pattern_key: first pattern that matches a dotted suffix of ``key``."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


@dataclass(frozen=True)
class LoRAConfig:
    """A validated LoRA adapter_config.json. Equality ignores ``raw`` (kept for round-trips)."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    layers_to_transform: tuple[int, ...] | None
    fan_in_fan_out: bool
    base_model_name_or_path: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    exclude_modules: tuple[str, ...] | str | None = None
    layers_pattern: tuple[str, ...] | None = None
    layout: ModuleLayout = GPT2_LAYOUT  # the family whose module names the config matches

    def __post_init__(self) -> None:
        # Freeze the containers so a config shared between requests cannot be mutated.
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        for name in ("rank_pattern", "alpha_pattern", "raw"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        adapter: str,
        layout: ModuleLayout = GPT2_LAYOUT,
        n_layer: int | None = None,
    ) -> LoRAConfig:
        """Validate an adapter_config.json dict for a family; raise AdapterError naming the
        offending field. With the base's `n_layer` the targets are checked against exactly that
        many blocks; without, against a probe of at least _PROBE_LAYERS."""
        if not isinstance(d, Mapping):
            raise AdapterError(adapter, f"must be a JSON object, got {type(d).__name__}",
                               "adapter_config.json")
        _check_refusals(d, adapter)

        def get(key: str, ok: Any, what: str, default: Any = None, required: bool = False) -> Any:
            if key not in d:
                if required:
                    raise AdapterError(adapter, "required field is missing", key)
                return default
            value = d[key]
            if not ok(value):
                raise AdapterError(adapter, f"must be {what}, got {value!r}", key)
            return value

        r = get("r", lambda v: _is_int(v) and v > 0, "a positive integer", required=True)
        alpha = get("lora_alpha", _is_number, "a finite number", required=True)
        targets = get("target_modules", lambda v: v is not None and _str_or_strs(v),
                      "a string (regex) or a list of strings", required=True)
        exclude = get("exclude_modules", lambda v: v is None or _str_or_strs(v),
                      "null, a string (regex) or a list of strings")
        get("lora_dropout", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
        fan = get("fan_in_fan_out", lambda v: isinstance(v, bool), "a boolean", default=False)
        rslora = get("use_rslora", lambda v: isinstance(v, bool), "a boolean", default=False)
        base = get("base_model_name_or_path", lambda v: v is None or isinstance(v, str),
                   "null or a string")
        layers = get("layers_to_transform", lambda v: v is None or _is_int(v) or (
            isinstance(v, list) and all(_is_int(x) for x in v)), "null, an int or a list of ints")
        lpat = get("layers_pattern", lambda v: v is None or _str_or_strs(v),
                   "null, a string or a list of strings")
        ranks = get("rank_pattern", lambda v: v is None or (isinstance(v, Mapping) and all(
            isinstance(k, str) and _is_int(x) and x > 0 for k, x in v.items())),
            "an object mapping patterns to positive integers")
        alphas = get("alpha_pattern", lambda v: v is None or (isinstance(v, Mapping) and all(
            isinstance(k, str) and _is_number(x) for k, x in v.items())),
            "an object mapping patterns to finite numbers")

        # LoraConfig.__post_init__ rejects these combinations; so does hotlora.
        if isinstance(targets, str) and layers is not None:
            raise AdapterError(adapter, "cannot be used when target_modules is a regex string",
                               "layers_to_transform")
        if isinstance(targets, str) and lpat is not None:
            raise AdapterError(adapter, "cannot be used when target_modules is a regex string",
                               "layers_pattern")
        if lpat and layers is None:
            raise AdapterError(adapter, "requires layers_to_transform", "layers_pattern")

        if isinstance(targets, str) and targets.lower() != _ALL_LINEAR:
            _regex(adapter, "target_modules", targets)
        if isinstance(exclude, str):
            _regex(adapter, "exclude_modules", exclude)
        patterns = [lpat] if isinstance(lpat, str) else (lpat or [])
        for p in patterns:
            _regex(adapter, "layers_pattern", p)
        for key, mapping in (("rank_pattern", ranks or {}), ("alpha_pattern", alphas or {})):
            for p in mapping:
                _regex(adapter, key, rf"(.*\.)?({p})$")

        config = cls(
            r=r,
            lora_alpha=float(alpha),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=rslora,
            rank_pattern={k: int(v) for k, v in (ranks or {}).items()},
            alpha_pattern={k: float(v) for k, v in (alphas or {}).items()},
            # PEFT treats an empty list as "all layers" and an int as a one-element list.
            layers_to_transform=None if layers is None or layers == [] else (
                (layers,) if _is_int(layers) else tuple(layers)),
            fan_in_fan_out=fan,
            base_model_name_or_path=base,
            raw=copy.deepcopy(dict(d)),
            exclude_modules=None if exclude is None else (
                exclude if isinstance(exclude, str) else tuple(exclude)),
            # PEFT treats an empty pattern ("" or []) like no pattern at all.
            layers_pattern=None if not lpat else (
                (lpat,) if isinstance(lpat, str) else tuple(lpat)),
            layout=layout,
        )
        if n_layer is None:
            # Bounded: a hostile layers_to_transform must not make this loop for ages.
            deepest = max([_PROBE_LAYERS - 1, *(config.layers_to_transform or ())]) + 1
            n_layer = min(deepest, _MAX_PROBE_LAYERS)
        config.check_fits(adapter, n_layer)
        return config

    def check_fits(self, adapter: str, n_layer: int) -> str:
        """Refuse unless, in some layout of the family with ``n_layer`` blocks, the config targets
        at least one target and nothing else. Returns that layout's prefix (e.g. "model." or "").
        """
        lay = self.layout
        for prefix in lay.prefixes:
            if not any(self.targets(n) for n, _, _ in lay.iter_targets(prefix, n_layer)):
                continue
            stray = [n for n in lay.others(prefix, n_layer) if self.targets(n)]
            if stray:
                raise AdapterError(
                    adapter, f"also matches {stray[0]!r}, which hotlora cannot adapt (only "
                    f"{', '.join(lay.targets)})", "target_modules")
            return prefix
        raise AdapterError(
            adapter, f"matches none of hotlora's target modules ({', '.join(lay.targets)}) in a "
            f"{n_layer}-layer {lay.family} model", "target_modules")

    def to_dict(self) -> dict[str, Any]:
        """PEFT-compatible adapter_config.json content."""
        out = copy.deepcopy(_PEFT_DEFAULTS)
        out.update(copy.deepcopy(dict(self.raw)))
        fields: dict[str, Any] = {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules if isinstance(self.target_modules, str)
            else list(self.target_modules),
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": None if self.layers_to_transform is None
            else list(self.layers_to_transform),
            "fan_in_fan_out": self.fan_in_fan_out,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": self.exclude_modules if self.exclude_modules is None
            or isinstance(self.exclude_modules, str) else list(self.exclude_modules),
            "layers_pattern": None if self.layers_pattern is None else list(self.layers_pattern),
        }
        for key, value in fields.items():
            # Keep the original spelling (8 vs 8.0, 2 vs [2]) when it means the same thing, so a
            # load/save round trip rewrites nothing.
            if key in self.raw and _same(key, self.raw[key], value):
                continue
            out[key] = value
        if "task_type" not in self.raw:
            # An explicit null is kept: it is how peft saves an adapter of a bare GPT2Model.
            out["task_type"] = "CAUSAL_LM"
        return out

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would wrap ``module_name`` (e.g. "transformer.h.3.attn.c_attn")."""
        key = module_name
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, key):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False

        tm = self.target_modules
        if isinstance(tm, str):
            if tm.lower() == _ALL_LINEAR:
                # PEFT expands this to every Linear/Conv1D but the output head: the targets.
                return self.layout.all_linear_re.fullmatch(key) is not None
            return re.fullmatch(tm, key) is not None
        if key in tm:
            # An exact name bypasses layers_to_transform in PEFT as well.
            return True
        if not any(key.endswith(f".{t}") for t in tm):
            return False
        if self.layers_to_transform is None:
            return True
        index = _layer_index(key, self.layers_pattern)
        return index is not None and index in self.layers_to_transform

    def rank_for(self, module_name: str) -> int:
        """The module's rank: the first matching rank_pattern entry, else r."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern.get(key, self.r)

    def scaling_for(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, after rank_pattern / alpha_pattern."""
        r = self.rank_for(module_name)
        key = _pattern_key(self.alpha_pattern, module_name)
        alpha = self.alpha_pattern.get(key, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _floats(v: Any) -> Any:
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, list | tuple):
        return [_floats(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _floats(x) for k, x in v.items()}
    return v


def _same(key: str, raw: Any, value: Any) -> bool:
    """Whether a raw JSON value means what the parsed field says (the from_dict normalization)."""
    if key == "layers_to_transform":
        raw = [raw] if _is_int(raw) else (None if raw == [] else raw)
    elif key == "layers_pattern" and isinstance(raw, str):
        raw = [raw]
    return bool(_floats(raw) == _floats(value))


def _check_refusals(d: Mapping[str, Any], adapter: str) -> None:
    """Refuse every field whose value asks for math hotlora does not implement."""
    peft_type = d.get("peft_type")
    if "peft_type" not in d:
        raise AdapterError(adapter, "required field is missing", "peft_type")
    if peft_type != "LORA":
        raise AdapterError(adapter, "hotlora serves PEFT 'LORA' adapters and its own 'DEU' "
                           f"adapters, got {peft_type!r}", "peft_type")
    task = d.get("task_type")
    if task not in _TASK_TYPES:
        raise AdapterError(adapter, f"must be one of {_TASK_TYPES}, got {task!r}", "task_type")
    bias = d.get("bias", "none")
    if bias != "none":
        raise AdapterError(adapter, f"only 'none' is supported, got {bias!r}", "bias")
    for key, why in _MUST_BE_FALSE.items():
        value = d.get(key, False)
        if not isinstance(value, bool):
            raise AdapterError(adapter, f"must be a boolean, got {value!r}", key)
        if value:
            raise AdapterError(adapter, why, key)
    for key, why in _MUST_BE_EMPTY.items():
        if not _is_empty(d.get(key)):
            raise AdapterError(adapter, f"{why} (got {d[key]!r})", key)
    for key, why in _MUST_BE_NULL.items():
        if d.get(key) is not None:
            raise AdapterError(adapter, f"{why} (got {d[key]!r})", key)
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise AdapterError(
            adapter, f"{init!r} initialization modifies the base weights; convert the adapter "
            "to plain LoRA first (save_pretrained(path_initial_model_for_weight_conversion=...))",
            "init_lora_weights")
    if not (isinstance(init, bool) or init in _HARMLESS_INITS):
        raise AdapterError(adapter, f"unsupported value {init!r}", "init_lora_weights")
    for key, value in d.items():
        if key in _HANDLED or key in _IGNORED or key in _MUST_BE_FALSE or key in _MUST_BE_EMPTY \
                or key in _MUST_BE_NULL:
            continue
        # A field peft 0.21 does not know: ignored only while it is unset, because a newer
        # variant could change the math in a way hotlora cannot see.
        if not (_is_empty(value) or value is False):
            raise AdapterError(adapter, f"unknown field set to {value!r}", key)
