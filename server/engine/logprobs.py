"""Log-probabilities of chosen tokens and their top-k alternatives, from raw logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hotlora.server.engine.outputs import TokenLogprob

_CHUNK = 256  # prompt positions scored at a time: bounds the (n, V) float32 buffer


def token_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> list[TokenLogprob]:
    """log_softmax(logits)[i, token_ids[i]] with the k best of each row. logits (N, V)."""
    lp = logits.float().log_softmax(-1)  # (N, V)
    chosen = lp.gather(1, token_ids[:, None])[:, 0].tolist()  # (N,)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], token_ids[:, None][:, :0])  # (N, k)
    return [
        TokenLogprob(t, c, tuple(zip(ids, vals, strict=True)))
        for t, c, ids, vals in zip(
            token_ids.tolist(), chosen, top_i.tolist(), top_v.tolist(), strict=True
        )
    ]


def prompt_logprobs(
    logits_of: Callable[[Tensor], Tensor], hidden: Tensor, prompt_ids: list[int], k: int
) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first).

    hidden (n, d) is the prompt's last hidden state; `logits_of` maps it to logits.
    """
    n = len(prompt_ids)
    targets = torch.tensor(prompt_ids[1:], device=hidden.device)  # (n - 1,)
    out: list[TokenLogprob | None] = [None]
    for lo in range(0, n - 1, _CHUNK):
        hi = min(lo + _CHUNK, n - 1)
        out += token_logprobs(logits_of(hidden[lo:hi]), targets[lo:hi], k)
    return out
