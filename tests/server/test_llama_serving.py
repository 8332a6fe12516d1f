"""`hotlora serve --model DIR` for Llama, Mistral, Qwen2 and Qwen3 directories written by
transformers: PEFT adapters uploaded over HTTP, greedy outputs equal to transformers + peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from hotlora.server.engine.tokenizer import load_tokenizer
from tests.helpers import make_hf_llama, make_peft_adapter, random_prompts
from tests.server.support import make_settings, serve, upload

FAMILIES = ("llama3-gqa2", "mistral-gqa4", "qwen2-bias-tied", "qwen3-qknorm")
MAX_TOKENS = 10


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_uploaded_peft_adapter_serves_like_transformers_and_peft(
    tmp_path: Path, family: str
) -> None:
    base_dir, adapter_dir = tmp_path / family, tmp_path / "adapter"
    hf = make_hf_llama(base_dir, family)
    peft_model = make_peft_adapter(hf, adapter_dir, seed=3, target_modules="all-linear", r=4,
                                   lora_alpha=8)
    tok = load_tokenizer(base_dir)
    prompts: list[str | list[int]] = [*random_prompts(2, seed=5), "in: hello\nout:"]
    settings = make_settings(tmp_path, model=base_dir, seed_demo_adapters=False)
    with serve(settings) as client:
        r = upload(client, "tuned", (adapter_dir / CONFIG_NAME).read_bytes(),
                   (adapter_dir / WEIGHTS_NAME).read_bytes())
        assert r.status_code == 201, r.text
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert models == [family, "tuned"]
        for model_name, reference in ((family, hf), ("tuned", peft_model)):
            for prompt in prompts:
                body = {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
                assert choice["text"] == tok.decode(_hf_greedy(reference, ids))
                assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
