"""Every way an adapter is refused: one typed AdapterError naming the adapter and field or key."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import load_lora_adapter
from hotlora.adapters.lora_config import LoRAConfig
from tests.adapters.conftest import BASE, valid_config, valid_tensors, write_adapter

DELETE = object()
NAME = "adapter-under-test"
A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B0 = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


def _expect(path: Path, field: str, match: str, max_rank: int = 8) -> AdapterError:
    with pytest.raises(AdapterError, match=match) as info:
        load_lora_adapter(path, name=NAME, base=BASE, max_rank=max_rank)
    err = info.value
    assert err.adapter == NAME and err.field == field
    assert NAME in str(err) and field in str(err)
    return err


# (field, value or DELETE, the field the error must name, regex the message must match)
CONFIG_CASES: list[tuple[str, Any, str, str]] = [
    ("peft_type", "PREFIX_TUNING", "peft_type", "serves PEFT .LORA. adapters and its own .DEU."),
    ("peft_type", DELETE, "peft_type", "missing"),
    ("task_type", "SEQ_CLS", "task_type", "one of"),
    ("use_dora", True, "use_dora", "DoRA"),
    ("use_dora", "no", "use_dora", "boolean"),
    ("modules_to_save", ["lm_head"], "modules_to_save", "extra modules"),
    ("bias", "all", "bias", "only 'none'"),
    ("bias", "lora_only", "bias", "only 'none'"),
    ("lora_bias", True, "lora_bias", "bias on lora_B"),
    ("use_qalora", True, "use_qalora", "QALoRA"),
    ("layer_replication", [[0, 2], [1, 3]], "layer_replication", "layer stack"),
    ("target_parameters", ["transformer.h.0.attn.c_attn.weight"], "target_parameters", "raw"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices", "token embeddings"),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens", "aLoRA"),
    ("use_bdlora", {"nblocks": 2}, "use_bdlora", "block-diagonal"),
    ("arrow_config", {"top_k": 3}, "arrow_config", "Arrow"),
    ("kasa_config", {"beta": 1e-4}, "kasa_config", "KaSA"),
    ("init_lora_weights", "pissa", "init_lora_weights", "modifies the base"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights", "modifies the base"),
    ("init_lora_weights", "olora", "init_lora_weights", "modifies the base"),
    ("init_lora_weights", "corda", "init_lora_weights", "modifies the base"),
    ("init_lora_weights", "loftq", "init_lora_weights", "modifies the base"),
    ("init_lora_weights", "lora_ga", "init_lora_weights", "modifies the base"),
    ("init_lora_weights", "bogus", "init_lora_weights", "unsupported"),
    ("r", 0, "r", "positive integer"),
    ("r", -2, "r", "positive integer"),
    ("r", "8", "r", "positive integer"),
    ("r", 2.0, "r", "positive integer"),
    ("r", True, "r", "positive integer"),
    ("r", DELETE, "r", "missing"),
    ("lora_alpha", DELETE, "lora_alpha", "missing"),
    ("lora_alpha", "16", "lora_alpha", "finite number"),
    ("lora_alpha", float("nan"), "lora_alpha", "finite number"),
    ("lora_alpha", float("inf"), "lora_alpha", "finite number"),
    ("target_modules", DELETE, "target_modules", "missing"),
    ("target_modules", None, "target_modules", "list of strings"),
    ("target_modules", 5, "target_modules", "list of strings"),
    ("target_modules", ["c_attn", 3], "target_modules", "list of strings"),
    ("target_modules", ["q_proj", "v_proj"], "target_modules", "matches none"),
    ("target_modules", ["attn"], "target_modules", "matches none"),
    ("target_modules", [], "target_modules", "matches none"),
    ("target_modules", "(", "target_modules", "invalid regular expression"),
    ("target_modules", ["c_attn", "lm_head"], "target_modules", "'lm_head'"),
    ("target_modules", ["c_attn", "wte"], "target_modules", "'transformer.wte'"),
    ("target_modules", ".*", "target_modules", "hotlora cannot adapt"),
    ("exclude_modules", 5, "exclude_modules", "list of strings"),
    ("exclude_modules", "[", "exclude_modules", "invalid regular expression"),
    ("layers_to_transform", "0", "layers_to_transform", "list of ints"),
    ("layers_to_transform", [10**9], "target_modules", "matches none"),
    ("layers_to_transform", [0, 1.5], "layers_to_transform", "list of ints"),
    ("layers_pattern", ["h"], "layers_pattern", "requires layers_to_transform"),
    ("layers_pattern", 3, "layers_pattern", "list of strings"),
    ("use_rslora", "yes", "use_rslora", "boolean"),
    ("fan_in_fan_out", "true", "fan_in_fan_out", "boolean"),
    ("lora_dropout", "x", "lora_dropout", r"\[0, 1\]"),
    ("rank_pattern", {"c_attn": 0}, "rank_pattern", "positive integers"),
    ("rank_pattern", ["c_attn"], "rank_pattern", "positive integers"),
    ("rank_pattern", {"(": 2}, "rank_pattern", "invalid regular expression"),
    ("alpha_pattern", {"c_attn": "x"}, "alpha_pattern", "finite numbers"),
    ("base_model_name_or_path", 5, "base_model_name_or_path", "null or a string"),
    ("use_magic_variant", True, "use_magic_variant", "unknown field"),
    ("magic_config", {"k": 1}, "magic_config", "unknown field"),
]


@pytest.mark.parametrize(("key", "value", "field", "match"), CONFIG_CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:40] for c in CONFIG_CASES])
def test_config_field_refused(tmp_path: Path, key: str, value: Any, field: str, match: str) -> None:
    cfg = valid_config()
    if value is DELETE:
        del cfg[key]
    else:
        cfg[key] = value
    _expect(write_adapter(tmp_path, cfg, valid_tensors()), field, match)


def test_regex_targets_with_layer_filter_refused(tmp_path: Path) -> None:
    cfg = valid_config(target_modules=r".*\.c_attn", layers_to_transform=[0])
    _expect(write_adapter(tmp_path, cfg, valid_tensors()), "layers_to_transform", "regex")


def test_config_not_an_object_refused(tmp_path: Path) -> None:
    _expect(write_adapter(tmp_path, [1, 2], valid_tensors()), "adapter_config.json", "object")


@pytest.mark.parametrize("extra", [
    {"init_lora_weights": "gaussian"}, {"init_lora_weights": False},
    {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}, {"init_lora_weights": "orthogonal"},
    {"lora_dropout": 0.1}, {"fan_in_fan_out": False}, {"task_type": None},
    {"modules_to_save": []}, {"layer_replication": None}, {"target_parameters": []},
    {"loftq_config": {"loftq_bits": 4}}, {"inference_mode": False}, {"peft_version": "0.10.0"},
    {"future_field": None}, {"future_flag": False}, {"velora_config": {"num_groups": 4}},
    {"target_modules": ["c_attn", "c_fc", "c_proj"], "exclude_modules": ["c_proj"]},
])
def test_harmless_fields_accepted(tmp_path: Path, extra: dict[str, Any]) -> None:
    path = write_adapter(tmp_path, valid_config(**extra), valid_tensors())
    adapter = load_lora_adapter(path, name=NAME, base=BASE, max_rank=8)
    assert len(adapter.modules) == 6


def _truncate(p: Path) -> None:
    f = p / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _set_header(p: Path, header: Any, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (p / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
    t = valid_tensors()
    edit(t)
    return t


BAD_OFFSETS = {A0: {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 64]}}

# (id, how to break a valid adapter dir, the field or key the error must name, message regex)
FILE_CASES: list[tuple[str, Callable[[Path], Any], str, str]] = [
    ("truncated", _truncate, "adapter_model.safetensors", "corrupt"),
    ("garbage", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 10),
     "adapter_model.safetensors", "corrupt"),
    ("tiny", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x01\x02"),
     "adapter_model.safetensors", "corrupt"),
    ("huge_header_len", lambda p: (p / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", 2**40) + b"{}"), "adapter_model.safetensors", "header length"),
    ("header_not_json", lambda p: (p / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", 4) + b"{{{{"), "adapter_model.safetensors", "not JSON"),
    ("header_not_object", lambda p: _set_header(p, [1]), "adapter_model.safetensors",
     "not a JSON object"),
    ("header_entry", lambda p: _set_header(p, {A0: {"dtype": "F32"}}),
     "adapter_model.safetensors", "malformed"),
    ("offsets", lambda p: _set_header(p, BAD_OFFSETS, b"\x00" * 16),
     "adapter_model.safetensors", "offsets"),
    ("config_invalid_json", lambda p: (p / "adapter_config.json").write_text("{r: 8"),
     "adapter_config.json", "JSON"),
    ("config_missing", lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json",
     "missing"),
    ("weights_missing", lambda p: (p / "adapter_model.safetensors").unlink(),
     "adapter_model.safetensors", "missing"),
]


@pytest.mark.parametrize(("breaker", "field", "match"), [c[1:] for c in FILE_CASES],
                         ids=[c[0] for c in FILE_CASES])
def test_broken_files_refused(
    valid_dir: Path, breaker: Callable[[Path], Any], field: str, match: str
) -> None:
    breaker(valid_dir)
    _expect(valid_dir, field, match)


def _rename(t: dict[str, torch.Tensor], old: str, new: str) -> None:
    t[new] = t.pop(old)


C_PROJ_A = "base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"
TENSOR_CASES: list[tuple[str, Callable[[dict[str, torch.Tensor]], None], str, str]] = [
    ("unknown_format", lambda t: t.update({"foo.weight": torch.zeros(2, 2)}), "foo.weight",
     "maps to no hotlora module"),
    ("lm_head", lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32)}),
     "base_model.model.lm_head.lora_A.weight", "maps to no hotlora module"),
    ("lora_bias", lambda t: t.update({B0.replace("weight", "bias"): torch.zeros(96)}),
     B0.replace("weight", "bias"), "maps to no hotlora module"),
    ("dora_magnitude", lambda t: t.update({
        A0.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(96)}),
     A0.replace("lora_A.weight", "lora_magnitude_vector"), "maps to no hotlora module"),
    ("bad_target", lambda t: _rename(t, A0, A0.replace("attn.c_attn", "attn.q_proj")),
     A0.replace("attn.c_attn", "attn.q_proj"), "not one of"),
    ("layer_beyond_base", lambda t: t.update({A0.replace("h.0", "h.3"): torch.zeros(2, 32),
                                              B0.replace("h.0", "h.3"): torch.zeros(96, 2)}),
     A0.replace("h.0", "h.3"), "beyond the base's 3 layers"),
    ("leading_zero_layer", lambda t: _rename(t, A0, A0.replace("h.0", "h.00")),
     A0.replace("h.0", "h.00"), "maps to no hotlora module"),
    ("not_targeted", lambda t: t.update({C_PROJ_A: torch.zeros(2, 128)}), C_PROJ_A,
     "does not target"),
    ("a_without_b", lambda t: t.pop(B0), A0, "without its lora_B"),
    ("b_without_a", lambda t: t.pop(A0), B0, "without its lora_A"),
    ("module_missing", lambda t: (t.pop(A0), t.pop(B0)), "target_modules",
     "has no tensors for it"),
    ("a_wrong_d_in", lambda t: t.update({A0: torch.zeros(2, 31)}), A0, r"expected \(2, 32\)"),
    ("b_wrong_d_out", lambda t: t.update({B0: torch.zeros(32, 2)}), B0, r"expected \(96, 2\)"),
    ("rank_differs", lambda t: t.update({A0: torch.zeros(3, 32), B0: torch.zeros(96, 3)}), A0,
     "rank 2 from the config"),
    ("a_not_2d", lambda t: t.update({A0: torch.zeros(64)}), A0, "does not fit"),
    ("int_dtype", lambda t: t.update({A0: torch.zeros(2, 32, dtype=torch.int32)}), A0,
     "dtype I32"),
    ("bool_dtype", lambda t: t.update({B0: torch.zeros(96, 2, dtype=torch.bool)}), B0,
     "dtype BOOL"),
    ("nan", lambda t: t[A0].__setitem__((1, 3), float("nan")), A0, "NaN or Inf"),
    ("inf", lambda t: t[B0].__setitem__((0, 0), float("-inf")), B0, "NaN or Inf"),
    ("f64_overflow", lambda t: t.update({A0: torch.full((2, 32), 1e300, dtype=torch.float64)}),
     A0, "NaN or Inf"),
    ("mixed_layouts", lambda t: (_rename(t, A0, A0.replace("transformer.", "")),
                                 _rename(t, B0, B0.replace("transformer.", ""))),
     "layouts", "mix"),
    ("duplicate", lambda t: t.update({A0.replace("lora_A.weight", "lora_A.default.weight"):
                                      torch.zeros(2, 32)}), "duplicate", "duplicate lora_A"),
    ("no_tensors", lambda t: t.clear(), "adapter_model.safetensors", "no LoRA tensors"),
]


@pytest.mark.parametrize(("edit", "field", "match"), [c[1:] for c in TENSOR_CASES],
                         ids=[c[0] for c in TENSOR_CASES])
def test_bad_tensors_refused(
    tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None], field: str, match: str
) -> None:
    tensors = _tensors(edit)
    path = write_adapter(tmp_path, valid_config(), tensors)
    if field in ("layouts", "duplicate"):
        # The key named is whichever of the conflicting keys comes second in the file.
        with pytest.raises(AdapterError, match=match) as info:
            load_lora_adapter(path, name=NAME, base=BASE, max_rank=8)
        assert info.value.field in tensors
        return
    _expect(path, field, match)


def test_layers_to_transform_beyond_base_refused(tmp_path: Path) -> None:
    """A config for a deeper model targets layers the base lacks: checked against its depth."""
    path = write_adapter(tmp_path, valid_config(layers_to_transform=[5]), valid_tensors())
    _expect(path, "target_modules", "matches none of hotlora's target modules .* 3-layer gpt2")


def test_rank_above_max_rank_refused(valid_dir: Path) -> None:
    _expect(valid_dir, A0, "rank 2 exceeds max_rank 1", max_rank=1)


def test_rank_pattern_above_max_rank_refused(tmp_path: Path) -> None:
    cfg = valid_config(rank_pattern={"h.1.mlp.c_fc": 16})
    path = write_adapter(tmp_path, cfg, valid_tensors())
    _expect(path, A0.replace("h.0.attn.c_attn", "h.1.mlp.c_fc"), "rank 16 exceeds max_rank 8")


def test_missing_path_refused(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", "path", "does not exist")


def test_path_that_is_a_file_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    _expect(tmp_path / "f", "path", "not a directory")


class _Tripwire:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def _write_tripwire(path: Path, marker: Path) -> None:
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))


def test_tripwire_really_fires(tmp_path: Path) -> None:
    marker = tmp_path / "fired"
    _write_tripwire(tmp_path, marker)
    pickle.loads((tmp_path / "adapter_model.bin").read_bytes())  # noqa: S301 - the point
    assert marker.exists()


def test_pickle_only_adapter_refused_without_unpickling(valid_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (valid_dir / "adapter_model.safetensors").unlink()
    _write_tripwire(valid_dir, marker)
    err = _expect(valid_dir, "adapter_model.bin", "safetensors")
    assert "pickle" in str(err)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_never_opened(valid_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    _write_tripwire(valid_dir, marker)
    adapter = load_lora_adapter(valid_dir, name=NAME, base=BASE, max_rank=8)
    assert len(adapter.modules) == 6
    assert not marker.exists()


def test_from_dict_refuses_directly() -> None:
    with pytest.raises(AdapterError, match="use_dora") as info:
        LoRAConfig.from_dict(valid_config(use_dora=True), adapter="direct")
    assert info.value.adapter == "direct" and "direct" in str(info.value)


def test_adapter_error_is_a_value_error_and_pickles() -> None:
    err = AdapterError("a", "broken", "r")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object
    assert (back.adapter, back.field, str(back)) == ("a", "r", str(err))


def _adapter_with(src: Path, **changes: Any) -> Any:
    import dataclasses

    from hotlora.adapters.format import LoRAAdapter

    adapter = load_lora_adapter(src, name=NAME, base=BASE, max_rank=8)
    first = dataclasses.replace(adapter.modules[0], **changes)
    return LoRAAdapter(adapter.name, adapter.config, (first, *adapter.modules[1:]))


@pytest.mark.parametrize(("changes", "field", "match"), [
    ({"scaling": 3.0}, "scaling", "differs from the config"),
    ({"A": torch.zeros(3, 32), "B": torch.zeros(96, 3)}, "modules", "config's rank 2"),
    ({"target": "mlp.c_proj"}, "target_modules", "does not target"),
], ids=["scaling", "rank", "untargeted"])
def test_save_refuses_what_would_not_load_back(
    valid_dir: Path, tmp_path: Path, changes: dict[str, Any], field: str, match: str
) -> None:
    from hotlora.adapters.format import save_lora_adapter

    with pytest.raises(AdapterError, match=match) as info:
        save_lora_adapter(tmp_path / "out", _adapter_with(valid_dir, **changes))
    assert info.value.field == field
    assert not (tmp_path / "out").exists()


def test_save_leaves_readable_files_and_no_temporaries(valid_dir: Path, tmp_path: Path) -> None:
    import os
    import stat

    from hotlora.adapters.format import save_lora_adapter

    adapter = load_lora_adapter(valid_dir, name=NAME, base=BASE, max_rank=8)
    save_lora_adapter(tmp_path / "a" / "b", adapter)
    names = sorted(p.name for p in (tmp_path / "a" / "b").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for n in names:
        mode = stat.S_IMODE((tmp_path / "a" / "b" / n).stat().st_mode)
        assert mode == 0o666 & ~umask
