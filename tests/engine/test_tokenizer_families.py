"""load_tokenizer against transformers.AutoTokenizer, and the Detokenizer, per tokenizer family.

The directories are built in-test (tests/tokenizer_builders.py): Llama-3 and Qwen2 style byte-level
BPE, Llama-2 / Mistral style Metaspace BPE with byte fallback, and the GPT-2 demo tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from hotlora.adapters.demo_tasks import build_tokenizer
from hotlora.server.engine.errors import ModelLoadError
from hotlora.server.engine.tokenizer import Detokenizer, TextTokenizer, load_tokenizer
from tests.tokenizer_builders import write_bytelevel_tokenizer, write_metaspace_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

TEXTS = [
    "",
    "hello world",
    " hello",
    "  two leading spaces",
    "\nnew line first",
    "line one\nline two\n\n",
    "trailing space ",
    "Café crème brûlée 中文 🦙",
    "日本語 € 🙂 naïve Ωmega",  # outside the training corpus: byte fallback / byte pieces
    "tab\tand\r\nCRLF",
    "<s>hi</s>",
    "a <s> b </s>",
    "<|begin_of_text|>x<|eot_id|> y",
    "<|im_start|>user\nhi<|im_end|>",
    "<unk> literal",
]
MULTIBYTE = "héllo 中文字符 🦙 and 日本 € 🙂! Crème\nbrûlée"


def _edit_json(path: Path, **fields: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    path.write_text(json.dumps(data))


def _config(model_type: str) -> Callable[[Path], None]:
    return lambda d: _edit_json(d / "config.json", model_type=model_type)


def _tok_config(**fields: Any) -> Callable[[Path], None]:
    return lambda d: _edit_json(d / "tokenizer_config.json", **fields)


# name -> (builder, tweak applied after building)
STYLES: dict[str, tuple[Callable[[Path], None], Callable[[Path], None] | None]] = {
    "llama3": (write_bytelevel_tokenizer, None),
    "qwen2": (lambda d: write_bytelevel_tokenizer(d, flavour="qwen2"), _config("qwen2")),
    "llama2": (write_metaspace_tokenizer, None),
    "llama2-nobos": (lambda d: write_metaspace_tokenizer(d, add_bos_token=False), None),
    "llama2-eos": (lambda d: write_metaspace_tokenizer(d, add_eos_token=True), None),
    "llama2-model-type": (write_metaspace_tokenizer, _config("llama")),
    "llama2-legacy": (write_metaspace_tokenizer, _tok_config(legacy=True)),
    "llama2-no-prefix": (write_metaspace_tokenizer, _tok_config(add_prefix_space=False)),
    "mistral": (lambda d: write_metaspace_tokenizer(d, normalizer_style=False), _config("mistral")),
    "mistral-as-llama2": (write_metaspace_tokenizer, _config("mistral")),  # file used as is
    "metaspace-nobos": (
        lambda d: write_metaspace_tokenizer(d, add_bos_token=False, normalizer_style=False),
        None,
    ),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, (build, tweak) in STYLES.items():
        d = tmp_path_factory.mktemp(name)
        build(d)
        if tweak is not None:
            tweak(d)
        out[name] = d
    gpt2 = tmp_path_factory.mktemp("gpt2")
    build_tokenizer().save(str(gpt2 / "tokenizer.json"))
    out["gpt2-demo"] = gpt2
    return out


def _auto(d: Path) -> Any:
    if not TRANSFORMERS_5:
        pytest.skip("load_tokenizer follows transformers 5's AutoTokenizer")
    return transformers.AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_encode_matches_autotokenizer(dirs: dict[str, Path], style: str) -> None:
    tok, ref = load_tokenizer(dirs[style]), _auto(dirs[style])
    for text in TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert type(tok.encode(text)) is list


def test_metaspace_bos_eos_and_byte_fallback(dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(dirs["llama2"])
    assert tok.bos_token_id == 1 and tok.encode("hi")[0] == 1
    assert load_tokenizer(dirs["llama2-nobos"]).encode("hi")[0] != 1
    assert load_tokenizer(dirs["llama2-eos"]).encode("hi")[-1] == 2
    pieces = [tok.raw.id_to_token(i) for i in tok.encode("日本 🙂")]
    assert "<0xF0>" in pieces  # the emoji is not in the vocab: byte fallback
    # transformers' LlamaTokenizer uses a Metaspace pre-tokenizer: one "▁" for a leading space
    assert pieces[:2] == ["<s>", "▁"] and tok.encode(" hi") == tok.encode("hi")
    file_only = Tokenizer.from_file(str(dirs["llama2"] / "tokenizer.json"))
    raw_ids = file_only.encode(" hi").ids  # its Prepend + Replace normalizer gives two
    assert [file_only.id_to_token(i) for i in raw_ids[1:3]] == ["▁", "▁"]


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 honoured add_bos_token")
def test_config_add_bos_token_is_ignored_next_to_tokenizer_json(tmp_path: Path) -> None:
    write_metaspace_tokenizer(tmp_path, add_bos_token=True)
    _edit_json(tmp_path / "tokenizer_config.json", add_bos_token=False, add_eos_token=True)
    ids = load_tokenizer(tmp_path).encode("hi")
    assert ids == _auto(tmp_path)("hi")["input_ids"] and ids[0] == 1 and ids[-1] != 2
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = None  # and no post-processor means no BOS, whatever the flags say
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    _edit_json(tmp_path / "tokenizer_config.json", add_bos_token=True)
    ids = load_tokenizer(tmp_path).encode("hi")
    assert ids == _auto(tmp_path)("hi")["input_ids"] and ids[0] != 1


def test_config_tokens_missing_from_tokenizer_json_are_added(tmp_path: Path) -> None:
    write_bytelevel_tokenizer(tmp_path)
    extra = {"additional_special_tokens": ["<|tool|>"]}
    _edit_json(tmp_path / "tokenizer_config.json", pad_token="<|pad|>", **extra)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|eot_id|>"]
    spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst"}
    spec["truncation"]["stride"] = 0
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok, ref = load_tokenizer(tmp_path), _auto(tmp_path)
    for text in ["a<|pad|>b<|eot_id|><|tool|>", "a long text, longer than the saved truncation"]:
        assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.token_to_id("<|tool|>") == tok.vocab_size - 1 and tok.token_to_id("nope") is None
    assert {tok.token_to_id("<|pad|>"), tok.vocab_size - 1} <= tok.special_ids
    assert tok.vocab_size == tok.raw.get_vocab_size(with_added_tokens=True) == len(ref)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_decode_round_trips(dirs: dict[str, Path], style: str) -> None:
    tok, ref = load_tokenizer(dirs[style]), _auto(dirs[style])
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, False) == ref.decode(ids, skip_special_tokens=False), text
        plain = "<" not in text and (style.startswith(("llama3", "qwen")) or text[:1] != " ")
        if plain:
            assert tok.decode(ids) == text


def _family(dirs: dict[str, Path], style: str) -> TextTokenizer:
    if style == "gpt2-raw":  # a bare tokenizers.Tokenizer: the Detokenizer wraps it
        return TextTokenizer(build_tokenizer())
    return load_tokenizer(dirs[style])


DETOK_STYLES = ["llama3", "qwen2", "llama2", "llama2-no-prefix", "mistral", "gpt2-demo"]


def _with_specials(tok: TextTokenizer, text: str) -> list[int]:
    """`text`'s ids with special tokens inside (decode skips them), as a model might emit."""
    ids = tok.encode(text)
    specials = sorted(tok.special_ids)
    return ids[:5] + specials[:1] + ids[5:9] + specials[-1:] + ids[9:]


