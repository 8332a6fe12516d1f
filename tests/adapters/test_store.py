"""AdapterStore: versioned puts, restart recovery, crash leftovers, refusals that change nothing."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import (
    CONFIG_NAME,
    PICKLE_NAME,
    WEIGHTS_NAME,
    BaseShapes,
    load_lora_adapter,
)
from hotlora.adapters.store import (
    META_NAME,
    AdapterStore,
    AdapterTooLarge,
    AdapterVersion,
    check_name,
)
from tests.adapters.conftest import BASE, N_LAYER, peft_adapter, valid_config, valid_tensors

DEMO = Path(__file__).resolve().parents[2] / "adapters" / "demo" / "adapters"
MAX_RANK = 8


def blobs(
    config: Any = None, tensors: dict[str, torch.Tensor] | None = None
) -> tuple[bytes, bytes]:
    cfg = valid_config() if config is None else config
    weights = valid_tensors() if tensors is None else tensors
    return json.dumps(cfg).encode(), save(weights, metadata={"format": "pt"})


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for a directory)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


class Touch:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", BASE, max_rank=MAX_RANK, max_bytes=1 << 20)


def test_put_writes_files_and_meta(store: AdapterStore) -> None:
    config, weights = blobs()
    v, adapter = store.put("ok-1", config, weights)
    assert v.path == store.root / "ok-1" / "v1"
    assert (v.path / CONFIG_NAME).read_bytes() == config
    assert (v.path / WEIGHTS_NAME).read_bytes() == weights
    assert (v.path / META_NAME).is_file()
    assert (v.name, v.version, v.key, v.kind) == ("ok-1", 1, "ok-1@1", "lora")
    assert v.rank == 2 and v.target_modules == ("attn.c_attn", "mlp.c_fc")
    assert v.size_bytes == len(weights)
    assert v.sha256 == hashlib.sha256(weights).hexdigest()
    assert v.created > 0
    assert adapter.name == v.key and len(adapter.lora.modules) == 2 * N_LAYER
    loaded = store.load(v)
    assert loaded.name == v.key
    for a, b in zip(loaded.lora.modules, adapter.lora.modules, strict=True):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scaling == b.scaling
    assert list((store.root / ".staging").iterdir()) == []


def test_versions_latest_and_listing(store: AdapterStore) -> None:
    v1, _ = store.put("a", *blobs())
    v2, _ = store.put("a", *blobs(valid_config(lora_alpha=8)))
    vb, _ = store.put(
        "b",
        *blobs(valid_config(target_modules=["c_attn"]), valid_tensors(targets=("attn.c_attn",))),
    )
    assert (v1.version, v2.version) == (1, 2)
    assert store.latest("a") == v2 and store.get("a", 1) == v1 and store.get("a", 3) is None
    assert store.versions("a") == [v1, v2]
    assert store.names() == ["a", "b"]
    assert store.latest_all() == [v2, vb]
    assert vb.target_modules == ("attn.c_attn",)
    assert store.latest("zz") is None and store.versions("zz") == [] and store.get("zz", 1) is None


def test_restart_recovers_everything(store: AdapterStore) -> None:
    store.put("a", *blobs())
    store.put("a", *blobs())
    store.put("b", *blobs())
    again = AdapterStore(store.root, BASE, max_rank=MAX_RANK)
    assert again.names() == ["a", "b"]
    assert again.versions("a") == store.versions("a")
    assert again.latest_all() == store.latest_all()
    assert again.put("a", *blobs())[0].version == 3


def test_crash_leftovers_are_removed_and_never_listed(store: AdapterStore) -> None:
    v1, _ = store.put("a", *blobs())
    root = store.root
    (root / ".staging" / "a.1.dead").mkdir()
    (root / ".staging" / "a.1.dead" / WEIGHTS_NAME).write_bytes(b"half")
    (root / ".trash" / "old.1.dead" / "v1").mkdir(parents=True)
    shutil.copytree(v1.path, root / "a" / "v5")
    (root / "a" / "v5" / META_NAME).unlink()  # a version dir with no meta.json
    (root / "c" / "v1").mkdir(parents=True)  # a name with nothing usable
    again = AdapterStore(root, BASE, max_rank=MAX_RANK)
    assert again.names() == ["a"] and again.versions("a") == [v1]
    assert list((root / ".staging").iterdir()) == [] and not (root / ".trash").exists()
    assert not (root / "a" / "v5").exists() and not (root / "c" / "v1").exists()
    assert again.put("a", *blobs())[0].version == 2


def test_damaged_version_is_not_listed_and_its_number_not_reused(store: AdapterStore) -> None:
    v1, _ = store.put("a", *blobs())
    v2, _ = store.put("a", *blobs())
    (v2.path / META_NAME).write_text("{broken")
    (v1.path / WEIGHTS_NAME).write_bytes(b"short")  # size no longer matches meta.json
    again = AdapterStore(store.root, BASE, max_rank=MAX_RANK)
    assert again.versions("a") == [] and again.names() == []
    assert v2.path.exists()  # kept for inspection: it is not a crash leftover
    assert again.put("a", *blobs())[0].version == 3


PICKLE_MARKER = "unpickled"


def _pickle_weights(marker: Path) -> bytes:
    return pickle.dumps({"w": Touch(marker)})


def _torch_save_weights(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": Touch(marker)}, buf)
    return buf.getvalue()


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The refusal tests below mean something only if these payloads do run on unpickling."""
    for i, make in enumerate((_pickle_weights, _torch_save_weights)):
        marker = tmp_path / f"live{i}"
        data = make(marker)
        if make is _pickle_weights:
            pickle.loads(data)
        else:
            torch.load(io.BytesIO(data), weights_only=False)
        assert marker.exists()


