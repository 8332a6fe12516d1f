"""The whole engine on a CUDA GPU (Triton LoRA and DEU kernels, fp32/fp16/bf16) against the CPU
fp32 engine, the reference every CPU test already holds to transformers + peft. Skipped without
CUDA; `load_tests/gpu_check.sh` runs it on the first GPU available."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.layout import LLAMA_LAYOUT
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from tests.helpers import (
    make_hf_llama,
    make_hf_model,
    make_peft_adapter,
    random_deu,
    random_prompts,
    save_deu,
)

pytestmark = pytest.mark.gpu

# Logits of the CUDA engine against the CPU fp32 engine, per CUDA dtype.
TOLERANCE = {
    "float32": {"rtol": 1e-3, "atol": 1e-3},  # TF32 is off by default for matmuls
    "float16": {"rtol": 0.02, "atol": 0.05},
    "bfloat16": {"rtol": 0.05, "atol": 0.3},  # the CPU bf16 engine measured 0.205 here
}


@pytest.fixture(scope="module", params=["gpt2", "llama3-gqa2"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A base directory and its LoRA and DEU adapter directories."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    if family == "gpt2":
        hf = make_hf_model(path, n_layer=3)
        lora_kwargs: dict[str, Any] = {}
        deu = random_deu(3, 4 * 48, seed=5)
    else:
        hf = make_hf_llama(path, family)
        lora_kwargs = {"target_modules": "all-linear"}
        deu = random_deu(3, 96, seed=5, layout=LLAMA_LAYOUT)
    lora = tmp_path_factory.mktemp("lora")
    make_peft_adapter(hf, lora, seed=3, **lora_kwargs)
    return path, {"lora": lora, "deu": save_deu(tmp_path_factory.mktemp("deu"), deu, None)}


def _engine(path: Path, adapters: dict[str, Path], device: str, dtype: str) -> Engine:
    config = EngineConfig(max_batch=8, max_adapters=4, max_rank=8, device=device, dtype=dtype)
    engine = Engine.from_pretrained(path, config)
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    return engine


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_cuda_engine_matches_cpu_fp32_and_mixed_rows_equal_solo(
    model: tuple[Path, dict[str, Path]], dtype: str
) -> None:
    path, adapters = model
    cpu = _engine(path, adapters, "cpu", "float32")
    gpu = _engine(path, adapters, "cuda", dtype)
    names: list[str | None] = [None, "lora", "deu", "lora", None, "deu"]
    prompts = random_prompts(len(names), seed=3)
    want = cpu.prompt_logits(prompts, names)
    got = gpu.prompt_logits(prompts, names)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, **TOLERANCE[dtype])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    mixed = gpu.generate(prompts, names, params)
    for p, n, m in zip(prompts, names, mixed, strict=True):
        assert gpu.generate([p], [n], params)[0].token_ids == m.token_ids
