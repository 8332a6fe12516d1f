"""Base-model tokenizers and incremental, stop-string-aware detokenization.

`load_tokenizer` reads a Hugging Face model directory (tokenizer.json; optional
tokenizer_config.json, config.json, generation_config.json) and encodes exactly as
`transformers.AutoTokenizer` 5.x does for the supported families: byte-level BPE (GPT-2, Llama 3,
Qwen2/3) and Metaspace BPE with byte fallback (Llama 2, TinyLlama, Mistral). What transformers 5.x
does that tokenizer.json alone would not:

- `tokenizer_class: LlamaTokenizer` makes it rebuild the pipeline around the file's vocab and
  merges (a Metaspace pre-tokenizer instead of a Prepend+Replace normalizer: " hi" gets one "▁",
  not two), unless the file is byte-level or the model type maps to its generic backend (Mistral).
- `add_bos_token` / `add_eos_token` in tokenizer_config.json are dropped whenever tokenizer.json
  exists: only tokenizer.json's post-processor adds BOS/EOS.
- `added_tokens_decoder` and the named special tokens of tokenizer_config.json are added when
  tokenizer.json lacks them, and padding/truncation saved in tokenizer.json are not applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from hotlora.server.engine.errors import ModelLoadError, RequestError

_FFFD = "\ufffd"  # what decoders emit for an incomplete (or invalid) UTF-8 sequence
# The pieces tokenizers' ByteFallback decoder turns into raw bytes (its own test: "<0x" + two hex
# digits + ">").
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Model types transformers gives its generic TokenizersBackend (tokenizer.json as is) even when
# tokenizer_config.json names LlamaTokenizer (without mistral_common installed).
_AS_IS_MODEL_TYPES = frozenset({"mistral", "mixtral"})
# transformers adds these tokenizer_config.json tokens (in this order) if tokenizer.json lacks them
_NAMED_SPECIALS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TextTokenizer:
    """A `tokenizers.Tokenizer` (`.raw`) plus the model directory's BOS and EOS ids.

    `byte_ids`: the ids a ByteFallback decoder turns into raw bytes (empty without one; found
    from the tokenizer's own JSON when not given).
    """

    def __init__(
        self,
        raw: Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        byte_ids: frozenset[int] | None = None,
    ) -> None:
        self.raw = raw
        if byte_ids is None:
            byte_ids = byte_fallback_ids(raw, raw.to_str())
        self.byte_ids = byte_ids
        self.vocab_size: int = raw.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        # decode(skip_special_tokens=True) drops exactly these
        added = raw.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._token_texts: dict[int, str] = {}  # bounded by the vocabulary

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the BOS/EOS the post-processor adds (AutoTokenizer's ids)."""
        try:
            return list(self.raw.encode(text, add_special_tokens=add_special_tokens).ids)
        except TypeError as e:  # tokenizers refuses str that is not valid Unicode (surrogates)
            raise RequestError(f"prompt is not valid Unicode text ({e})") from e

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens written out (memoized: log-probabilities
        name up to 21 tokens per position)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def token_to_id(self, token: str) -> int | None:
        i = self.raw.token_to_id(token)
        return None if i is None else int(i)


def load_tokenizer(model_dir: Path) -> TextTokenizer:
    """Load `model_dir`'s tokenizer; raises ModelLoadError naming the file and field at fault."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: tokenizer.json not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from e
    tok_cfg = json_object(model_dir / "tokenizer_config.json")
    config = json_object(model_dir / "config.json")
    cls = tok_cfg.get("tokenizer_class") or config.get("tokenizer_class")
    if cls is not None and not isinstance(cls, str):
        raise ModelLoadError(f"{model_dir}: tokenizer_class must be a string, got {cls!r}")
    if (
        cls is not None
        and cls.removesuffix("Fast") == "LlamaTokenizer"
        and config.get("model_type") not in _AS_IS_MODEL_TYPES
        and '"ByteLevel"' not in text  # transformers' own test for "Llama 3 style"
    ):
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from e
        if not isinstance(spec, dict):
            raise ModelLoadError(f"{path}: not a valid tokenizer.json (not a JSON object)")
        _as_llama_tokenizer(spec, tok_cfg)
        text = json.dumps(spec)  # only then: re-serialising a large vocabulary costs a second
    try:
        raw = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from e
    # AutoTokenizer neither truncates nor pads unless asked; a prompt must keep all its tokens.
    raw.no_truncation()
    raw.no_padding()
    raw.encode_special_tokens = bool(tok_cfg.get("split_special_tokens", False))
    _add_config_tokens(raw, tok_cfg, model_dir / "tokenizer_config.json")
    bos = _token_str(tok_cfg.get("bos_token"), "bos_token", model_dir / "tokenizer_config.json")
    bos_id = None if bos is None else raw.token_to_id(bos)
    eos_ids = _eos_token_ids(model_dir, config, tok_cfg, raw)
    return TextTokenizer(raw, bos_id, eos_ids, byte_fallback_ids(raw, text))


def byte_fallback_ids(raw: Tokenizer, spec: str) -> frozenset[int]:
    """The ids of `raw`'s byte pieces ("<0x41>") when its decoder (in `spec`, the tokenizer's
    JSON) has a ByteFallback step, else none: elsewhere such a piece is ordinary text."""
    if '"ByteFallback"' not in spec:
        return frozenset()
    return frozenset(i for t, i in raw.get_vocab().items() if _BYTE_PIECE.fullmatch(t))


def json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return data


def _as_llama_tokenizer(spec: dict[str, Any], tok_cfg: dict[str, Any]) -> None:
    """Rewrite `spec` into the pipeline transformers' LlamaTokenizer builds around its vocab."""
    prefix = tok_cfg.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if tok_cfg.get("legacy") else "first") if prefix else "never"
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": scheme,
        "split": False,
    }
    steps: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec["decoder"] = {"type": "Sequence", "decoders": steps}
    model = spec.get("model")
    if isinstance(model, dict) and model.get("type") == "BPE":
        model.update(dropout=None, unk_token=None, continuing_subword_prefix=None)
        model.update(end_of_word_suffix=None, fuse_unk=True, byte_fallback=True)
        model.update(ignore_merges=False)


