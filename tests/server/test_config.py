"""Settings come from HOTLORA_<NAME> variables or keywords, validated once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import main
from server.config import Settings


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
    assert "max_running" in capsys.readouterr().err


def test_chat_template_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import server.lifecycle
    import server.main

    class NoServer:
        started = True

        def __init__(self, *args: object) -> None:
            pass

        def run(self) -> None:
            pass

    seen: list[Settings] = []
    monkeypatch.setattr(server.main, "create_app", lambda settings: seen.append(settings))
    monkeypatch.setattr(server.lifecycle, "GracefulServer", NoServer)
    monkeypatch.setattr(server.lifecycle, "lifecycle_of", lambda app: None)
    # `serve` sets the root logger's level: keep it where it is
    monkeypatch.setenv("HOTLORA_LOG_LEVEL", logging.getLevelName(logging.getLogger().level))
    assert main(["serve", "--chat-template", str(tmp_path / "flag.jinja")]) == 0
    assert seen[-1].chat_template == tmp_path / "flag.jinja"
    monkeypatch.setenv("HOTLORA_CHAT_TEMPLATE", str(tmp_path / "env.jinja"))
    assert main(["serve"]) == 0
    assert seen[-1].chat_template == tmp_path / "env.jinja"
    assert Settings().chat_template == tmp_path / "env.jinja"