@pytest.mark.parametrize("style", DETOK_STYLES)
def test_incremental_detokenization_equals_full_decode(dirs: dict[str, Path], style: str) -> None:
    tok = _family(dirs, style)
    for text in [MULTIBYTE, " " + MULTIBYTE, "日本 🙂🙂 €€ x"]:
        ids = _with_specials(tok, text)
        full = tok.decode(ids)
        d = Detokenizer(tok, stop=())
        out = ""
        for k in range(1, len(ids) + 1):
            delta = d.update(ids[:k])
            assert "\ufffd" not in delta and "▁" not in delta
            out += delta
            now = tok.decode(ids[:k])
            last = [i for i in ids[:k] if i not in tok.special_ids][-1:]
            closed = not set(last) & tok.byte_ids  # an open byte run may still turn invalid
            if "\ufffd" not in now and closed:  # a complete prefix: nothing may be held back
                assert out == now, (k, out, now)
            assert full.startswith(out)
        assert d.update(ids, final=True) == "" and out == full == d.text
        assert not d.stopped


@pytest.mark.parametrize("style", [*DETOK_STYLES, "gpt2-raw"])
@pytest.mark.parametrize("stop", [("中文",), ("brû", "🦙"), ("\n",), ("é",), ("zzz", "! C")])
def test_incremental_detokenization_with_stop_strings(
    dirs: dict[str, Path], style: str, stop: tuple[str, ...]
) -> None:
    tok = _family(dirs, style)
    ids = _with_specials(tok, MULTIBYTE)
    full = tok.decode(ids)
    cut = min((full.find(s) for s in stop if s in full), default=len(full))
    d = Detokenizer(tok if style != "gpt2-raw" else tok.raw, stop=stop)
    out = ""
    for k in range(1, len(ids) + 1):
        delta = d.update(ids[:k])
        assert "\ufffd" not in delta and "▁" not in delta
        out += delta
        assert full[:cut].startswith(out)
        if d.stopped:
            break
    out += d.update(ids[:k], final=True)
    assert d.stopped and out == d.text == full[:cut]
    assert d.update(ids, final=True) == ""  # nothing after a stop


