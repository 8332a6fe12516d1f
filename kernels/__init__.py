"""Batched multi-adapter LoRA kernels: y[t] += s[k] * B[k] @ (A[k] @ x[t]), k = token_slots[t]."""

from kernels.lora import LoRAMeta, build_lora_meta, lora_apply
from kernels.reference import lora_reference

__all__ = ["LoRAMeta", "build_lora_meta", "lora_apply", "lora_reference"]
