"""Chat templates: found and rendered exactly as transformers 5 renders them, in a sandbox.

Sources, in transformers' order (`PreTrainedTokenizerBase._from_pretrained`, `get_chat_template`):
an override file (`hotlora serve --chat-template FILE`), else `chat_template.jinja` (with named
templates in `additional_chat_templates/*.jinja`), else `chat_template` in tokenizer_config.json
(a string, or a list of `{"name", "template"}`); of several named templates "default" is used.
`render` follows `render_jinja_template` and `apply_chat_template(..., tokenize=False)`: the
messages (None-valued keys dropped, plain JSON data, reasoning fields aliased), `tools` and
`documents` None, `add_generation_prompt` and the tokenizer's named special tokens, rendered in
the environment of `server.engine.chat_sandbox`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError

from hotlora.server.engine.chat_sandbox import TemplateRaised, deadline, environment
from hotlora.server.engine.errors import ModelLoadError, RequestError
from hotlora.server.engine.tokenizer import json_object

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # transformers' SPECIAL_TOKENS_ATTRIBUTES
MAX_OUTPUT_CHARS = 1 << 24
RENDER_TIMEOUT_S = 5.0
_FIX = "fix the file or pass a working one with --chat-template FILE"


class ChatTemplateError(ModelLoadError):
    """A chat template file cannot be read or does not compile (the message names the file);
    a ModelLoadError, since a model's own template is part of the model."""


