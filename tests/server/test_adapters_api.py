"""The adapter API: upload, list, inspect, delete, hot swap, restart, and vLLM's load/unload.

Every refused upload or load must leave the store byte-for-byte as it was and the adapter
listing unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS
from hotlora.adapters.format import BaseShapes
from hotlora.server.config import Settings
from tests.server.support import (
    DEMO,
    DEMO_NAMES,
    EXPECTED,
    Response,
    assert_error,
    complete,
    demo_files,
    greedy_text,
    make_settings,
    metric,
    metric_samples,
    serve,
    store_tree,
    upload,
)

UPLOAD_LIMIT = 600_000  # the demo adapters (~529 KB) fit; the oversize cases do not
DEMO_BASE = BaseShapes.gpt2(4, 128)


@dataclass
class Env:
    client: TestClient
    store: Path
    allowed: Path
    outside: Path


def _settings(root: Path, allowed: Path) -> Settings:
    return make_settings(root, allowed_adapter_dirs=[allowed], max_upload_bytes=UPLOAD_LIMIT)


def _layout(root: Path) -> tuple[Path, Path]:
    """allowed/{upper, dora, a-file.txt, dir-link -> outside/up, file-links/* -> outside/up/*},
    outside/up: what /v1/load_lora_adapter may and may not reach."""
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    shutil.copytree(DEMO_ADAPTERS / "upper", allowed / "upper")
    shutil.copytree(DEMO_ADAPTERS / "upper", outside / "up")
    dora = allowed / "dora"
    shutil.copytree(DEMO_ADAPTERS / "upper", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (allowed / "a-file.txt").write_text("not an adapter")
    (allowed / "dir-link").symlink_to(outside / "up", target_is_directory=True)
    (allowed / "file-links").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (allowed / "file-links" / f).symlink_to(outside / "up" / f)
    return allowed, outside


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("adapters")
    allowed, outside = _layout(root)
    with serve(_settings(root, allowed)) as client:
        yield Env(client, root / "store", allowed, outside)


def _names(client: TestClient) -> list[str]:
    r = client.get("/v1/adapters")
    assert r.status_code == 200, r.text
    return [a["name"] for a in r.json()["data"]]


def assert_nothing_written(env: Env, action: Callable[[], Response]) -> Response:
    """Run a request that must be refused; the store tree and the listing must not change."""
    tree, listing = store_tree(env.store), env.client.get("/v1/adapters").json()
    resp = action()
    assert resp.status_code >= 400, resp.text
    assert store_tree(env.store) == tree
    assert env.client.get("/v1/adapters").json() == listing
    return resp


def _config(**changes: Any) -> bytes:
    cfg = json.loads(demo_files("upper")[0])
    cfg.update(changes)
    return json.dumps(cfg).encode()


def _rank_adapter(r: int) -> tuple[bytes, bytes]:
    """An adapter for the demo base on attn.c_attn only, with rank r (float16 to stay small)."""
    d_in, d_out = DEMO_BASE.dims["attn.c_attn"]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(DEMO_BASE.n_layer):
        key = f"base_model.model.transformer.h.{layer}.attn.c_attn"
        tensors[f"{key}.lora_A.weight"] = 0.01 * torch.randn(r, d_in, generator=gen).half()
        tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(d_out, r, generator=gen).half()
    config = _config(r=r, lora_alpha=2 * r, target_modules=["attn.c_attn"])
    return config, save_safetensors(tensors, metadata={"format": "pt"})


class _Touch:
    """Unpickling this creates `path`: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"base_model.model.h.0.attn.c_attn.lora_A.weight": _Touch(marker)})


def _torch_pickle(marker: Path) -> bytes:  # what an adapter_model.bin really is
    buf = io.BytesIO()
    torch.save({"base_model.model.h.0.attn.c_attn.lora_A.weight": _Touch(marker)}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def wrong_base_weights(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A peft adapter for a 4-layer GPT-2 with n_embd=48 (the demo base has 128)."""
    from tests.helpers import make_hf_model, make_peft_adapter

    root = tmp_path_factory.mktemp("wrong-base")
    with warnings.catch_warnings():  # peft's fan_in_fan_out notice for Conv1D
        warnings.simplefilter("ignore")
        model = make_hf_model(root / "model", n_embd=48, n_layer=4, n_head=4)
        make_peft_adapter(model, root / "adapter")
    return (root / "adapter" / "adapter_model.safetensors").read_bytes()


# ---------------------------------------------------------------- upload, list, inspect


def test_upload_returns_201_with_the_stored_version(env: Env) -> None:
    config, weights = demo_files("upper")
    r = upload(env.client, "my-upper", config, weights)
    assert r.status_code == 201, r.text
    body = r.json()
    assert {"name", "version", "rank", "target_modules", "size_bytes", "sha256", "created"} <= set(
        body
    )
    assert body["name"] == "my-upper" and body["version"] == 1
    assert body["rank"] == 16
    assert body["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert body["size_bytes"] == len(weights)
    assert body["sha256"] == hashlib.sha256(weights).hexdigest()
    assert isinstance(body["created"], int)
    assert (env.store / "my-upper" / "v1" / "adapter_model.safetensors").read_bytes() == weights


def test_uploaded_adapter_serves_and_is_listed_as_a_model(env: Env) -> None:
    upload(env.client, "served-rev", *demo_files("reverse"))
    assert greedy_text(env.client, "served-rev") == EXPECTED["reverse"]
    cards = {m["id"]: m for m in env.client.get("/v1/models").json()["data"]}
    assert cards["served-rev"]["parent"] == DEMO


@pytest.mark.parametrize("name", ["x" * 64, "a.b_c-D9", "9"])
def test_boundary_names_are_accepted(env: Env, name: str) -> None:
    assert upload(env.client, name, *demo_files("sort")).status_code == 201
    assert name in _names(env.client)


def test_same_name_again_is_a_new_version_that_serves(env: Env) -> None:
    samples = metric_samples(env.client)
    swaps = metric(samples, "hotlora_adapter_hot_swaps_total")
    first = upload(env.client, "swap", *demo_files("reverse")).json()
    assert greedy_text(env.client, "swap") == EXPECTED["reverse"]
    r = upload(env.client, "swap", *demo_files("upper"))
    assert r.status_code == 201, r.text
    second = r.json()
    assert (first["version"], second["version"]) == (1, 2)
    assert second["sha256"] == hashlib.sha256(demo_files("upper")[1]).hexdigest()
    assert greedy_text(env.client, "swap") == EXPECTED["upper"]  # new requests get v2
    detail = env.client.get("/v1/adapters/swap").json()
    assert detail["versions"] == [1, 2] and detail["version"] == 2
    assert metric(metric_samples(env.client), "hotlora_adapter_hot_swaps_total") == swaps + 1


def test_list_adapters_gives_the_latest_version_of_each_name(env: Env) -> None:
    upload(env.client, "listed", *demo_files("pirate"))
    upload(env.client, "listed", *demo_files("pirate"))
    r = env.client.get("/v1/adapters")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    names = [a["name"] for a in body["data"]]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert set(DEMO_NAMES) | {"listed"} <= set(names)
    by_name = {a["name"]: a for a in body["data"]}
    assert by_name["listed"]["version"] == 2
    assert by_name["reverse"]["version"] == 1 and by_name["reverse"]["rank"] == 16


def test_get_adapter_shows_versions_and_residency(env: Env) -> None:
    greedy_text(env.client, "sort")
    r = env.client.get("/v1/adapters/sort")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "sort" and body["versions"] == [1] and body["resident"] is True
    assert body["sha256"] == hashlib.sha256(demo_files("sort")[1]).hexdigest()


def test_get_unknown_adapter_is_404(env: Env) -> None:
    assert_error(env.client.get("/v1/adapters/nope"), 404, param="name", contains="nope")


def test_delete_removes_every_version_and_the_model(env: Env) -> None:
    upload(env.client, "doomed", *demo_files("upper"))
    upload(env.client, "doomed", *demo_files("upper"))
    assert greedy_text(env.client, "doomed") == EXPECTED["upper"]
    r = env.client.delete("/v1/adapters/doomed")
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "doomed", "deleted": True}
    assert_error(complete(env.client, "doomed"), 404, param="model")
    assert "doomed" not in [m["id"] for m in env.client.get("/v1/models").json()["data"]]
    assert_error(env.client.get("/v1/adapters/doomed"), 404)
    assert not (env.store / "doomed").exists()
    assert "doomed" not in _names(env.client)


def test_delete_unknown_adapter_is_404(env: Env) -> None:
    assert_error(
        assert_nothing_written(env, lambda: env.client.delete("/v1/adapters/ghost")),
        404,
        param="name",
        contains="ghost",
    )


def test_an_adapter_damaged_on_disk_fails_its_requests_and_nothing_else(env: Env) -> None:
    assert upload(env.client, "fragile", *demo_files("upper")).status_code == 201
    weights = env.store / "fragile" / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float32 becomes +inf; the size is unchanged
    weights.write_bytes(bytes(data))
    before = metric(metric_samples(env.client), "hotlora_adapter_loads_total", outcome="error")
    assert_error(complete(env.client, "fragile"), 503, contains=("fragile", "NaN or Inf"))
    # A stream that fails before its first token still gets a status code, not an SSE body.
    assert_error(complete(env.client, "fragile", stream=True), 503, contains="NaN or Inf")
    after = metric(metric_samples(env.client), "hotlora_adapter_loads_total", outcome="error")
    assert after == before + 2
    assert greedy_text(env.client, "upper") == EXPECTED["upper"]


# ---------------------------------------------------------------- refused uploads


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "has space", ".hidden", ".."])
def test_bad_names_are_400_and_write_nothing(env: Env, name: str) -> None:
    r = assert_nothing_written(env, lambda: upload(env.client, name, *demo_files("upper")))
    assert_error(r, 400, param="name", contains="name")


BAD_CONFIGS = {
    "not-json": (b"{not json", "JSON"),
    "json-array": (b"[1, 2]", "JSON object"),
    "dora": (_config(use_dora=True), "DoRA"),
    "prefix-tuning": (_config(peft_type="PREFIX_TUNING"), "serves PEFT 'LORA' adapters"),
    "no-peft-type": (
        json.dumps({k: v for k, v in json.loads(_config()).items() if k != "peft_type"}).encode(),
        "peft_type",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_are_400_and_write_nothing(env: Env, case: str) -> None:
    config, fragment = BAD_CONFIGS[case]
    weights = demo_files("upper")[1]
    r = assert_nothing_written(env, lambda: upload(env.client, f"cfg-{case}", config, weights))
    assert_error(r, 400, contains=fragment)


def _truncated() -> bytes:
    w = demo_files("upper")[1]
    return w[: len(w) // 2]


BAD_WEIGHTS = {
    "random-bytes": lambda: bytes(range(256)) * 64,
    "truncated": _truncated,
    "empty": lambda: b"",
    "header-only": lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": 1}        ',
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_corrupt_safetensors_are_400_and_write_nothing(env: Env, case: str) -> None:
    config, weights = demo_files("upper")[0], BAD_WEIGHTS[case]()
    r = assert_nothing_written(env, lambda: upload(env.client, f"w-{case}", config, weights))
    assert_error(r, 400, contains="safetensors")


@pytest.mark.parametrize("make", [_raw_pickle, _torch_pickle], ids=["pickle", "torch-save"])
def test_pickled_weights_are_refused_and_never_unpickled(
    env: Env, tmp_path: Path, make: Callable[[Path], bytes]
) -> None:
    # The payload is live: loading it the unsafe way does create its marker.
    control = tmp_path / "control"
    if make is _raw_pickle:
        pickle.loads(make(control))
    else:
        torch.load(io.BytesIO(make(control)), weights_only=False)
    assert control.exists()

    marker = tmp_path / "unpickled"
    config = demo_files("upper")[0]
    r = assert_nothing_written(env, lambda: upload(env.client, "pickled", config, make(marker)))
    assert_error(r, 400, contains="safetensors")
    assert not marker.exists()
    assert_error(complete(env.client, "pickled"), 404)
    assert not marker.exists()


def test_rank_above_max_rank_is_400_and_writes_nothing(env: Env) -> None:
    ok = upload(env.client, "rank-64", *_rank_adapter(64))  # the limit itself is fine
    assert ok.status_code == 201, ok.text
    assert ok.json()["rank"] == 64
    r = assert_nothing_written(env, lambda: upload(env.client, "rank-65", *_rank_adapter(65)))
    assert_error(r, 400, contains=("rank 65", "max_rank 64"))


def test_adapter_for_a_different_size_base_is_400(env: Env, wrong_base_weights: bytes) -> None:
    config = _config(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8)
    r = assert_nothing_written(
        env, lambda: upload(env.client, "wrong-base", config, wrong_base_weights)
    )
    assert_error(r, 400, contains=("does not fit", "expected"))


@pytest.mark.parametrize(
    ("config_size", "weights_size", "fragment"),
    [
        (None, 700_000, "exceeds the 600000-byte limit"),  # refused by Content-Length
        (None, 620_000, "weights is larger than the 600000-byte"),  # while reading the part
        (None, 599_000, "over the 600000-byte limit"),  # config + weights together
        (610_000, 10, "config is larger than the 600000-byte"),
    ],
)
def test_upload_over_max_upload_bytes_is_413_and_writes_nothing(
    env: Env, config_size: int | None, weights_size: int, fragment: str
) -> None:
    config = demo_files("upper")[0] if config_size is None else b" " * config_size
    weights = b"\0" * weights_size
    r = assert_nothing_written(env, lambda: upload(env.client, "too-big", config, weights))
    assert_error(r, 413, contains=fragment)


@pytest.mark.parametrize("missing", ["name", "config", "weights"])
def test_missing_form_field_is_400(env: Env, missing: str) -> None:
    parts: dict[str, Any] = dict(
        zip(("config", "weights"), demo_files("upper"), strict=True), name="partial"
    )
    parts[missing] = None
    r = assert_nothing_written(env, lambda: upload(env.client, **parts))
    assert_error(r, 400, param=missing, contains="required")


def test_adapter_named_like_the_base_model_is_refused(env: Env) -> None:
    r = assert_nothing_written(env, lambda: upload(env.client, DEMO, *demo_files("upper")))
    assert r.status_code in (400, 409)


def test_recreating_a_deleted_name_is_not_a_hot_swap(env: Env) -> None:
    upload(env.client, "phoenix", *demo_files("upper"))
    assert env.client.delete("/v1/adapters/phoenix").status_code == 200
    before = metric(metric_samples(env.client), "hotlora_adapter_hot_swaps_total")
    assert upload(env.client, "phoenix", *demo_files("upper")).status_code == 201
    assert metric(metric_samples(env.client), "hotlora_adapter_hot_swaps_total") == before


# ---------------------------------------------------------------- vLLM load / unload


def _load(env: Env, name: str, path: Path | str) -> Response:
    return env.client.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
    )


def test_load_from_an_allowed_dir_serves_then_unload_removes(env: Env) -> None:
    r = _load(env, "vl-upper", env.allowed / "upper")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "vl-upper" in body["message"] and body["name"] == "vl-upper" and body["version"] == 1
    assert greedy_text(env.client, "vl-upper") == EXPECTED["upper"]
    assert "vl-upper" in [m["id"] for m in env.client.get("/v1/models").json()["data"]]

    r = env.client.post("/v1/unload_lora_adapter", json={"lora_name": "vl-upper"})
    assert r.status_code == 200, r.text
    assert "vl-upper" in r.json()["message"]
    assert_error(complete(env.client, "vl-upper"), 404)
    assert "vl-upper" not in _names(env.client)


def test_load_under_an_existing_name_is_400(env: Env) -> None:
    r = assert_nothing_written(env, lambda: _load(env, "reverse", env.allowed / "upper"))
    assert_error(r, 400, param="lora_name", contains=("already loaded", "unload"))
    assert greedy_text(env.client, "reverse") == EXPECTED["reverse"]


@pytest.mark.parametrize(
    ("where", "status", "fragment"),
    [
        ("outside", 403, "outside the allowed"),
        ("dir-link", 403, "outside the allowed"),  # symlink inside allowed -> outside
        ("traversal", 403, "outside the allowed"),  # allowed/../outside/up
        ("missing", 400, "does not exist"),
        ("a-file", 400, "not a directory"),
        ("dora", 400, "DoRA"),
    ],
)
def test_load_refusals_write_nothing(env: Env, where: str, status: int, fragment: str) -> None:
    paths: dict[str, Path | str] = {
        "outside": env.outside / "up",
        "dir-link": env.allowed / "dir-link",
        "traversal": f"{env.allowed}/../outside/up",
        "missing": env.allowed / "missing",
        "a-file": env.allowed / "a-file.txt",
        "dora": env.allowed / "dora",
    }
    path = paths[where]
    r = assert_nothing_written(env, lambda: _load(env, f"vl-{where}", path))
    assert_error(r, status, contains=fragment)
    assert_error(complete(env.client, f"vl-{where}"), 404)


def test_load_with_a_bad_name_is_400(env: Env) -> None:
    r = assert_nothing_written(env, lambda: _load(env, "../escape", env.allowed / "upper"))
    assert_error(r, 400, param="lora_name")


def test_load_refuses_file_symlinks_that_leave_the_allowed_dir(env: Env) -> None:
    r = assert_nothing_written(env, lambda: _load(env, "vl-file-links", env.allowed / "file-links"))
    assert_error(r, 403, param="lora_path")


def test_missing_path_outside_the_allowed_dirs_is_403_like_an_existing_one(env: Env) -> None:
    assert_error(_load(env, "vl-probe", env.outside / "up"), 403)
    r = assert_nothing_written(env, lambda: _load(env, "vl-probe", env.outside / "no-such-dir"))
    assert_error(r, 403, param="lora_path")


def test_unload_unknown_is_404(env: Env) -> None:
    r = env.client.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
    assert_error(r, 404, param="lora_name", contains="never-loaded")


def test_load_without_allowed_dirs_is_403(tmp_path: Path) -> None:
    _layout(tmp_path)
    with serve(make_settings(tmp_path)) as client:
        store = tmp_path / "store"
        tree = store_tree(store)
        r = client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "x", "lora_path": str(tmp_path / "allowed" / "upper")},
        )
        assert_error(r, 403, param="lora_path", contains="HOTLORA_ALLOWED_ADAPTER_DIRS")
        assert store_tree(store) == tree


# ---------------------------------------------------------------- restart


def test_a_restarted_server_lists_and_serves_everything_stored(tmp_path: Path) -> None:
    allowed, _ = _layout(tmp_path)
    settings = _settings(tmp_path, allowed)
    with serve(settings) as first:
        assert upload(first, "keep", *demo_files("reverse")).status_code == 201
        assert upload(first, "keep", *demo_files("upper")).status_code == 201
        loaded = first.post(
            "/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(allowed / "upper")}
        )
        assert loaded.status_code == 200, loaded.text
        assert first.delete("/v1/adapters/pirate").status_code == 200
        listing = first.get("/v1/adapters").json()

    with serve(settings) as second:
        assert second.get("/v1/adapters").json() == listing  # the deleted demo stays deleted
        assert sorted(_names(second)) == ["keep", "reverse", "sort", "upper", "upper-deu", "vl"]
        detail = second.get("/v1/adapters/keep").json()
        assert detail["versions"] == [1, 2]
        assert greedy_text(second, "keep") == EXPECTED["upper"]
        assert greedy_text(second, "vl") == EXPECTED["upper"]
        assert greedy_text(second, "reverse") == EXPECTED["reverse"]
        ids = [m["id"] for m in second.get("/v1/models").json()["data"]]
        assert ids == [DEMO, "keep", "reverse", "sort", "upper", "upper-deu", "vl"]
        assert upload(second, "keep", *demo_files("sort")).json()["version"] == 3


def test_a_request_whose_adapter_is_deleted_before_it_loads_gets_404(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the soak found: resolve a version, lose it to a delete, then try to load it."""
    assert upload(env.client, "vanishing", *demo_files("upper")).status_code == 201
    state = env.client.app.state.hotlora  # type: ignore[attr-defined]
    stale = state.store.latest("vanishing")
    assert env.client.delete("/v1/adapters/vanishing").status_code == 200
    monkeypatch.setattr(state.store, "latest", lambda name: stale)  # resolved before the delete
    for stream in (False, True):
        assert_error(
            complete(env.client, "vanishing", stream=stream), 404, param="model", contains="deleted"
        )
    monkeypatch.undo()
    waiting = metric(metric_samples(env.client), "hotlora_num_requests_waiting")
    assert waiting == 0  # the failed requests left the queue exactly once
    assert greedy_text(env.client, "upper") == EXPECTED["upper"]