def _token_str(value: Any, field: str, path: Path) -> str | None:
    """A tokenizer_config token: a string, an AddedToken object ({"content": ...}) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ModelLoadError(f"{path}: {field} must be a string or an object with a string content")
    return value


def _add_config_tokens(raw: Tokenizer, tok_cfg: dict[str, Any], path: Path) -> None:
    """Add the added_tokens_decoder entries and named special tokens tokenizer.json lacks, in
    transformers' order (entries by id, then the named tokens), and check the declared ids."""
    declared = tok_cfg.get("added_tokens_decoder")
    declared = {} if declared is None else declared
    if not isinstance(declared, dict):
        raise ModelLoadError(f"{path}: added_tokens_decoder must be an object")
    wanted: list[tuple[int | None, AddedToken]] = []
    for key, entry in declared.items():
        fields = entry if isinstance(entry, dict) else {"content": entry}
        if not key.isdigit() or not isinstance(fields.get("content"), str):
            raise ModelLoadError(f"{path}: added_tokens_decoder entry {key!r} is not id -> token")
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        kwargs = {f: bool(fields[f]) for f in flags if f in fields}
        wanted.append((int(key), AddedToken(fields["content"], **kwargs)))
    wanted.sort(key=lambda w: w[0] or 0)
    names = [_token_str(tok_cfg.get(name), name, path) for name in _NAMED_SPECIALS]
    extra = tok_cfg.get("extra_special_tokens") or tok_cfg.get("additional_special_tokens")
    if isinstance(extra, list):  # (a dict names model-specific tokens; not used by these families)
        names += [_token_str(t, "extra_special_tokens", path) for t in extra]
    for content in names:
        if content is not None:
            wanted.append((None, AddedToken(content, special=True, normalized=False)))
    have = {t.content for t in raw.get_added_tokens_decoder().values()}
    for i, token in wanted:
        if token.content not in have:
            raw.add_tokens([token])
            have.add(token.content)
        if i is not None and raw.token_to_id(token.content) != i:
            got = raw.token_to_id(token.content)
            raise ModelLoadError(
                f"{path}: added_tokens_decoder gives {token.content!r} id {i}, "
                f"but tokenizer.json gives it {got}"
            )


