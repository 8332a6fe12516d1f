"""Settings come from HOTLORA_<NAME> variables or keywords, validated once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from hotlora.server.cli import main
from hotlora.server.config import Settings


def test_environment_variables_are_read_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTLORA_ADMIN_KEY", "secret")
    monkeypatch.setenv("HOTLORA_API_KEYS", "k1, k2,")
    monkeypatch.setenv("HOTLORA_ALLOWED_ADAPTER_DIRS", os.pathsep.join(["/a", "/b"]))
    monkeypatch.setenv("HOTLORA_MAX_RUNNING", "3")
    monkeypatch.setenv("HOTLORA_MAX_QUEUE", "7")
    monkeypatch.setenv("HOTLORA_MERGE_HOT_ADAPTERS", "false")
    s = Settings()
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "secret"
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert s.allowed_adapter_dirs == [Path("/a"), Path("/b")]
    assert (s.max_running, s.max_queue, s.merge_hot_adapters) == (3, 7, False)
    shown = str(s.redacted())
    assert "secret" not in shown and "k1" not in shown
    assert Settings(max_running=5).max_running == 5  # keywords (the command line) win


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("HOTLORA_MAX_RUNNING", "0"),
        ("HOTLORA_PORT", "70000"),
        ("HOTLORA_MAX_QUEUE", "many"),
        ("HOTLORA_MERGE_MIN_SHARE", "1.5"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match=var.removeprefix("HOTLORA_").lower()):
        Settings()


def test_serve_refuses_bad_flags_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-running", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "hotlora: error: --max-running='0': Input should be greater than or equal to 1; set a "
        "valid --max-running or leave it out (hotlora serve --help lists every setting)\n"
    )


def test_serve_help_lists_every_setting_with_its_variable_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for name, field in Settings.model_fields.items():
        assert f"HOTLORA_{name.upper()}" in text, name
        if name not in ("admin_key", "api_keys"):  # environment only: no flag
            assert "--" + name.replace("_", "-") in text, name
        assert field.description, f"{name} has no description for --help"
    assert "[env: HOTLORA_PORT, default: 8000]" in text
    assert "[env: HOTLORA_MERGE_HOT_ADAPTERS, default: true]" in text
    assert "[env: HOTLORA_MAX_SEQ_LEN, default: unset]" in text
    assert "GPT-2 directory" not in text  # the model may be GPT-2, Llama, Mistral, Qwen2, Qwen3
    assert "Llama, Mistral, Qwen2 or Qwen3" in text
    assert "exit codes:" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"hotlora {version('hotlora')}\n"


def test_a_flag_is_validated_as_its_variable_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags pass their text to Settings, as HOTLORA_* does: the same parsing, both ways."""
    from hotlora.server.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8001", "--no-merge-hot-adapters"])
    assert (args.port, args.merge_hot_adapters, args.max_rank) == ("8001", False, None)
    monkeypatch.setenv("HOTLORA_PORT", "8001")
    assert Settings(port=args.port) == Settings()


def test_chat_template_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import hotlora.server.lifecycle
    import hotlora.server.main

    class NoServer:
        started = True

        def __init__(self, *args: object) -> None:
            pass

        def run(self, sockets: object = None) -> None:
            pass

    seen: list[Settings] = []
    monkeypatch.setattr(hotlora.server.main, "create_app", lambda settings: seen.append(settings))
    monkeypatch.setattr(hotlora.server.lifecycle, "GracefulServer", NoServer)
    monkeypatch.setattr(hotlora.server.lifecycle, "lifecycle_of", lambda app: None)
    # `serve` sets the root logger's level: keep it where it is
    level = logging.getLevelName(logging.getLogger().level)
    monkeypatch.setenv("HOTLORA_LOG_LEVEL", level if level != "NOTSET" else "warning")
    # the checks before serving read these: a free port, a store of the test's own
    monkeypatch.setenv("HOTLORA_PORT", "0")
    monkeypatch.setenv("HOTLORA_ADAPTER_STORE", str(tmp_path / "store"))
    for name in ("flag.jinja", "env.jinja"):
        (tmp_path / name).write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert main(["serve", "--chat-template", str(tmp_path / "flag.jinja")]) == 0
    assert seen[-1].chat_template == tmp_path / "flag.jinja"
    monkeypatch.setenv("HOTLORA_CHAT_TEMPLATE", str(tmp_path / "env.jinja"))
    assert main(["serve"]) == 0
    assert seen[-1].chat_template == tmp_path / "env.jinja"
    assert Settings().chat_template == tmp_path / "env.jinja"
