"""Every mistake at the command line ends in one line on stderr and an exit code, no traceback.

Each test runs the real `hotlora` console script in a subprocess and checks the exact line and
exit code (2 usage, 3 model or store, 4 address: server/cli_errors.py). The mistakes are all
found before anything loads (server/preflight.py), so each run takes about the import time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from hotlora.adapters.demo_tasks import DEMO_MODEL, LLAMA_DEMO_MODEL

HOTLORA = Path(sys.executable).parent / "hotlora"
HELP = "hotlora serve --help lists every setting"
MODEL_DIR_HINT = (
    "point --model at a Hugging Face model directory: config.json, model.safetensors and the "
    "tokenizer files"
)


def hotlora(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`hotlora serve ARGS` in tmp_path with no HOTLORA_* of the caller's, a store of its own
    and a free port (0), so a run that got further than it should writes nothing elsewhere."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    environ |= {"HOTLORA_ADAPTER_STORE": str(tmp_path / "store"), "HOTLORA_PORT": "0"}
    environ |= env or {}
    return subprocess.run(
        [str(HOTLORA), *args], cwd=tmp_path, env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def assert_error(result: subprocess.CompletedProcess[str], code: int, line: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"hotlora: error: {line}\n"
    assert result.returncode == code


def demo_copy(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model, ignore=shutil.ignore_patterns("adapters"))
    return model


# -------------------------------------------------------------------- the model (exit 3)


def test_a_model_path_that_does_not_exist(tmp_path: Path) -> None:
    model = tmp_path / "nonexistent"
    result = hotlora(tmp_path, "serve", "--model", str(model))
    assert_error(result, 3, f"model directory {model} does not exist; {MODEL_DIR_HINT}")


def test_a_directory_without_config_json(tmp_path: Path) -> None:
    model = demo_copy(tmp_path)
    (model / "config.json").unlink()
    result = hotlora(tmp_path, "serve", "--model", str(model))
    assert_error(result, 3, f"{model} has no config.json; {MODEL_DIR_HINT}")


def test_an_unsupported_model_type(tmp_path: Path) -> None:
    model = demo_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = hotlora(tmp_path, "serve", "--model", str(model))
    assert_error(
        result, 3,
        f"{model}/config.json: model_type 'bert' is not supported (one of ['gpt2', 'llama', "
        "'mistral', 'qwen2', 'qwen3']); serve a model of one of these families",
    )  # fmt: skip


def test_a_missing_tensor(tmp_path: Path) -> None:
    model = demo_copy(tmp_path)
    weights = load_file(model / "model.safetensors")
    del weights["transformer.h.3.mlp.c_proj.bias"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    result = hotlora(tmp_path, "serve", "--model", str(model))
    assert_error(
        result, 3,
        f"{model}: checkpoint does not match config.json: missing ['h.3.mlp.c_proj.bias']; "
        "re-download or re-export the model",
    )  # fmt: skip


def test_an_adapter_store_bound_to_another_base(tmp_path: Path) -> None:
    from hotlora.adapters.format import BaseShapes
    from hotlora.adapters.store import AdapterStore
    from hotlora.server.engine.loader import read_config

    store = tmp_path / "llama-store"
    _, cfg = read_config(LLAMA_DEMO_MODEL)
    AdapterStore(store, BaseShapes(cfg.n_layer, cfg.target_dims(), cfg.layout), 64)
    result = hotlora(tmp_path, "serve", "--adapter-store", str(store))
    assert_error(
        result, 3,
        f"adapter store {store} holds adapters for another base model (llama, 4 layers; this "
        "one is gpt2, 4 layers); give this model its own store (--adapter-store / "
        "HOTLORA_ADAPTER_STORE)",
    )  # fmt: skip


# -------------------------------------------------------------------- the address (exit 4)


def test_the_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = hotlora(tmp_path, "serve", "--port", str(port))
    assert_error(
        result, 4, f"port {port} on 127.0.0.1 is in use; stop what listens there or pass "
        "another --port",
    )  # fmt: skip


# -------------------------------------------------------------------- usage (exit 2)


def test_an_invalid_tenants_file(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": [{"name": "acme"}]}))
    result = hotlora(tmp_path, "serve", "--tenants-file", str(tenants))
    assert_error(
        result, 2,
        f"{tenants}: invalid tenants file: tenants.0.keys_sha256: Field required; fix the file "
        "named by --tenants-file / HOTLORA_TENANTS_FILE",
    )  # fmt: skip


def test_an_unreadable_chat_template(tmp_path: Path) -> None:
    template = tmp_path / "missing.jinja"
    result = hotlora(tmp_path, "serve", "--chat-template", str(template))
    assert_error(
        result, 2,
        f"{template}: cannot read the chat template (No such file or directory); fix the file "
        "or pass a working one with --chat-template FILE",
    )  # fmt: skip


def test_an_invalid_chat_template(tmp_path: Path) -> None:
    template = tmp_path / "bad.jinja"
    template.write_text("{% for message in %}{{ message }}{% endfor %}")
    result = hotlora(tmp_path, "serve", "--chat-template", str(template))
    assert_error(
        result, 2,
        f"{template}: the chat template does not compile: Expected an expression, got 'end of "
        "statement block' (line 1); fix the file or pass a working one with --chat-template "
        "FILE",
    )  # fmt: skip


def test_an_invalid_hotlora_variable_is_named(tmp_path: Path) -> None:
    result = hotlora(tmp_path, "serve", env={"HOTLORA_MAX_QUEUE": "many"})
    assert_error(
        result, 2,
        "HOTLORA_MAX_QUEUE='many': Input should be a valid integer, unable to parse string as "
        f"an integer; set a valid HOTLORA_MAX_QUEUE or unset it ({HELP})",
    )  # fmt: skip


def test_replicas_without_ray(tmp_path: Path) -> None:
    # Ray is installed here: a `ray` package first on the path that fails to import stands in
    # for its absence.
    (tmp_path / "noray" / "ray").mkdir(parents=True)
    (tmp_path / "noray" / "ray" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n"
    )
    noray = {"PYTHONPATH": str(tmp_path / "noray")}
    result = hotlora(tmp_path, "serve", "--replicas", "2", env=noray)
    assert_error(
        result, 2,
        "--replicas needs Ray Serve, which is not installed; pip install 'hotlora[ray]', or "
        "leave out --replicas to serve in one process",
    )  # fmt: skip


def test_an_unknown_flag(tmp_path: Path) -> None:
    result = hotlora(tmp_path, "serve", "--max-runing", "4")
    assert_error(result, 2, "unrecognized arguments: --max-runing 4; see hotlora --help")


# -------------------------------------------------------------------- -v, and later failures


def test_verbose_adds_the_traceback(tmp_path: Path) -> None:
    model = tmp_path / "nonexistent"
    result = hotlora(tmp_path, "-v", "serve", "--model", str(model))
    assert result.returncode == 3
    assert "Traceback" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last == f"hotlora: error: model directory {model} does not exist; {MODEL_DIR_HINT}"


def test_a_start_up_failure_past_the_checks_is_one_line_too(tmp_path: Path) -> None:
    """What fails in the app's start-up (the engine, after the checks) ends in the same kind of
    line, without uvicorn's traceback."""
    script = (
        "import sys\n"
        "from hotlora.server.engine import core\n"
        "from hotlora.server.engine.errors import ModelLoadError\n"
        "def fail(*args, **kwargs):\n"
        "    raise ModelLoadError('simulated: the engine failed to load; free some memory')\n"
        "core.EngineCore.build = fail\n"
        "from hotlora.server.cli import main\n"
        "sys.exit(main(['serve', '--no-engine-process', '--log-level', 'error']))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    environ |= {"HOTLORA_ADAPTER_STORE": str(tmp_path / "store"), "HOTLORA_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-P", "-c", script], cwd=tmp_path, env=environ, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert_error(result, 3, "simulated: the engine failed to load; free some memory")