def _wrong_shapes() -> dict[str, torch.Tensor]:
    t = valid_tensors()
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"
    t[key] = torch.ones(2, BASE.dims["mlp.c_fc"][0] + 16)
    return t


_VALID_CONFIG, _VALID_WEIGHTS = blobs()

# (id, name, config bytes, weights bytes or a maker taking the marker path, field)
REJECTED: list[tuple[str, str, bytes, Any, str | None]] = [
    ("slash", "a/b/c", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("bad-tenant", "Acme/b", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("tenant-dotdot", "acme/..", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("dotdot", "..", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("dot", ".", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("hidden", ".staging", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("empty", "", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("long", "x" * 65, _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("at", "a@1", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("space", "a b", _VALID_CONFIG, _VALID_WEIGHTS, "name"),
    ("json", "a", b"{not json", _VALID_WEIGHTS, CONFIG_NAME),
    ("not-utf8", "a", b"\xff\xfe", _VALID_WEIGHTS, CONFIG_NAME),
    (
        "lora-field",
        "a",
        json.dumps(valid_config(use_dora=True)).encode(),
        _VALID_WEIGHTS,
        "use_dora",
    ),
    ("garbage", "a", _VALID_CONFIG, b"not a safetensors file", WEIGHTS_NAME),
    ("empty-weights", "a", _VALID_CONFIG, b"", WEIGHTS_NAME),
    ("truncated", "a", _VALID_CONFIG, _VALID_WEIGHTS[: len(_VALID_WEIGHTS) - 100], WEIGHTS_NAME),
    ("pickle", "a", _VALID_CONFIG, _pickle_weights, WEIGHTS_NAME),
    ("torch-save", "a", _VALID_CONFIG, _torch_save_weights, WEIGHTS_NAME),
    (
        "rank",
        "a",
        *blobs(valid_config(r=16), valid_tensors(r=16)),
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
    ),
    (
        "shape",
        "a",
        _VALID_CONFIG,
        save(_wrong_shapes()),
        "base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight",
    ),
    ("too-large", "a", _VALID_CONFIG, b"\0" * (1 << 20), "size"),
]


@pytest.mark.parametrize(
    ("name", "config", "weights", "field"),
    [case[1:] for case in REJECTED],
    ids=[case[0] for case in REJECTED],
)
def test_rejected_upload_changes_nothing(
    store: AdapterStore, tmp_path: Path, name: str, config: bytes, weights: Any, field: str | None
) -> None:
    store.put("a", *blobs())
    before_tree, before_list = tree(tmp_path), store.latest_all()
    marker = tmp_path.parent / f"{tmp_path.name}-{PICKLE_MARKER}"
    data = weights(marker) if callable(weights) else weights
    with pytest.raises(AdapterError) as info:
        store.put(name, config, data)
    assert info.value.field == field and info.value.adapter == name
    if field == "size":
        assert isinstance(info.value, AdapterTooLarge)
    assert tree(tmp_path) == before_tree
    assert store.latest_all() == before_list and store.versions("a") == before_list
    assert not marker.exists()
    assert store.put("a", *blobs())[0].version == 2  # a refusal uses up no version number


def test_check_name() -> None:
    for ok in ("a", "A.b_c-1", "x" * 64, "v1", "a..b"):
        check_name(ok)
    with pytest.raises(AdapterError, match=r"\[A-Za-z0-9\._-\]\{1,64\}") as info:
        check_name("no/slash")
    assert info.value.field == "name"


def test_delete(store: AdapterStore) -> None:
    v1, _ = store.put("a", *blobs())
    v2, _ = store.put("a", *blobs())
    vb, _ = store.put("b", *blobs())
    assert store.delete("a") == [v1, v2]
    assert store.names() == ["b"] and store.versions("a") == [] and store.latest("a") is None
    assert not (store.root / "a").exists()
    assert list((store.root / ".trash").iterdir()) == []
    assert store.delete("a") == [] and store.delete("never") == []
    assert store.delete("..") == [] and store.delete("b/../a") == []
    assert store.root.exists() and store.latest_all() == [vb]
    # Numbers are not reused within the process: "a@1" may still sit in an engine cache.
    assert store.put("a", *blobs())[0].version == 3
    assert AdapterStore(store.root, BASE, max_rank=MAX_RANK).versions("a")[0].version == 3


def test_put_dir_peft_saved(store: AdapterStore, tmp_path: Path) -> None:
    src = tmp_path / "peft"
    peft_adapter(src, seed=3, target_modules=["c_attn", "c_fc"])
    v, adapter = store.put_dir("from-peft", src)
    assert v.rank == 4 and v.target_modules == ("attn.c_attn", "mlp.c_fc")
    assert v.sha256 == hashlib.sha256((src / WEIGHTS_NAME).read_bytes()).hexdigest()
    direct = load_lora_adapter(src, name="x", base=BASE, max_rank=MAX_RANK)
    for a, b in zip(adapter.lora.modules, direct.modules, strict=True):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scaling == b.scaling


def test_put_dir_demo_adapters(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "s", BaseShapes.gpt2(4, 128, 512), max_rank=16)
    for src in sorted(DEMO.iterdir()):
        v, adapter = store.put_dir(src.name, src)
        if src.name == "upper-deu":
            assert v.kind == "deu" and v.rank == 0 and v.target_modules == ()
            assert adapter.lora is None and adapter.deu is not None
        else:
            assert v.kind == "lora" and v.rank == 16 and len(v.target_modules) == 4
            assert adapter.lora is not None and len(adapter.lora.modules) == 16
        assert v.size_bytes == (src / WEIGHTS_NAME).stat().st_size
    assert store.names() == ["pirate", "reverse", "sort", "upper", "upper-deu"]


def test_put_dir_refusals(store: AdapterStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CONFIG_NAME).write_bytes(_VALID_CONFIG)
    marker = tmp_path / PICKLE_MARKER
    (src / PICKLE_NAME).write_bytes(_torch_save_weights(marker))
    before = tree(store.root)
    with pytest.raises(AdapterError, match="safetensors") as info:
        store.put_dir("a", src)
    assert info.value.field == PICKLE_NAME and not marker.exists()
    (src / PICKLE_NAME).unlink()
    with pytest.raises(AdapterError) as info:
        store.put_dir("a", src)
    assert info.value.field == WEIGHTS_NAME
    with pytest.raises(AdapterError) as info:
        store.put_dir("a", tmp_path / "missing")
    assert info.value.field == "path"
    (src / WEIGHTS_NAME).write_bytes(b"\0" * (1 << 20))
    with pytest.raises(AdapterTooLarge):
        store.put_dir("a", src)
    (src / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError) as info:
        store.put_dir("a", src)
    assert info.value.field == CONFIG_NAME
    assert tree(store.root) == before and store.names() == []


def test_concurrent_puts_get_distinct_versions(store: AdapterStore) -> None:
    start = threading.Barrier(4)
    results: list[AdapterVersion] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            start.wait()
            results.append(store.put("same", *blobs())[0])
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.version for v in results) == [1, 2, 3, 4]
    assert [v.version for v in store.versions("same")] == [1, 2, 3, 4]
    assert list((store.root / ".staging").iterdir()) == []


def test_a_store_is_bound_to_one_base(tmp_path: Path) -> None:
    """base.json records the base; opening the store for another one is refused, untouched."""
    from hotlora.adapters.store import BASE_NAME, StoreMismatch

    root = tmp_path / "s"
    store = AdapterStore(root, BASE, max_rank=16)
    store.put("a", *blobs())
    record = json.loads((root / BASE_NAME).read_text())
    assert record["family"] == "gpt2" and record["n_layer"] == N_LAYER
    before = tree(root)
    llama = BaseShapes.llama(N_LAYER, 32, 64, 4, 2)
    with pytest.raises(StoreMismatch, match=r"another base model \(gpt2, .*this one is llama"):
        AdapterStore(root, llama, max_rank=16)
    deeper = BaseShapes(N_LAYER + 1, BASE.dims, BASE.layout)
    with pytest.raises(StoreMismatch, match="its own store"):
        AdapterStore(root, deeper, max_rank=16)
    assert tree(root) == before
    assert AdapterStore(root, BASE, max_rank=16).names() == ["a"]  # the same base reopens it


def test_the_base_record_is_no_adapter_name(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="the store's own file"):
        check_name("base.json")
