"""Sampling parameters and the per-row sampler (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hotlora.server.engine.errors import RequestError

MAX_LOGPROBS = 20  # as OpenAI: at most 20 alternatives per position
_GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing by it overflows)


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; a seed makes the row's
    samples reproducible whatever else is in the batch. The logits a row samples from are, in
    order (vLLM's): its raw logits + logit_bias, its stop tokens masked while it has fewer than
    min_tokens tokens, repetition_penalty over prompt and output tokens, frequency and presence
    penalties over output tokens, then temperature, top-k and top-p. `logprobs` (k alternatives
    per generated token) and `prompt_logprobs` (the same for every prompt token) report the raw
    logits' log-softmax: the adapter's own distribution, not the sampler's. max_tokens 0
    generates nothing (to score a prompt with prompt_logprobs).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        pairs = tuple(bias.items()) if isinstance(bias, Mapping) else tuple(bias)
        object.__setattr__(self, "logit_bias", pairs)
        _check_int("max_tokens", self.max_tokens, 0)
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise RequestError(
                f"temperature must be >= 0, got {self.temperature!r}", "temperature"
            )
        _check_int("top_k", self.top_k, 0, note=" (0 = off)")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be a list of non-empty strings", "stop")
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        if not 0 < self.repetition_penalty <= 100 or math.isinf(self.repetition_penalty):
            raise RequestError(
                "repetition_penalty must be in (0, 100] (1 = off), "
                f"got {self.repetition_penalty!r}",
                "repetition_penalty",
            )
        for pair in self.logit_bias:
            if len(pair) != 2:
                raise RequestError("logit_bias must map token ids to biases", "logit_bias")
            _check_int("logit_bias token id", pair[0], 0, param="logit_bias")
            if not -100 <= pair[1] <= 100:
                raise RequestError(
                    f"logit_bias values must be in [-100, 100], got {pair[1]!r}", "logit_bias"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything but temperature/top-k/top-p changes this row's logits."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


def _check_int(
    name: str,
    value: object,
    lo: int,
    hi: int | None = None,
    note: str = "",
    param: str | None = None,
) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be an integer {where}{note}, got {value!r}", param or name)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class RowHistory:
    """What a row's logit adjustments read: its tokens so far and the ids that end it."""

    prompt_ids: list[int]
    out_ids: list[int]
    stop_ids: frozenset[int]  # EOS (unless ignored) and stop_token_ids, masked below min_tokens


def adjust_logits(row: Tensor, p: SamplingParams, h: RowHistory) -> Tensor:
    """One row's (V,) float logits after logit_bias, min_tokens and the penalties (a copy)."""
    row = row.clone()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=row.device)
        row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=row.device))
    if len(h.out_ids) < p.min_tokens and 0 < len(h.stop_ids) < row.shape[0]:
        # (a row whose every token is a stop token cannot be held back: nothing else to pick)
        row[torch.tensor(sorted(h.stop_ids), device=row.device)] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(h.prompt_ids) | set(h.out_ids)), device=row.device)
        vals = row[seen]
        rp = p.repetition_penalty
        row[seen] = torch.where(vals > 0, vals / rp, vals * rp)
    if (p.frequency_penalty or p.presence_penalty) and h.out_ids:
        ids, counts = torch.tensor(h.out_ids, device=row.device).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    return row


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask out tokens outside top-k and outside the top-p nucleus (always keeps the best one)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: Sequence[RowHistory | None] = (),
) -> list[int]:
    """One next token per row of logits (B, V); rows never influence each other.

    `histories` is needed only for rows whose params adjust logits (penalties, bias, min_tokens).
    """
    logits = logits.float()
    tokens: list[int] = logits.argmax(-1).tolist()  # plain greedy rows are done here
    for i, p in enumerate(params):
        if p.greedy and not p.adjusts_logits:
            continue
        row = logits[i]
        if p.adjusts_logits:
            history = histories[i] if i < len(histories) else None
            if history is None:
                raise ValueError("sample: rows that adjust logits need their histories")
            row = adjust_logits(row, p, history)
        if p.greedy:
            tokens[i] = int(row.argmax())
            continue
        probs = _filter(row / p.temperature, p.top_k, p.top_p).softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # extreme penalties overflowed this row:
            tokens[i] = int(torch.nan_to_num(row, nan=float("-inf")).argmax())  # never the batch
            continue
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