# Byte pieces that form invalid UTF-8: ByteFallback turns every byte of an invalid run into
# U+FFFD, bytes that made a complete character before the run went bad included.
BAD_BYTE_RUNS = [
    ["<0xC3>", "<0xA9>", "<0x80>"],  # "é", then a stray continuation byte
    ["<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>"],  # "é", then a cut-off 4-byte sequence
    ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>", "<0xFF>"],  # "🦙", then a byte no UTF-8 has
    ["<0x80>"],
    ["<0xE4>", "<0xB8>"],  # cut off at the end of the output
]


@pytest.mark.parametrize("style", ["llama2", "llama2-no-prefix", "mistral"])
@pytest.mark.parametrize("run", BAD_BYTE_RUNS, ids=lambda r: "".join(r))
@pytest.mark.parametrize("after", ["", " ok"])
def test_invalid_byte_runs_stream_to_exactly_the_full_decode(
    dirs: dict[str, Path], style: str, run: list[str], after: str
) -> None:
    tok, ref = load_tokenizer(dirs[style]), _auto(dirs[style])
    byte_ids = [tok.token_to_id(p) for p in run]
    assert None not in byte_ids, run
    ids = tok.encode("héllo 中文") + [i for i in byte_ids if i is not None]
    ids += tok.encode(after, add_special_tokens=False)
    full = tok.decode(ids)
    assert full == ref.decode(ids, skip_special_tokens=True)  # the reference's text
    assert "\ufffd" in full
    d = Detokenizer(tok, stop=())
    out = ""
    for k in range(1, len(ids) + 1):
        out += d.update(ids[:k])
        assert full.startswith(out), (k, out, full)  # never a character that decode retracts
    out += d.update(ids, final=True)
    assert out == d.text == full


