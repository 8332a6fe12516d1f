"""Prefix-cache identity: which computed KV blocks a request may reuse.

Keys and values depend on more than the tokens: a LoRA on q/k/v changes them directly, and any
LoRA or DEU adapter changes the hidden states every later layer projects. So a block's hash
chains its parent's hash, its tokens and a *namespace* saying whose weights computed it:

    hash_i = SHA-256(canonical(hash_{i-1}, tokens of block i, namespace))

The namespace is a tagged tuple, never a concatenated string, so no adapter name can spell
another namespace (vLLM #44701, SGLang #24638):

    ("adapter", owner, name, digest)   owner ("tenant", t) or ("shared",); digest: the stored
                                       version's content digest, so a re-upload under the same
                                       name misses by construction (vLLM #30931, #42125)
    ("base", ("tenant", t))            a base-model row of tenant t (scope "tenant", default:
                                       a cache shared across tenants is a timing side channel)
    ("base",)                          a base-model row under scope "global", or without tenants

`canonical` is JSON of nested lists (strings escaped, ints as digits): one encoding per value,
and no two values share one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal

Namespace = tuple[object, ...]
Scope = Literal["tenant", "global"]


def adapter_namespace(tenant: str | None, name: str, digest: str) -> Namespace:
    """The namespace of rows served by one stored adapter version (`digest`: its content
    digest, covering weights and config)."""
    owner: tuple[str, ...] = ("shared",) if tenant is None else ("tenant", tenant)
    return ("adapter", owner, name, digest)


def base_namespace(tenant: str | None, scope: Scope = "tenant") -> Namespace:
    """The namespace of base-model rows of `tenant` (None: no tenant)."""
    if scope == "global" or tenant is None:
        return ("base",)
    return ("base", ("tenant", tenant))


def block_hash(parent: bytes | None, tokens: Sequence[int], namespace: Namespace) -> bytes:
    """The hash of one full block given its parent's (None for a prompt's first block)."""
    key = [None if parent is None else parent.hex(), [int(t) for t in tokens], namespace]
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).digest()


def prompt_block_hashes(
    token_ids: Sequence[int], block_size: int, namespace: Namespace
) -> list[bytes]:
    """The chain of hashes of a prompt's cacheable blocks: every full block that ends before
    the prompt's last token, whose logits must be computed (a hit never covers it)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - 1 - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size], namespace)
        hashes.append(parent)
    return hashes
