"""How each model family names its modules, as PEFT sees them.

An adapter file names modules the way the Hugging Face model class does ("transformer.h.3.attn.
c_attn" in a GPT2LMHeadModel, "model.layers.3.self_attn.q_proj" in a LlamaForCausalLM, or the
same without the first segment for a bare GPT2Model / LlamaModel). A layout is everything the
adapter library needs to know about a family to match configs and keys; it holds no weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class ModuleLayout:
    """One family's module names: its adapter targets and every other module PEFT could match."""

    family: str
    model_prefix: str  # the *ForCausalLM class's prefix ("transformer." / "model.")
    blocks: str  # the block list's attribute ("h" / "layers")
    targets: tuple[str, ...]  # adaptable projections inside a block, in the engine's order
    other_top: tuple[str, ...]  # non-target modules below the prefix
    other_block: tuple[str, ...]  # non-target modules of a block, relative to it
    ff_target: str  # the projection whose output is the MLP activation's input (DEU's width)
    fan_in_fan_out: bool  # PEFT's flag for these targets: Conv1D weights are stored [in, out]

    @property
    def prefixes(self) -> tuple[str, str]:
        """The LM-head layout first, then the bare model's."""
        return (self.model_prefix, "")

    def module_name(self, prefix: str, layer: int, target: str) -> str:
        return f"{prefix}{self.blocks}.{layer}.{target}"

    def iter_targets(self, prefix: str, n_layer: int) -> Iterator[tuple[str, int, str]]:
        """(module name, layer, target) for every target of an n_layer model in one layout."""
        for layer in range(n_layer):
            for target in self.targets:
                yield self.module_name(prefix, layer, target), layer, target

    def others(self, prefix: str, n_layer: int) -> list[str]:
        """Every module name that is not a target, in one layout."""
        names = [f"{prefix}{m}" for m in self.other_top]
        names += [f"{prefix}{self.blocks}.{i}{m}" for i in range(n_layer) for m in self.other_block]
        if prefix:
            names += [prefix.rstrip("."), "lm_head"]
        return names

    @cached_property
    def module_re(self) -> re.Pattern[str]:
        """A block module name in either layout: groups prefix, layer and target."""
        return re.compile(
            rf"(?P<prefix>{re.escape(self.model_prefix)})?{re.escape(self.blocks)}\."
            r"(?P<layer>0|[1-9]\d*)\.(?P<target>.+)"
        )

    @cached_property
    def all_linear_re(self) -> re.Pattern[str]:
        """PEFT's "all-linear": every Linear/Conv1D but the output head, i.e. every target."""
        return re.compile(
            rf"(?:{re.escape(self.model_prefix)})?{re.escape(self.blocks)}\.\d+\.(?:"
            + "|".join(re.escape(t) for t in self.targets)
            + ")"
        )

    def deu_key(self, layer: int, param: str) -> str:
        """A DEU tensor's key: per-neuron parameters of one block's MLP activation."""
        return f"base_model.model.{self.model_prefix}{self.blocks}.{layer}.mlp.deu.{param}"

    @cached_property
    def deu_key_re(self) -> re.Pattern[str]:
        return re.compile(
            rf"base_model\.model\.{re.escape(self.model_prefix)}{re.escape(self.blocks)}\."
            r"(?P<layer>0|[1-9]\d*)\.mlp\.deu\.(?P<param>[a-z0-9]+)"
        )


def gpt2_dims(n_embd: int, n_inner: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of a GPT-2 block's targets."""
    d, f = n_embd, n_inner
    return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, f),
            "mlp.c_proj": (f, d)}


def llama_dims(hidden: int, intermediate: int, q: int, kv: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of a Llama-family block's targets; q and kv are the head widths summed
    (heads x head_dim), so k/v are narrower than q under grouped-query attention."""
    d, f = hidden, intermediate
    return {
        "self_attn.q_proj": (d, q), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
        "self_attn.o_proj": (q, d),
        "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d),
    }


GPT2_LAYOUT = ModuleLayout(
    family="gpt2",
    model_prefix="transformer.",
    blocks="h",
    targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    other_top=("wte", "wpe", "drop", "h", "ln_f"),
    other_block=("", ".ln_1", ".attn", ".attn.attn_dropout", ".attn.resid_dropout", ".ln_2",
                 ".mlp", ".mlp.act", ".mlp.dropout"),
    ff_target="mlp.c_fc",
    fan_in_fan_out=True,
)

# Llama, Mistral, Qwen2 and Qwen3 share these names (Qwen3 adds the q/k norms).
LLAMA_LAYOUT = ModuleLayout(
    family="llama",
    model_prefix="model.",
    blocks="layers",
    targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    other_top=("embed_tokens", "layers", "norm", "rotary_emb"),
    other_block=("", ".self_attn", ".self_attn.q_norm", ".self_attn.k_norm", ".mlp",
                 ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm"),
    ff_target="mlp.gate_proj",
    fan_in_fan_out=False,
)