@pytest.mark.parametrize("style", ["llama2", "mistral"])
def test_invalid_byte_run_at_the_end_is_flushed_as_decode_does(
    dirs: dict[str, Path], style: str
) -> None:
    tok = load_tokenizer(dirs[style])
    ids = tok.encode("ab") + [tok.token_to_id("<0xC3>"), tok.token_to_id("<0xA9>")]
    ids += [tok.token_to_id("<0x80>")]  # type: ignore[list-item]
    d = Detokenizer(tok, stop=())
    out = "".join(d.update(ids[:k]) for k in range(1, len(ids) + 1))
    assert "é" not in out  # held back while the run was open
    assert out + d.update(ids, final=True) == tok.decode(ids) == d.text  # type: ignore[arg-type]
    assert d.text.endswith("\ufffd" * 3)


def test_byte_pieces_are_plain_text_without_a_byte_fallback_decoder(
    dirs: dict[str, Path],
) -> None:
    assert load_tokenizer(dirs["llama3"]).byte_ids == frozenset()
    assert len(load_tokenizer(dirs["llama2"]).byte_ids) == 256


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_final_flushes_an_incomplete_character(dirs: dict[str, Path], style: str) -> None:
    tok = load_tokenizer(dirs[style])
    ids = tok.encode("ab 🙂")
    cut = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd"))
    d = Detokenizer(tok, stop=())
    out = "".join(d.update(ids[:k]) for k in range(1, cut + 1))
    assert "\ufffd" not in out
    assert out + d.update(ids[:cut], final=True) == tok.decode(ids[:cut]) == d.text


class _CountingTokenizer(TextTokenizer):
    def __init__(self, base: TextTokenizer) -> None:
        super().__init__(base.raw, base.bos_token_id, base.eos_token_ids, base.byte_ids)
        self.longest = 0

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_detokenizer_decodes_a_window_not_the_whole_output(
    dirs: dict[str, Path], style: str
) -> None:
    tok = _CountingTokenizer(load_tokenizer(dirs[style]))
    ids = tok.encode("the quick brown fox 中文 🦙 " * 40)
    full, tok.longest = tok.decode(ids), 0
    d = Detokenizer(tok, stop=("never",))
    out = "".join(d.update(ids[:k]) for k in range(1, len(ids) + 1))
    assert out + d.update(ids, final=True) == full
    assert len(ids) > 300 and tok.longest <= 8


def _write_all(d: Path, gen: Any = None, config: Any = None, eos: str | None = "</s>") -> Path:
    write_metaspace_tokenizer(d)
    _edit_json(d / "tokenizer_config.json", eos_token=eos)
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize(
    ("gen", "config", "eos", "want"),
    [
        ({"eos_token_id": [2, 5, 99999]}, {"eos_token_id": 7}, "</s>", {2, 5}),
        ({"eos_token_id": 9}, None, "</s>", {9}),
        ({"bos_token_id": 1}, {"eos_token_id": 7}, "</s>", {7}),  # no eos_token_id in it
        (None, {"eos_token_id": [3, -1]}, "</s>", {3}),
        (None, {"eos_token_id": None}, "</s>", {2}),
        (None, None, {"content": "</s>", "special": True}, {2}),
        (None, None, None, set()),
        (None, None, "<not-a-token>", {400}),  # transformers adds it as a new special token
    ],
)
def test_eos_token_ids(tmp_path: Path, gen: Any, config: Any, eos: Any, want: set[int]) -> None:
    tok = load_tokenizer(_write_all(tmp_path, gen, config, eos))
    assert tok.eos_token_ids == frozenset(want)


def test_bytelevel_ids(dirs: dict[str, Path]) -> None:
    llama3, qwen = load_tokenizer(dirs["llama3"]), load_tokenizer(dirs["qwen2"])
    assert llama3.bos_token_id == llama3.token_to_id("<|begin_of_text|>") is not None
    assert llama3.eos_token_ids == {llama3.token_to_id("<|eot_id|>")}
    assert qwen.bos_token_id is None and qwen.eos_token_ids == {qwen.token_to_id("<|im_end|>")}
    demo = load_tokenizer(dirs["gpt2-demo"])
    assert (
        demo.bos_token_id is None and demo.eos_token_ids == frozenset() and demo.vocab_size == 257
    )


