"""Batched multi-adapter kernels: LoRA y[t] += s[k] * B[k] @ (A[k] @ x[t]) and DEU
y[t] += g[k] * D[k](h[t]), with k = token_slots[t] (-1 = no adapter); decode attention over
cache rows read in place up to each row's length.

Imports run one way (tests/kernels/test_imports.py keeps it so): the leaves _common (dtypes,
next_pow2) and deu_params, then slot_meta (SlotMeta), then checks (each op's argument check),
then the Triton launchers triton_* and the dispatchers lora, deu and attention, which import
their launcher lazily; reference depends on deu_params only.
"""

from hotlora.kernels.attention import decode_attention
from hotlora.kernels.deu import deu_activation, deu_apply, deu_planes, deu_unit
from hotlora.kernels.lora import lora_apply
from hotlora.kernels.reference import (
    decode_attention_reference,
    deu_reference,
    deu_unit_reference,
    lora_reference,
)
from hotlora.kernels.slot_meta import SlotMeta, build_slot_meta, per_token_meta

__all__ = [
    "SlotMeta",
    "build_slot_meta",
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
    "per_token_meta",
]
