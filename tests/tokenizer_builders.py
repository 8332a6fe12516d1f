"""Small tokenizer directories in the layouts of real base models, trained in-test (no hub).

`write_bytelevel_tokenizer` writes a Llama-3 / Qwen2 style byte-level BPE, and
`write_metaspace_tokenizer` a Llama-2 / Mistral / TinyLlama style BPE with byte fallback. Both write
`tokenizer.json` and `tokenizer_config.json` the way `transformers` saves those models (and nothing
else: a model test adds its own config.json). Vocabularies stay small so tiny random models can
use them; `vocab_size` is a target that the small corpus bounds (about 314-485 tokens for the
Metaspace style, 303-417 for byte-level, special tokens included): read the real size back with
`load_tokenizer(path).vocab_size`. Same arguments, same files (training is deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

# Multi-byte text on purpose: é and 中文 and 🦙 get their own tokens; text outside this corpus
# (other CJK, other emoji) exercises byte fallback (Metaspace) or multi-token bytes (byte-level).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello there! Hello again.",
    "in: cat\nout: tac\nin: dog\nout: god",
    "Café au lait, crème brûlée, déjà vu, résumé.",
    "中文 文本 中文字符 测试 中文",
    "llama 🦙 llama 🦙 emoji 🦙",
    "  indented line\n\ttabbed line\n\n",
    "numbers 0 1 2 3 42 1234 3.14",
    "def main():\n    return 0\n",
] * 4

# Qwen2's split regex (transformers' Qwen2Tokenizer hard-codes it; Llama 3 uses a close variant).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>"]


def _train(tok: Tokenizer, vocab_size: int, alphabet: list[str] | None = None) -> dict[str, Any]:
    trainer = BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet or []
    )
    tok.train_from_iterator(CORPUS, trainer)
    model: dict[str, Any] = json.loads(tok.to_str())["model"]
    return model


def _added(content: str, i: int) -> dict[str, Any]:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _config_entry(content: str) -> dict[str, Any]:
    entry = _added(content, 0)
    del entry["id"], entry["content"]
    return {"content": content, **entry}


def _write(path: Path, tok: Tokenizer, specials: dict[str, int], config: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.to_str())
    data["added_tokens"] = [_added(s, i) for s, i in specials.items()]
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    config["added_tokens_decoder"] = {str(i): _config_entry(s) for s, i in specials.items()}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_bytelevel_tokenizer(
    path: Path, *, flavour: str = "llama3", vocab_size: int = 400
) -> None:
    """A byte-level BPE: flavour "llama3" (BOS <|begin_of_text|> added by a TemplateProcessing,
    EOS <|end_of_text|>, <|eot_id|>) or "qwen2" (NFC normalizer, no BOS, EOS <|endoftext|>)."""
    if flavour not in ("llama3", "qwen2"):
        raise ValueError(f"unknown flavour {flavour!r}")
    split = pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    model = _train(tok, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = model["vocab"]
    names = LLAMA3_SPECIALS if flavour == "llama3" else QWEN_SPECIALS
    specials = {s: len(vocab) + k for k, s in enumerate(names)}  # after the BPE vocab, as upstream
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    config: dict[str, Any] = {"clean_up_tokenization_spaces": False, "model_max_length": 2048}
    if flavour == "llama3":
        bos = "<|begin_of_text|>"
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, specials[bos])]
        )
        byte_post = processors.ByteLevel(trim_offsets=False)
        tok.post_processor = processors.Sequence([byte_post, template])
        config |= {"bos_token": bos, "eos_token": "<|eot_id|>"}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        tok.normalizer = normalizers.NFC()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config |= {"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>"}
        config |= {"pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}
    _write(path, tok, specials, config)


def write_metaspace_tokenizer(
    path: Path,
    *,
    add_bos_token: bool = True,
    add_eos_token: bool = False,
    normalizer_style: bool = True,
    vocab_size: int = 400,
) -> None:
    """A Llama-2 style BPE: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then trained pieces.

    normalizer_style: the Llama-2 / TinyLlama layout (normalizer Prepend("▁") + Replace(" ", "▁"),
    no pre-tokenizer); otherwise the newer Mistral layout (a Metaspace pre-tokenizer). The
    post-processor adds <s> / </s> as `add_bos_token` / `add_eos_token` say (as transformers saves
    it: transformers 5.x itself ignores those two tokenizer_config.json fields).
    """
    tok = Tokenizer(models.BPE())
    # Train on ▁-split words (what sentencepiece does); the saved pipeline is set below.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model = _train(tok, vocab_size - 259)
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {p: i for i, p in enumerate(LLAMA2_SPECIALS + byte_tokens + pieces)}
    merges = [tuple(m) for m in model["merges"]]
    bpe = models.BPE(
        vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(bpe)
    if normalizer_style:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False
        )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    single = ("<s>:0 " if add_bos_token else "") + "$A:0" + (" </s>:0" if add_eos_token else "")
    pair = (
        single
        + (" <s>:1" if add_bos_token else "")
        + " $B:1"
        + (" </s>:1" if add_eos_token else "")
    )
    used = [(t, vocab[t]) for t, on in (("<s>", add_bos_token), ("</s>", add_eos_token)) if on]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=used
    )
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": add_eos_token,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "LlamaTokenizer",
    }
    _write(path, tok, {s: vocab[s] for s in LLAMA2_SPECIALS}, config)
