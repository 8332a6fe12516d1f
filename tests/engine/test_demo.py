"""The shipped demo assets: each adapter solves its task, the base alone does not, in one batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.adapters.demo_tasks import (
    DEMO_ADAPTER_TASKS,
    DEMO_MODEL,
    DEMO_TASKS,
    LLAMA_DEMO_MODEL,
    TASKS,
    demo_adapters,
    heldout,
)
from hotlora.adapters.format import BaseShapes
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from hotlora.server.engine.loader import read_config
from tests.helpers import hf_with_deu

N = 50  # held-out prompts per task
DEMOS = [DEMO_MODEL, LLAMA_DEMO_MODEL]


# Held-out accuracy each shipped adapter must reach: the LoRA adapters solve their tasks; the DEU
# adapters measured 50% (GPT-2) and 100% (Llama) on 200 prompts (README), far above the
# base's 0%.
MIN_ACCURACY = {
    DEMO_MODEL: {**{name: 0.9 for name in DEMO_TASKS}, "upper-deu": 0.3},
    LLAMA_DEMO_MODEL: {"reverse": 0.9, "upper-deu": 0.9},
}


def _shapes(model_dir: Path) -> BaseShapes:
    _, cfg = read_config(model_dir)
    return BaseShapes(cfg.n_layer, cfg.target_dims(), cfg.layout)


@pytest.mark.parametrize("model_dir", DEMOS, ids=lambda p: p.name)
def test_demo_adapters_reach_accuracy_inside_one_mixed_batch(model_dir: Path) -> None:
    shipped = demo_adapters(model_dir)
    names = list(shipped)
    rows: list[tuple[str, str | None, str]] = []  # (prompt, adapter, expected)
    for name in names:
        for prompt, want in heldout(TASKS[shipped[name][1]], N):
            rows += [(prompt, name, want), (prompt, None, want)]
    engine = Engine.from_pretrained(model_dir, EngineConfig(max_batch=len(rows), max_rank=16))
    for name in names:
        engine.add_adapter(name, shipped[name][0])
    outs = engine.generate(
        [p for p, _, _ in rows],
        [a for _, a, _ in rows],
        SamplingParams(max_tokens=24, temperature=0.0),
    )
    solved: dict[tuple[str, bool], int] = {}
    for i, ((_, adapter, want), out) in enumerate(zip(rows, outs, strict=True)):
        name = names[i // (2 * N)]
        key = (name, adapter is not None)
        solved[key] = solved.get(key, 0) + (out.text.strip() == want)
    for name in names:
        got = solved[(name, True)]
        assert got / N >= MIN_ACCURACY[model_dir][name], f"{name} adapter: {got}/{N}"
        assert solved[(name, False)] / N <= 0.1, (
            f"base alone solves {name}: {solved[(name, False)]}/{N}"
        )


@pytest.mark.parametrize("targets", [[], ["all-linear"]], ids=["listed", "all-linear"])
@pytest.mark.parametrize("model_dir", DEMOS, ids=lambda p: p.name)
def test_train_script_writes_an_adapter_peft_loads(
    tmp_path: Path, model_dir: Path, targets: list[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hotlora.training.train import main

    out = tmp_path / "upper"
    argv = ["--base", str(model_dir), "--task", "upper", "--out", str(out), "--steps", "3"]
    main([*argv, "--rank", "2", *(["--targets", *targets] if targets else [])])
    config = json.loads((out / "adapter_config.json").read_text())
    every = sorted(_shapes(model_dir).layout.targets)
    assert config["target_modules"] == ("all-linear" if targets else every)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert_served_like(model_dir, out, PeftModel.from_pretrained(hf, out).eval())


def assert_served_like(model_dir: Path, adapter_dir: Path, reference: Any) -> None:
    """The engine's logits with the adapter equal the reference HF model's, on one prompt."""
    engine = Engine.from_pretrained(
        model_dir, EngineConfig(max_batch=2, max_adapters=1, max_rank=2)
    )
    engine.add_adapter("x", adapter_dir)
    ids = engine.encode("in: abc\nout:")
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.prompt_logits([ids], ["x"])[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["deu", "lora+deu"])
@pytest.mark.parametrize("model_dir", DEMOS, ids=lambda p: p.name)
def test_train_script_writes_a_deu_adapter_the_engine_serves_exactly(
    tmp_path: Path, kind: str, model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hotlora.adapters.adapter import load_adapter
    from hotlora.training.train import main

    out = tmp_path / kind
    argv = ["--base", str(model_dir), "--task", "upper", "--out", str(out), "--kind", kind]
    main([*argv, "--steps", "4", "--rank", "2", "--layers", "1", "3", "--group-size", "4"])
    adapter = load_adapter(out, name="x", base=_shapes(model_dir), max_rank=2)
    assert adapter.kind == kind and adapter.deu is not None
    assert adapter.deu.config.layers == (1, 3) and adapter.deu.config.group_size == 4
    assert all(bool(p[5].abs().sum() > 0) for p in adapter.deu.params.values())  # it trained
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if kind == "lora+deu":
        lora_dir = tmp_path / "lora-part"  # PEFT reads the embedded LoRA config on its own
        lora_dir.mkdir()
        config = json.loads((out / "adapter_config.json").read_text())["lora"]
        (lora_dir / "adapter_config.json").write_text(json.dumps(config))
        shutil.copy(out / "adapter_model.safetensors", lora_dir)
        hf = PeftModel.from_pretrained(hf, lora_dir).eval()
    assert_served_like(model_dir, out, hf_with_deu(hf, adapter.deu))


def test_cli_demo_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    from hotlora.server.cli import main

    assert main(["demo", "hello", "2718"]) == 0
    lines = capsys.readouterr().out.splitlines()
    word = [n for n, t in DEMO_ADAPTER_TASKS.items() if TASKS[t].accepts("hello")]
    assert len(word) == len(DEMO_ADAPTER_TASKS) - 1 and TASKS["sort"].accepts("2718")
    assert len(lines) == 1 + (1 + len(word)) + 2  # header, hello rows, 2718 rows
    rows = {line.split()[0] + " " + line.split()[2]: line.rstrip() for line in lines[1:]}
    for name in DEMO_TASKS:  # every LoRA demo adapter solves both words it accepts
        word_in = "2718" if name == "sort" else "hello"
        assert rows[f"{name} {word_in}"].endswith(" ok"), rows
    assert "upper-deu hello" in rows and "base hello" in rows


def test_cli_demo_runs_the_llama_demo(capsys: pytest.CaptureFixture[str]) -> None:
    from hotlora.server.cli import main

    assert main(["demo", "--model", str(LLAMA_DEMO_MODEL), "hello"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.rstrip() for line in lines[1:]}
    assert set(rows) == {"base", *demo_adapters(LLAMA_DEMO_MODEL)}
    assert rows["reverse"].endswith(" ok"), rows
