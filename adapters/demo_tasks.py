"""The demo tasks: checkable string transformations, and the byte-level demo tokenizer.

All training text is generated here from a seeded random generator (no corpus is downloaded):
random lowercase words and digit strings, framed as `in: <word>\\nout: <answer>`.
The base model learns to copy (`out:` repeats the input), so it fails every task below.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS = "<|endoftext|>"


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE with no merges: one token per byte (ids 0-255) plus EOS (256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _BYTE_ORDER[c])
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def _byte_order() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (char -> byte value)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_ORDER = _byte_order()


def prompt_for(word: str) -> str:
    return f"in: {word}\nout:"


# The demo models' chat template (their chat_template.jinja): the LAST user message becomes
# `prompt_for(content)`; system, assistant and earlier user messages are ignored. Written by
# training.pretrain_demo; tests check it renders exactly `prompt_for`.
DEMO_CHAT_TEMPLATE = """\
{#- hotlora demo: the last user message becomes the prompt "in: <content>\\nout:" -#}
{%- set ns = namespace(prompt=none) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}{%- set ns.prompt = message['content'] -%}{%- endif -%}
{%- endfor -%}
{%- if ns.prompt is none -%}
    {{- raise_exception('the hotlora demo chat template needs a user message') -}}
{%- elif ns.prompt is not string -%}
    {{- raise_exception('the hotlora demo chat template needs string message content') -}}
{%- endif -%}
{{- 'in: ' + ns.prompt + '\\nout:' -}}
"""


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))


def _any(rng: random.Random) -> str:
    """Lowercase, uppercase, digit or mixed strings: the base must know every character."""
    alphabet = rng.choice(
        [
            "abcdefghijklmnopqrstuvwxyz",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            "0123456789",
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.!",
        ]
    )
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9))).strip() or "a"


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 7)))


@dataclass(frozen=True)
class Task:
    """A task: how to draw an input and the one correct answer for it."""

    name: str
    draw: Callable[[random.Random], str]
    answer: Callable[[str], str]
    description: str
    digits: bool = False  # inputs are digit strings, not words

    def accepts(self, x: str) -> bool:
        """Whether x is an input of this task's kind (the demo only shows those)."""
        return x.isdigit() if self.digits else x.isalpha()


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", _any, lambda w: w, "repeat the input (what the base model learns)"),
        Task("reverse", _word, lambda w: w[::-1], "reverse the word"),
        Task("upper", _word, str.upper, "uppercase the word"),
        Task("sort", _digits, lambda d: "".join(sorted(d)), "sort the digits ascending", True),
        Task("pirate", _word, lambda w: f"arr, {w} matey", "answer in a pirate persona"),
    )
}


def example(task: Task, rng: random.Random) -> tuple[str, str]:
    """(prompt, completion): the completion starts with a space and ends at EOS."""
    x = task.draw(rng)
    return prompt_for(x), " " + task.answer(x)


def heldout(task: Task, n: int, seed: int = 1234) -> list[tuple[str, str]]:
    """Prompts drawn from a generator no training run uses, with their expected answers."""
    rng = random.Random(seed)
    return [(prompt_for(x), task.answer(x)) for x in (task.draw(rng) for _ in range(n))]


# The shipped demo assets (written by `python -m hotlora.training.build_demo`).
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = DEMO_DIR / "hotlora-demo"
DEMO_ADAPTERS = DEMO_DIR / "adapters"
DEMO_TASKS = ("reverse", "upper", "sort", "pirate")
# The shipped DEU adapter (written by `python -m hotlora.training.deu_study --ship`) -> its task.
DEMO_DEU = {"upper-deu": "upper"}
# Every shipped adapter -> the task it solves.
DEMO_ADAPTER_TASKS = {**{t: t for t in DEMO_TASKS}, **DEMO_DEU}

# The Llama-family demo (4 layers, GQA, SwiGLU; written by
# `python -m hotlora.training.build_demo --family llama`): an all-linear LoRA and a DEU
# adapter on the SwiGLU gate.
LLAMA_DEMO_MODEL = DEMO_DIR / "hotlora-llama-demo"
LLAMA_DEMO_ADAPTERS = DEMO_DIR / "llama-adapters"
LLAMA_DEMO_ADAPTER_TASKS = {"reverse": "reverse", "upper-deu": "upper"}


def demo_adapters(model_dir: Path) -> dict[str, tuple[Path, str]]:
    """The shipped adapters of a shipped demo model (name -> (directory, task)); {} otherwise."""
    demos = {
        DEMO_MODEL: (DEMO_ADAPTERS, DEMO_ADAPTER_TASKS),
        LLAMA_DEMO_MODEL: (LLAMA_DEMO_ADAPTERS, LLAMA_DEMO_ADAPTER_TASKS),
    }
    root, tasks = demos.get(model_dir.resolve(), (DEMO_ADAPTERS, {}))
    return {name: (root / name, task) for name, task in tasks.items()}


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of EOS, which every training example ends with."""
    i = tokenizer.token_to_id(EOS)
    if i is None:
        raise ValueError(f"the tokenizer has no {EOS} token")
    return int(i)
