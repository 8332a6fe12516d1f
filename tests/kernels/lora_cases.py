"""Shared case builders and tolerances for the LoRA kernel tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from hotlora.kernels import lora_reference

# dtype -> (rtol, atol) against the fp64 reference. Values are O(1) by construction (see
# make_case), so atol and rtol are on the same scale; half tolerances cover rounding of the
# output and of the fp16/bf16 intermediate fed to the expand dot.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

PATTERNS = ("none", "interleaved", "one_slot", "many", "runs", "distinct")


def make_slots(pattern: str, T: int, S: int, seed: int = 0) -> list[int]:
    """Token->slot patterns the engine produces: decode, prefill runs, mixed, no adapters."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "none":
        return [-1] * T
    if pattern == "one_slot":
        # The last slot: a gather with -1 would alias exactly this one.
        return [S - 1] * T
    if pattern == "interleaved":
        picks = torch.randint(0, S, (T,), generator=g).tolist()
        return [s if t % 2 == 0 else -1 for t, s in enumerate(picks)]
    if pattern == "many":
        picks = torch.randint(-1, S, (T,), generator=g).tolist()
        picks[0] = S - 1  # at least one active token, whatever the seed
        return picks
    if pattern == "runs":
        # Prefill-like: contiguous blocks per request, slots out of order, one no-adapter block.
        order = [3 % S, -1, 0, S - 1, 1 % S]
        sizes = [max(1, T // len(order))] * len(order)
        sizes[-1] = T - sum(sizes[:-1])
        out: list[int] = []
        for s, n in zip(order, sizes, strict=True):
            out += [s] * max(n, 0)
        return out[:T]
    if pattern == "distinct":
        if T > S:
            raise ValueError("distinct needs T <= S")
        return torch.randperm(S, generator=g)[:T].tolist()
    raise ValueError(pattern)


@dataclass
class Case:
    y: Tensor
    x: Tensor
    A: Tensor
    B: Tensor
    scales: Tensor
    slots: list[int]

    def reference(self) -> Tensor:
        """fp64 expected output computed from the (possibly half-rounded) inputs."""
        return lora_reference(
            self.y.double(),
            self.x.double(),
            self.A.double(),
            self.B.double(),
            self.scales,
            torch.tensor(self.slots, dtype=torch.long),
        )


def make_case(
    T: int,
    d_in: int,
    d_out: int,
    R: int,
    S: int,
    pattern: str,
    dtype: torch.dtype,
    seed: int = 0,
) -> Case:
    """Random O(1)-valued case; slots carry effective ranks <= R, zero-padded like the engine."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S, R, d_in, generator=g, dtype=torch.float64) / d_in**0.5  # (S, R, d_in)
    B = torch.randn(S, d_out, R, generator=g, dtype=torch.float64) / R**0.5  # (S, d_out, R)
    eff = torch.randint(1, R + 1, (S,), generator=g)  # (S,)
    for k in range(S):
        A[k, eff[k] :] = 0
        B[k, :, eff[k] :] = 0
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)  # (T, d_in)
    y = torch.randn(T, d_out, generator=g, dtype=torch.float64)  # (T, d_out)
    scales = torch.rand(S, generator=g, dtype=torch.float32) * 2  # (S,)
    return Case(
        y=y.to(dtype),
        x=x.to(dtype),
        A=A.to(dtype),
        B=B.to(dtype),
        scales=scales,
        slots=make_slots(pattern, T, S, seed),
    )


def transposed_storage(W: Tensor) -> Tensor:
    """Same logical (S, m, n) tensor stored as (S, n, m), like GPT-2 Conv1D weights."""
    return W.transpose(1, 2).contiguous().transpose(1, 2)


def with_storage(case: Case, storage: str) -> Case:
    """Case whose A/B use the given storage: "standard" (contiguous) or "transposed"."""
    if storage == "standard":
        return case
    return dataclasses.replace(case, A=transposed_storage(case.A), B=transposed_storage(case.B))


def assert_matches(out: Tensor, case: Case, dtype: torch.dtype) -> None:
    """out close to the fp64 reference; rows with slot -1 bit-identical to the input y."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), case.reference(), rtol=rtol, atol=atol)
    none = torch.tensor([s < 0 for s in case.slots], dtype=torch.bool)
    assert torch.equal(out[none], case.y[none]), "rows with slot -1 must stay bit-exact"