def _plain(value: Any) -> Any:
    """transformers' `_plain_template_data`: JSON types only; other objects become "<Type>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`_normalize_chat_messages`, `_plain_template_data` and `_alias_reasoning_fields`."""
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise RequestError(f"a chat message must be an object, got {type(m).__name__}")
        msg = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def _token(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken, {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


# Special-token defaults of the tokenizer classes AutoTokenizer picks for the served families
# (GPT2Tokenizer, Qwen2Tokenizer, LlamaTokenizer __init__), used for keys a config leaves out.
_CLASS_DEFAULTS = {
    "GPT2Tokenizer": dict.fromkeys(("unk_token", "bos_token", "eos_token"), "<|endoftext|>"),
    "Qwen2Tokenizer": dict.fromkeys(("unk_token", "eos_token", "pad_token"), "<|endoftext|>"),
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}
_MODEL_TYPE_CLASS = {"gpt2": "GPT2Tokenizer", "qwen2": "Qwen2Tokenizer",
                     "qwen3": "Qwen2Tokenizer", "llama": "LlamaTokenizer"}


def _class_defaults(model_dir: Path, cfg: dict[str, Any]) -> dict[str, str]:
    """The defaults of the class AutoTokenizer loads (none for its generic TokenizersBackend,
    which it uses for Mistral and for Llama-3 style byte-level LlamaTokenizer files)."""
    config = json_object(model_dir / "config.json")
    name = cfg.get("tokenizer_class") or config.get("tokenizer_class")
    model_type = config.get("model_type")
    name = str(name).removesuffix("Fast") if name else _MODEL_TYPE_CLASS.get(str(model_type))
    if name == "LlamaTokenizer" and (model_type in ("mistral", "mixtral") or (
            (tok := model_dir / "tokenizer.json").is_file()
            and '"ByteLevel"' in tok.read_text(encoding="utf-8", errors="replace"))):
        return {}
    return _CLASS_DEFAULTS.get(str(name), {})


def special_tokens(model_dir: Path) -> dict[str, str]:
    """The tokens transformers passes a template (`special_tokens_map`): the named ones of
    tokenizer_config.json (with special_tokens_map.json when it has no added_tokens_decoder,
    else the tokenizer class's defaults), other `*_token` strings and a dict of
    `extra_special_tokens`."""
    cfg = json_object(model_dir / "tokenizer_config.json")
    if "added_tokens_decoder" not in cfg:
        cfg |= json_object(model_dir / "special_tokens_map.json")
    cfg = _class_defaults(model_dir, cfg) | cfg
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens")
    named = {k: v for k, v in cfg.items() if k.endswith("_token") and k not in SPECIAL_TOKENS}
    named |= extra if isinstance(extra, dict) else {}
    out = {k: t for k in SPECIAL_TOKENS if (t := _token(cfg.get(k))) is not None}
    for k, v in named.items():
        if isinstance(v, str) or (isinstance(v, dict) and v.get("__type") == "AddedToken"):
            out[k] = str(_token(v))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or str(e)  # strerror: without the path, named already
        raise ChatTemplateError(f"{path}: cannot read the chat template ({reason}); {_FIX}") from e
    except UnicodeDecodeError as e:
        raise ChatTemplateError(
            f"{path}: cannot read the chat template (not UTF-8: {e}); {_FIX}"
        ) from e


def _find(model_dir: Path) -> tuple[str, str] | None:
    """(template, source) as transformers picks it from a model directory, or None."""
    files = {"default": model_dir / "chat_template.jinja"}
    files = {k: p for k, p in files.items() if p.is_file()}
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        files |= {p.name.removesuffix(".jinja"): p for p in sorted(extra_dir.glob("*.jinja"))}
    if files:
        if "default" not in files:
            raise ModelLoadError(f"{extra_dir}: named chat templates {sorted(files)} but no "
                                 "default one (chat_template.jinja); pass the one to use with "
                                 "--chat-template FILE")
        return _read(files["default"]), str(files["default"])
    config_path = model_dir / "tokenizer_config.json"
    value = json_object(config_path).get("chat_template")
    if value is None:
        return None
    if isinstance(value, str):
        return value, f"{config_path} (chat_template)"
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys()
                                       and isinstance(t["template"], str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise ModelLoadError(
                f"{config_path}: chat_template lists templates {sorted(map(str, named))} but "
                'none named "default"; pass the one to use with --chat-template FILE')
        return named["default"], f'{config_path} (chat_template "default")'
    raise ModelLoadError(f"{config_path}: chat_template must be a string or a list of "
                         '{"name", "template"} objects')


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, template: str, source: str, tokens: Mapping[str, str] | None = None):
        self.source = source
        self.tokens = dict(tokens or {})
        try:
            self._template = environment().from_string(template)
        except Exception as e:  # a syntax error, or e.g. RecursionError from absurd nesting
            line = f" (line {e.lineno})" if isinstance(e, jinja2.TemplateSyntaxError) else ""
            raise ChatTemplateError(
                f"{source}: the chat template does not compile: {e}{line}; {_FIX}"
            ) from e

    @classmethod
    def from_file(cls, path: Path, tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """A template file, read and compiled (ChatTemplateError when it cannot be)."""
        return cls(_read(path), str(path), tokens)

    @classmethod
    def load(cls, model_dir: Path, override: Path | None = None) -> ChatTemplate | None:
        """The model's chat template (`override` first), or None when it has none."""
        found = (_read(override), str(override)) if override is not None else _find(model_dir)
        if found is None:
            log.info("%s has no chat template", model_dir)
            return None
        template = cls(found[0], found[1], special_tokens(model_dir))
        log.info("chat template from %s", template.source)
        return template

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> str:
        """The prompt text `apply_chat_template(messages, tokenize=False, ...)` gives; any failure
        of the template (raise_exception, sandbox refusals, type errors) is a RequestError."""
        if not messages:
            raise RequestError("cannot apply the chat template to an empty list of messages")
        chat = _prepare(messages)
        variables = {**_plain(self.tokens), "messages": chat, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        parts: list[str] = []
        size = 0
        try:
            with deadline(RENDER_TIMEOUT_S):
                for part in self._template.generate(**variables):
                    size += len(part)
                    if size > MAX_OUTPUT_CHARS:
                        raise RequestError(f"chat template {self.source}: output over "
                                           f"{MAX_OUTPUT_CHARS} characters")
                    parts.append(part)
        except RequestError:
            raise
        except TemplateRaised as e:
            raise RequestError(f"the chat template refused the messages: {e.message}") from e
        except SecurityError as e:
            raise RequestError(f"chat template {self.source}: refused by the sandbox: {e}") from e
        except Exception as e:  # anything a template can make jinja or Python raise
            raise RequestError(
                f"chat template {self.source} failed: {type(e).__name__}: {e}") from e
        return "".join(parts)
