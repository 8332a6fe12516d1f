"""The DEU adapter format: exact round trips, and one typed refusal per way a file can be wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotlora.adapters.adapter import Adapter, load_adapter, save_adapter
from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, BaseShapes
from tests.helpers import make_hf_model, make_peft_adapter, random_deu, save_deu

N_LAYER, N_EMBD = 2, 16
D_FF = 4 * N_EMBD
BASE = BaseShapes.gpt2(N_LAYER, N_EMBD)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    model = make_hf_model(root / "base", n_layer=N_LAYER, n_embd=N_EMBD, n_head=2)
    make_peft_adapter(model, root / "lora", seed=2)
    return root / "lora"


def _load(path: Path, name: str = "x") -> Adapter:
    return load_adapter(path, name=name, base=BASE, max_rank=16)


@pytest.mark.parametrize(
    ("layers", "group_size", "with_lora"),
    [(None, 1, False), ((1,), 8, False), ((0, 1), 64, False), ((0,), 1, True)],
)
def test_save_load_round_trips_exactly(
    tmp_path: Path, lora_dir: Path, layers: Any, group_size: int, with_lora: bool
) -> None:
    deu = random_deu(N_LAYER, D_FF, seed=1, layers=layers, group_size=group_size)
    first = save_deu(tmp_path / "a", deu, BASE, lora_dir if with_lora else None)
    loaded = _load(first)
    assert loaded.kind == ("lora+deu" if with_lora else "deu")
    assert loaded.deu is not None and loaded.deu.config.layers == deu.config.layers
    assert loaded.deu.config.group_size == group_size
    for layer, p in deu.params.items():
        assert torch.equal(loaded.deu.params[layer], p)
        assert loaded.deu.neuron_params(layer).shape == (6, D_FF)
    if with_lora:
        assert loaded.lora is not None and loaded.rank == 4 and len(loaded.lora.modules) > 0
    save_adapter(tmp_path / "b", loaded)
    for f in (CONFIG_NAME, WEIGHTS_NAME):  # saving what was loaded writes the same bytes
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_config_documents_itself(tmp_path: Path) -> None:
    save_deu(tmp_path, random_deu(N_LAYER, D_FF, seed=1, group_size=4), BASE)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config == {
        "peft_type": "DEU",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "test-base",
        "layers": [0, 1],
        "group_size": 4,
    }
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.transformer.h.1.mlp.deu.gain" in keys and len(keys) == 12


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / CONFIG_NAME).read_text())
        config.update(changes)
        (path / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(path / WEIGHTS_NAME)
        edit(tensors)
        save_file(tensors, path / WEIGHTS_NAME)

    return apply


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def _pop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[key]

    return edit


def _poke(key: str, index: int, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][index] = value

    return edit


K = "base_model.model.transformer.h.{}.mlp.deu.{}"
# case -> (edit, the field the error must name, message fragment)
REFUSALS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "layer-beyond-base": (_edit_config(layers=[0, 2]), "layers", "not one of the base's"),
    "layer-twice": (_edit_config(layers=[0, 0]), "layers", "twice"),
    "layers-not-a-list": (_edit_config(layers="all"), "layers", "list"),
    "group-size-not-dividing": (_edit_config(group_size=3), "group_size", "does not divide"),
    "group-size-zero": (_edit_config(group_size=0), "group_size", "positive"),
    "unknown-field": (_edit_config(activation="relu"), "activation", "unknown field"),
    "task-type": (_edit_config(task_type="SEQ_CLS"), "task_type", "CAUSAL_LM"),
    "lora-not-an-object": (_edit_config(lora=[1]), "lora", "LoRA config"),
    "lora-config-without-tensors": (
        _edit_config(
            lora={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_fc"]}
        ),
        WEIGHTS_NAME,
        "no LoRA tensors",
    ),
    "unlisted-layer": (_edit_config(layers=[0]), K.format(1, "a"), "not in the config's layers"),
    "missing-param": (_edit_tensors(_pop(K.format(1, "c2"))), K.format(1, "c2"), "no 'c2'"),
    "unknown-param": (
        _edit_tensors(_set(K.format(0, "d"), torch.ones(D_FF))),
        K.format(0, "d"),
        "not a DEU tensor key",
    ),
    "wrong-shape": (
        _edit_tensors(_set(K.format(0, "a"), torch.ones(D_FF + 1))),
        K.format(0, "a"),
        "does not fit",
    ),
    "int-dtype": (
        _edit_tensors(_set(K.format(0, "gain"), torch.ones(D_FF, dtype=torch.int32))),
        K.format(0, "gain"),
        "not a float",
    ),
    "nan": (_edit_tensors(_poke(K.format(1, "c1"), 3, float("nan"))), K.format(1, "c1"), "NaN"),
    "inf": (_edit_tensors(_poke(K.format(0, "gain"), 0, float("inf"))), K.format(0, "gain"), "Inf"),
    "a-zero": (_edit_tensors(_poke(K.format(0, "a"), 5, 0.0)), K.format(0, "a"), "> 0"),
    "c-negative": (_edit_tensors(_poke(K.format(1, "c"), 0, -1.0)), K.format(1, "c"), "> 0"),
    "stray-lora-tensor": (
        _edit_tensors(
            _set("base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight", torch.ones(2, N_EMBD))
        ),
        "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight",
        "embeds no LoRA part",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_deu_adapters_are_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    edit, field, fragment = REFUSALS[case]
    path = save_deu(tmp_path, random_deu(N_LAYER, D_FF, seed=1), BASE)
    edit(path)
    with pytest.raises(AdapterError) as info:
        _load(path)
    assert info.value.field == field, info.value
    assert fragment in info.value.message, info.value


def test_a_deu_adapter_for_another_base_width_is_refused(tmp_path: Path) -> None:
    path = save_deu(tmp_path, random_deu(N_LAYER, 2 * D_FF, seed=1), BASE)
    with pytest.raises(AdapterError, match=r"expected \(64,\)"):
        _load(path)


def test_save_refuses_parameters_that_do_not_match_the_config(tmp_path: Path) -> None:
    deu = random_deu(N_LAYER, D_FF, seed=1, layers=(0,))
    bad = type(deu)(deu.config, {1: deu.params[0]})
    with pytest.raises(AdapterError, match="config lists"):
        save_adapter(tmp_path, Adapter("x", None, bad))