def _refusal(tmp_path: Path, name: str, content: Any) -> Path:
    write_metaspace_tokenizer(tmp_path)
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", "{not json", r"tokenizer\.json: not a valid tokenizer\.json"),
        ("tokenizer.json", [1, 2], r"tokenizer\.json: not a valid tokenizer\.json"),
        ("tokenizer.json", {"model": 3}, r"tokenizer\.json: not a valid tokenizer\.json"),
        ("tokenizer_config.json", ["a"], r"tokenizer_config\.json: not a JSON object"),
        ("tokenizer_config.json", "{", r"tokenizer_config\.json: not valid JSON"),
        ("config.json", "nope", r"config\.json: not valid JSON"),
        ("generation_config.json", 3, r"generation_config\.json: not a JSON object"),
        ("generation_config.json", {"eos_token_id": [2, "3"]}, r"generation_config\.json: eos"),
        ("config.json", {"eos_token_id": "2"}, r"config\.json: eos_token_id must be an int"),
        ("config.json", {"eos_token_id": True}, r"config\.json: eos_token_id must be an int"),
        ("tokenizer_config.json", {"tokenizer_class": 5}, "tokenizer_class must be a string"),
        ("tokenizer_config.json", {"eos_token": 2}, r"tokenizer_config\.json: eos_token must"),
        ("tokenizer_config.json", {"bos_token": {"content": 1}}, "bos_token must be a string"),
        ("tokenizer_config.json", {"added_tokens_decoder": []}, "added_tokens_decoder must"),
        ("tokenizer_config.json", {"additional_special_tokens": [7]}, "extra_special_tokens must"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"x": "<s>"}}, "entry 'x' is not"),
        (
            "tokenizer_config.json",
            {"added_tokens_decoder": {"5": {"content": "<s>"}}},
            r"added_tokens_decoder gives '<s>' id 5, but tokenizer\.json gives it 1",
        ),
    ],
)
def test_refusals(tmp_path: Path, name: str, content: Any, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_tokenizer(_refusal(tmp_path, name, content))


def test_missing_tokenizer_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json not found"):
        load_tokenizer(tmp_path)


def test_split_special_tokens_encodes_their_text(tmp_path: Path) -> None:
    write_bytelevel_tokenizer(tmp_path)
    _edit_json(tmp_path / "tokenizer_config.json", split_special_tokens=True)
    tok, text = load_tokenizer(tmp_path), "hi<|eot_id|>"
    assert tok.encode(text) == _auto(tmp_path)(text)["input_ids"]
    assert tok.token_to_id("<|eot_id|>") not in tok.encode(text)


@pytest.mark.parametrize("style", ["llama2", "mistral"])
def test_a_stop_string_inside_an_open_byte_run_stops_at_once(
    dirs: dict[str, Path], style: str
) -> None:
    # "\n" is the byte piece <0x0A> in these vocabularies: a newline never closes its run, yet
    # stop=["\n"] must end the request on the newline, not at max_tokens.
    tok = load_tokenizer(dirs[style])
    newline = tok.token_to_id("<0x0A>")
    assert newline is not None and newline in tok.byte_ids
    ids = tok.encode("ab") + [newline, newline, newline]
    d = Detokenizer(tok, stop=("\n",))
    k = next(k for k in range(1, len(ids) + 1) if (d.update(ids[:k]), d.stopped)[1])
    assert k == len(ids) - 2 and d.text == tok.decode(ids[: k - 1])
    # below min_tokens (no stop check) the newline is text, held while its run is open
    d = Detokenizer(tok, stop=("\n",))
    out = "".join(d.update(ids[:k], check_stop=False) for k in range(1, len(ids) + 1))
    assert not d.stopped and "\n" not in out
