"""Batched multi-adapter kernels: LoRA y[t] += s[k] * B[k] @ (A[k] @ x[t]) and DEU
y[t] += g[k] * D[k](h[t]), with k = token_slots[t] (-1 = no adapter); decode attention over
cache rows read in place up to each row's length."""

from kernels.attention import decode_attention
from kernels.deu import deu_activation, deu_apply, deu_planes, deu_unit
from kernels.lora import LoRAMeta, build_lora_meta, lora_apply
from kernels.reference import (
    decode_attention_reference,
    deu_reference,
    deu_unit_reference,
    lora_reference,
)

__all__ = [
    "LoRAMeta",
    "build_lora_meta",
    "decode_attention",
    "decode_attention_reference",
    "deu_activation",
    "deu_apply",
    "deu_planes",
    "deu_reference",
    "deu_unit",
    "deu_unit_reference",
    "lora_apply",
    "lora_reference",
]
