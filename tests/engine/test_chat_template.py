"""ChatTemplate against transformers' apply_chat_template(..., tokenize=False), and its sandbox.

Tokenizer directories are built in-test (tests/tokenizer_builders.py); each test copies one and
puts its chat template where a model would ship it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hotlora.adapters.demo_tasks import DEMO_CHAT_TEMPLATE, DEMO_MODEL, LLAMA_DEMO_MODEL, prompt_for
from hotlora.server.engine import chat_template as ct
from hotlora.server.engine.chat_template import ChatTemplate
from hotlora.server.engine.errors import ModelLoadError, RequestError
from tests.tokenizer_builders import write_bytelevel_tokenizer, write_metaspace_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# Meta's Llama 3 Instruct template (the template writes bos_token itself).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML in Qwen2.5's layout, plus a {% generation %} block, a namespace, tojson, loop controls
# and the reasoning field transformers aliases.
CHATML = """\
{%- if tools %}
    {{- '<|im_start|>system\\n# Tools\\n' }}
    {%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- if message.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- if message.reasoning_content is defined %}
            {{- '<think>' + message.reasoning_content + '</think>' }}
        {%- endif %}
        {%- if message.tool_calls is defined %}{{- message.tool_calls | tojson }}{% endif %}
        {%- generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}
    {%- else %}
        {{- message.content + '<|im_end|>' }}
    {%- endif %}
    {{- '\\n' }}
    {%- if message.content == 'STOP' %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
{{- '<!-- users: ' ~ ns.users ~ ' ' ~ {'k': 'é<&>'} | tojson ~ ' ' ~ eos_token ~ ' -->' }}
"""
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML}

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "Be brief.  "},
        {"role": "user", "content": "  Café 中文 🦙\nline two "},
        {"role": "assistant", "content": "ok", "tool_calls": None, "reasoning": "think <b>"},
        {"role": "user", "content": "and again"},
    ],
    [
        {"role": "user", "content": "STOP"},
        {"role": "assistant", "content": "never rendered by the ChatML template"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    write_bytelevel_tokenizer(root / "llama3", flavour="llama3")
    write_bytelevel_tokenizer(root / "qwen2", flavour="qwen2")
    write_metaspace_tokenizer(root / "llama2")
    return {name: root / name for name in ("llama3", "qwen2", "llama2")}


@pytest.fixture
def make_dir(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """A copy of a built tokenizer directory; `config` fields are merged into its
    tokenizer_config.json and `files` (relative path -> text) written into it."""

    def make(flavour: str = "llama3", files: dict[str, str] | None = None, **config: Any) -> Path:
        path = tmp_path / f"model-{flavour}-{len(list(tmp_path.glob('model-*')))}"
        shutil.copytree(tokenizer_dirs[flavour], path)
        cfg_path = path / "tokenizer_config.json"
        cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | config))
        for name, text in (files or {}).items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text, encoding="utf-8")
        return path

    return make


def reference(path: Path, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    out = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(out, str)
    return out


def loaded(path: Path, override: Path | None = None) -> ChatTemplate:
    template = ChatTemplate.load(path, override)
    assert template is not None
    return template


STORAGE = {
    # where a model ships its template -> (tokenizer_config fields, files)
    "tokenizer_config string": lambda t: ({"chat_template": t}, {}),
    "tokenizer_config named list": lambda t: (
        {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                           {"name": "default", "template": t}]}, {}),
    "chat_template.jinja": lambda t: ({}, {"chat_template.jinja": t}),
    "jinja beats tokenizer_config": lambda t: (
        {"chat_template": "IGNORED"}, {"chat_template.jinja": t}),
    "jinja with additional_chat_templates": lambda t: (
        {}, {"chat_template.jinja": t, "additional_chat_templates/tool_use.jinja": "TOOLS"}),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize(("name", "flavour"), [("llama3", "llama3"), ("chatml", "qwen2")])
def test_renders_like_transformers(
    make_dir: Callable[..., Path], name: str, flavour: str, chat: int, add_generation_prompt: bool
) -> None:
    path = make_dir(flavour, chat_template=TEMPLATES[name])
    messages = CHATS[chat]
    got = loaded(path).render(messages, add_generation_prompt=add_generation_prompt)
    assert got == reference(path, messages, add_generation_prompt)
    if name == "llama3":
        assert got.startswith("<|begin_of_text|><|start_header_id|>")
        assert got.endswith("<|end_header_id|>\n\n") == add_generation_prompt
    else:
        assert ("<|im_start|>assistant\n<!--" in got) == add_generation_prompt
        assert got.endswith(' {"k": "é<&>"} <|im_end|> -->')
    if chat == 1:
        assert "Café 中文 🦙\nline two" in got
        assert ("<think>think <b></think>ok" in got) == (name == "chatml")
    assert messages == CHATS[chat]  # the caller's messages are not changed


@pytest.mark.parametrize("storage", list(STORAGE))
def test_every_place_a_model_ships_its_template(
    make_dir: Callable[..., Path], storage: str
) -> None:
    config, files = STORAGE[storage](CHATML)
    path = make_dir("qwen2", files=files, **config)
    template = loaded(path)
    assert template.render(CHATS[1]) == reference(path, CHATS[1], True)
    assert template.render(CHATS[1]).startswith("<|im_start|>system\nBe brief.  <|im_end|>")
    shipped_as = "chat_template.jinja" if files else "tokenizer_config.json"
    assert shipped_as in template.source


def test_the_override_file_wins(make_dir: Callable[..., Path], tmp_path: Path) -> None:
    path = make_dir(chat_template="CONFIG", files={"chat_template.jinja": "FILE"})
    override = tmp_path / "mine.jinja"
    override.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    template = loaded(path, override)
    assert template.source == str(override)
    assert template.render(CHATS[0]) == "[user] hello"
    tok = transformers.AutoTokenizer.from_pretrained(path)  # transformers: the chat_template arg
    assert tok.apply_chat_template(
        CHATS[0], chat_template=override.read_text(), tokenize=False, add_generation_prompt=True
    ) == "[user] hello"
    assert loaded(path).render(CHATS[0]) == "FILE"


def test_a_model_without_a_template_has_none(make_dir: Callable[..., Path]) -> None:
    assert ChatTemplate.load(make_dir()) is None


@pytest.mark.parametrize(
    ("config", "files"),
    [
        ({"chat_template": [{"name": "tool_use", "template": "A"},
                            {"name": "rag", "template": "B"}]}, {}),
        ({}, {"additional_chat_templates/tool_use.jinja": "A"}),
    ],
    ids=["named list", "additional_chat_templates only"],
)
def test_named_templates_without_a_default_are_explained(
    make_dir: Callable[..., Path], config: dict[str, Any], files: dict[str, str]
) -> None:
    path = make_dir(files=files, **config)
    with pytest.raises(ModelLoadError, match="default.*--chat-template"):
        ChatTemplate.load(path)
    with pytest.raises(ValueError, match="no default"):  # transformers refuses it too
        reference(path, CHATS[0], True)


@pytest.mark.parametrize("flavour", ["llama3", "qwen2", "llama2", "gpt2 demo", "custom"])
def test_special_tokens_are_the_ones_transformers_passes(
    make_dir: Callable[..., Path], tmp_path: Path, flavour: str
) -> None:
    names = [*ct.SPECIAL_TOKENS, "image_token", "tool_token"]
    template = "".join(f"{n}={{{{ {n} if {n} is defined else '-' }}}};" for n in names)
    if flavour == "gpt2 demo":  # no tokenizer_config.json: GPT2Tokenizer's defaults
        path = tmp_path / "demo"
        shutil.copytree(DEMO_MODEL, path)
        (path / "chat_template.jinja").write_text(template)
    elif flavour == "custom":
        path = make_dir(
            chat_template=template, unk_token={"__type": "AddedToken", "content": "<|eot_id|>"},
            image_token="<img>", extra_special_tokens={"tool_token": "<tool>"},
        )
    else:
        path = make_dir(flavour, chat_template=template)
    got = loaded(path).render(CHATS[0])
    assert got == reference(path, CHATS[0], True)
    assert "eos_token=-" not in got
    if flavour == "custom":
        assert "image_token=<img>;tool_token=<tool>" in got and "unk_token=<|eot_id|>" in got


def test_demo_template_gives_the_demo_prompt() -> None:
    template = ChatTemplate(DEMO_CHAT_TEMPLATE, "demo")
    assert template.render([{"role": "user", "content": "hotlora"}]) == prompt_for("hotlora")
    chat = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": " tsrif"},
        {"role": "user", "content": "adapter"},
    ]
    assert template.render(chat) == "in: adapter\nout:"
    assert template.render(chat, add_generation_prompt=False) == "in: adapter\nout:"
    with pytest.raises(RequestError, match="needs a user message"):
        template.render([{"role": "system", "content": "no user"}])
    with pytest.raises(RequestError, match="string message content"):
        template.render([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


@pytest.mark.parametrize("model", [DEMO_MODEL, LLAMA_DEMO_MODEL], ids=["gpt2", "llama"])
def test_demo_models_ship_the_demo_template(model: Path) -> None:
    assert (model / "chat_template.jinja").read_text(encoding="utf-8") == DEMO_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hotlora"}]
    template = loaded(model)
    assert template.source == str(model / "chat_template.jinja")
    assert template.render(messages) == prompt_for("hotlora") == reference(model, messages, True)


def test_builtins_match_transformers(make_dir: Callable[..., Path]) -> None:
    text = (
        "{{ strftime_now('%Y') }}|{{ messages | tojson(indent=1) }}|{{ dict(a=1) | tojson }}|"
        "{{ dict.fromkeys(['x'], 0) }}|{% for i in range(3) %}{{ i }}{% endfor %}|{{ tools }}|"
        "{{ documents }}|{{ 'x' * 3 }}|{{ 2 ** 10 }}|{{ lipsum(1, html=False)[:0] }}"
    )
    path = make_dir(chat_template=text)
    got = loaded(path).render(CHATS[0])
    assert got == reference(path, CHATS[0], True)
    assert got.startswith(f"{datetime.now():%Y}|[\n {{\n  \"role\": \"user\"")
    assert got.endswith('|{"a": 1}|{\'x\': 0}|012|None|None|xxx|1024|')


def test_raise_exception_is_a_request_error() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'system' %}{{ raise_exception('need a system turn') }}"
        "{% endif %}ok", "t.jinja",
    )
    assert template.render([{"role": "system", "content": ""}]) == "ok"
    with pytest.raises(RequestError, match="refused the messages: need a system turn$"):
        template.render(CHATS[0])


HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch SENTINEL') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch SENTINEL').read() }}",
    "{{ lipsum.__globals__['os'].system('touch SENTINEL') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('SENTINEL', 'w').write('x') }}",
    "{{ strftime_now.__globals__.datetime }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch SENTINEL') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update(role='x') }}",
    "{% set ns = namespace(_private=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "{{ cycler.__init__ }}",  # an unsafe access that would only render as ""
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_templates_are_refused(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    template = ChatTemplate(text.replace("SENTINEL", str(sentinel)), "hostile.jinja")
    with pytest.raises(RequestError, match="unsafe|sandbox|namespace cannot hold"):
        template.render(messages)
    assert not sentinel.exists() and not (tmp_path / "SENTINEL").exists()
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{{ 'x' * 10**9 }}", "would build over"),
        ("{{ [0] * 10**9 }}", "would build over"),
        ("{{ 7 ** (10 ** 9) }}", "too large"),
        ("{% for i in range(10**9) %}{% endfor %}", "MAX_RANGE"),
        ("{{ lipsum(10**9) }}", "lipsum"),
        ("{{ undefined_thing.attr }}", "UndefinedError: 'undefined_thing' is undefined"),
        ("{{ 1 + 'a' }}", "TypeError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ],
)
def test_runaway_and_broken_templates_are_request_errors(text: str, match: str) -> None:
    with pytest.raises(RequestError, match=match) as info:
        ChatTemplate(text, "bad.jinja").render(CHATS[0])
    assert "bad.jinja" in str(info.value)


def test_render_time_and_output_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = ChatTemplate(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = range(1) %}"
        "{% endfor %}{% endfor %}", "slow.jinja",
    )
    monkeypatch.setattr(ct, "RENDER_TIMEOUT_S", 0.2)
    with pytest.raises(RequestError, match="too long"):
        slow.render(CHATS[0])
    monkeypatch.setattr(ct, "MAX_OUTPUT_CHARS", 1000)
    with pytest.raises(RequestError, match="output over 1000 characters"):
        ChatTemplate("{% for i in range(2000) %}x{% endfor %}", "big.jinja").render(CHATS[0])
    assert ChatTemplate("{{ 'x' * 1000 }}", "ok.jinja").render(CHATS[0]) == "x" * 1000


def test_messages_are_checked() -> None:
    template = ChatTemplate("{{ messages | length }}", "t.jinja")
    with pytest.raises(RequestError, match="empty"):
        template.render([])
    with pytest.raises(RequestError, match="must be an object"):
        template.render(["hello"])  # type: ignore[list-item]


@pytest.mark.parametrize("text", ["{% if %}x{% endif %}", "{{ unclosed", "{% generation %}x",
                                  "{% for m in messages %}", "{{ x | no_such_filter }}",
                                  pytest.param("{% if 1 %}" * 3000 + "{% endif %}" * 3000,
                                               id="nested-3000-deep")])
def test_a_template_that_does_not_compile_is_a_model_load_error(
    make_dir: Callable[..., Path], tmp_path: Path, text: str
) -> None:
    path = make_dir(files={"chat_template.jinja": text})
    with pytest.raises(ModelLoadError, match=r"chat_template\.jinja: the chat template does not"):
        ChatTemplate.load(path)
    override = tmp_path / "override.jinja"
    override.write_text(text)
    with pytest.raises(ModelLoadError, match="override.jinja"):
        ChatTemplate.load(make_dir(), override)


@pytest.mark.parametrize(
    ("value", "match"),
    [(42, "must be a string or a list"), ([{"name": "default"}], "must be a string or a list")],
)
def test_a_malformed_tokenizer_config_template_is_a_model_load_error(
    make_dir: Callable[..., Path], value: Any, match: str
) -> None:
    with pytest.raises(ModelLoadError, match=match):
        ChatTemplate.load(make_dir(chat_template=value))