def _eos_token_ids(
    model_dir: Path, config: dict[str, Any], tok_cfg: dict[str, Any], raw: Tokenizer
) -> frozenset[int]:
    """Every id that ends generation: generation_config.json's eos_token_id (an int or a list),
    else config.json's, else tokenizer_config.json's eos_token; ids outside the vocab dropped."""
    vocab_size = raw.get_vocab_size(with_added_tokens=True)
    sources = [
        ("generation_config.json", json_object(model_dir / "generation_config.json")),
        ("config.json", config),
    ]
    for name, data in sources:
        value = data.get("eos_token_id")
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ModelLoadError(
                f"{model_dir / name}: eos_token_id must be an int or a list of ints, got {value!r}"
            )
        return frozenset(v for v in values if 0 <= v < vocab_size)
    eos = _token_str(tok_cfg.get("eos_token"), "eos_token", model_dir / "tokenizer_config.json")
    i = None if eos is None else raw.token_to_id(eos)
    return frozenset() if i is None else frozenset({int(i)})


class Detokenizer:
    """Turns a growing list of token ids into text, applying stop strings.

    `update` returns the newly final text: text that can no longer change, i.e. not ending in an
    incomplete UTF-8 sequence and not a possible beginning of a stop string. The deltas joined
    equal `tokenizer.decode(ids)` (cut before the first stop string) once `final` is passed.

    Like vLLM it decodes only a window, so a long output costs O(n): the last committed chunk
    of tokens plus the new ones, keeping the text after the chunk's own. The chunk is context:
    Metaspace decoders strip a leading space from the first token decoded, and the chunk takes
    that strip. Chunks end where the text did not end in U+FFFD, i.e. at character boundaries,
    where decoding is additive. Special tokens (which decode skips) are dropped first, so a chunk
    always has text. A ByteFallback decoder decodes a whole run of byte pieces at once, and one
    more byte that makes the run invalid UTF-8 turns *every* byte of it into U+FFFD, characters
    that were complete included: so a chunk never ends inside such a run (on a byte piece), and
    the run's text is emitted once a non-byte token (or `final`) closes it, or as soon as it
    holds a stop string.
    """

    def __init__(self, tokenizer: TextTokenizer | Tokenizer, stop: tuple[str, ...]) -> None:
        if not isinstance(tokenizer, TextTokenizer):
            tokenizer = TextTokenizer(tokenizer)
        self.tokenizer, self.stop = tokenizer, stop
        self.stopped = False
        self._seen = 0  # token ids consumed
        self._ids: list[int] = []  # the text-bearing ones
        self._prefix = self._read = 0  # _ids[_prefix:_read]: the last committed chunk
        self._parts: list[str] = []  # everything returned so far
        self._held = ""  # committed text held back: it may begin a stop string

    @property
    def text(self) -> str:
        """All committed text so far, cut at a stop string once one is seen."""
        return "".join(self._parts) + self._held

    def update(self, token_ids: Sequence[int], final: bool = False, check_stop: bool = True) -> str:
        """`token_ids`: the whole output so far (it only grows). Returns the new final text.

        With `check_stop` False (a request below its min_tokens) stop strings in the new text
        are kept as text; only text committed while it is True can stop the request.
        """
        if self.stopped:
            return ""
        tok = self.tokenizer
        fresh = token_ids[self._seen :]
        self._seen = len(token_ids)
        self._ids += [t for t in fresh if 0 <= t < tok.vocab_size and t not in tok.special_ids]
        text = self._held
        if self._read < len(self._ids):
            head = tok.decode(self._ids[self._prefix : self._read])
            tail = tok.decode(self._ids[self._prefix :])[len(head) :]
            complete = not tail.endswith(_FFFD)
            # An open byte run may still turn invalid, so its text waits for the run to close,
            # unless it holds a stop string (a newline is a byte piece in SentencePiece
            # vocabularies): then generation ends here and the run cannot change.
            closed = self._ids[-1] not in tok.byte_ids
            stops = check_stop and any(s in text + tail for s in self.stop)
            if final or (complete and (closed or stops)):
                text += tail
                self._prefix, self._read = self._read, len(self._ids)
        # A stop string cannot begin before `text`: every possible beginning was held back.
        hits = [at for at in (text.find(s) for s in self.stop) if at != -1] if check_stop else []
        hold = 0
        if hits:
            text, self.stopped = text[: min(hits)], True
        elif not final:
            hold = max((_stop_prefix(text, s) for s in self.stop), default=0)
        end = len(text) - hold
        self._held = text[end:]
        if end:
            self._parts.append(text[:end])
        return text[:end]


def _stop_prefix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
