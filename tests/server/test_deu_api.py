"""DEU adapters over HTTP: upload -> serve -> hot swap -> delete, the vLLM load endpoint, kind
in listings and metrics, and refusals that write nothing."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from hotlora.adapters.demo_tasks import DEMO_MODEL
from hotlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, BaseShapes
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from tests.helpers import random_deu, save_deu
from tests.server.support import (
    PROMPT,
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

DEMO_BASE = BaseShapes.gpt2(4, 128)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two DEU adapters and a LoRA+DEU one (the demo upper LoRA + DEU) for the demo model."""
    root = tmp_path_factory.mktemp("deu")
    lora_dir = root / "upper-lora"
    lora_dir.mkdir()
    config, weights = demo_files("upper")
    (lora_dir / CONFIG_NAME).write_bytes(config)
    (lora_dir / WEIGHTS_NAME).write_bytes(weights)
    return {
        "v1": save_deu(root / "v1", random_deu(4, 512, seed=1, gain=2.0), DEMO_BASE),
        "v2": save_deu(root / "v2", random_deu(4, 512, seed=2, gain=2.0), DEMO_BASE),
        "both": save_deu(root / "both", random_deu(4, 512, seed=3, gain=0.05), DEMO_BASE, lora_dir),
    }


@pytest.fixture(scope="module")
def offline(dirs: dict[str, Path]) -> dict[str, str]:
    """What the offline engine generates for PROMPT with each adapter (greedy)."""
    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=4, max_adapters=4))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    out = {}
    for name, path in dirs.items():
        engine.add_adapter(name, path)
        (gen,) = engine.generate([PROMPT], [name], params)
        out[name] = gen.text
    (gen,) = engine.generate([PROMPT], None, params)
    out["base"] = gen.text
    assert len({out["v1"], out["v2"], out["base"]}) == 3, out  # the adapters change the output
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("srv")


@pytest.fixture(scope="module")
def client(root: Path, dirs: dict[str, Path]) -> Iterator[TestClient]:
    settings = make_settings(root, allowed_adapter_dirs=[dirs["v1"].parent])
    with serve(settings) as c:
        yield c


def _files(path: Path) -> tuple[bytes, bytes]:
    return (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes()


def test_upload_serve_hot_swap_delete(
    client: TestClient, dirs: dict[str, Path], offline: dict[str, str]
) -> None:
    r = upload(client, "shape", *_files(dirs["v1"]))
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "deu" and r.json()["rank"] == 0
    assert greedy_text(client, "shape", max_tokens=MAX_TOKENS) == offline["v1"]

    r = upload(client, "shape", *_files(dirs["v2"]))  # same name: a hot swap to v2
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    assert greedy_text(client, "shape", max_tokens=MAX_TOKENS) == offline["v2"]
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert listed["shape"]["kind"] == "deu" and listed["shape"]["version"] == 2

    samples = metric_samples(client)
    assert metric(samples, "hotlora_adapters_resident", kind="deu") >= 1
    assert metric(samples, "hotlora_adapter_loads_total", kind="deu", outcome="ok") >= 2

    assert client.delete("/v1/adapters/shape").status_code == 200
    assert_error(complete(client, "shape"), 404, param="model")
    assert greedy_text(client, "hotlora-demo", max_tokens=MAX_TOKENS) == offline["base"]


def test_lora_plus_deu_serves_beside_its_parts(
    client: TestClient, dirs: dict[str, Path], offline: dict[str, str]
) -> None:
    r = upload(client, "both", *_files(dirs["both"]))
    assert r.status_code == 201 and r.json()["kind"] == "lora+deu", r.text
    assert r.json()["rank"] == 16 and len(r.json()["target_modules"]) == 4
    assert greedy_text(client, "both", max_tokens=MAX_TOKENS) == offline["both"]
    assert greedy_text(client, "upper") == " HELLO"


def test_vllm_load_endpoint_takes_a_deu_directory(
    client: TestClient, dirs: dict[str, Path], offline: dict[str, str]
) -> None:
    r = client.post(
        "/v1/load_lora_adapter", json={"lora_name": "vl-deu", "lora_path": str(dirs["v1"])}
    )
    assert r.status_code == 200, r.text
    assert greedy_text(client, "vl-deu", max_tokens=MAX_TOKENS) == offline["v1"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "vl-deu"})
    assert r.status_code == 200, r.text
    assert_error(complete(client, "vl-deu"), 404)


def _bad(config: dict[str, object] | None = None, drop: str | None = None) -> tuple[bytes, bytes]:
    """A valid random DEU adapter's files with one thing broken."""
    with tempfile.TemporaryDirectory() as d:
        good_config, weights = _files(save_deu(Path(d), random_deu(4, 512, seed=9), DEMO_BASE))
    tensors = load(weights)
    if drop is not None:
        del tensors[drop]
    return json.dumps({**json.loads(good_config), **(config or {})}).encode(), save(tensors)


BAD = {
    "layer-beyond-base": (_bad({"layers": [0, 4]}), "layers"),
    "group-size": (_bad({"group_size": 3}), "group_size"),
    "missing-tensor": (_bad(drop="base_model.model.transformer.h.2.mlp.deu.b"), "no 'b'"),
    "unknown-field": (_bad({"activation": "relu"}), "unknown field"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_deu_uploads_are_400_and_write_nothing(
    client: TestClient, root: Path, case: str
) -> None:
    (config, weights), fragment = BAD[case]
    store = root / "store"
    before = store_tree(store)
    r = upload(client, f"bad-{case}", config, weights)
    assert_error(r, 400, contains=fragment)
    assert store_tree(store) == before
    assert greedy_text(client, "reverse") == " olleh"  # everything else still serves
