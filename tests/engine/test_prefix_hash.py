"""Prefix-cache identity: the chain hash and its namespaces, with the anchors' bugs (vLLM,
SGLang) as named regression cases at the hash level."""

from __future__ import annotations

import hashlib

import pytest

from hotlora.server.engine.prefix_hash import (
    adapter_namespace,
    base_namespace,
    block_hash,
    prompt_block_hashes,
)

BS = 16
PROMPT = list(range(100, 100 + 3 * BS + 5))  # 3 full blocks + 5 tokens
DIGEST_V1, DIGEST_V2 = "a" * 64, "b" * 64


@pytest.mark.parametrize(
    ("length", "blocks"),
    [(1, 0), (BS - 1, 0), (BS, 0), (BS + 1, 1), (2 * BS, 1), (2 * BS + 1, 2), (3 * BS + 5, 3)],
)
def test_only_full_blocks_before_the_last_token_are_hashed(length: int, blocks: int) -> None:
    assert len(prompt_block_hashes(PROMPT[:length], BS, base_namespace(None))) == blocks


def test_the_hash_is_a_chain() -> None:
    ns = base_namespace(None)
    h = prompt_block_hashes(PROMPT, BS, ns)
    assert h[0] == block_hash(None, PROMPT[:BS], ns)
    assert h[1] == block_hash(h[0], PROMPT[BS : 2 * BS], ns)
    other = [7, *PROMPT[1:]]  # the same second block after another first one
    assert prompt_block_hashes(other, BS, ns)[1] != h[1]
    assert prompt_block_hashes(PROMPT[: 2 * BS + 1], BS, ns) == h[:2]  # a prefix shares hashes


def test_adapter_missing_from_the_hash_vllm_3264() -> None:
    # adapter A then adapter B on the same prompt: B must not hit A's blocks, nor the base's
    a = prompt_block_hashes(PROMPT, BS, adapter_namespace(None, "a", DIGEST_V1))
    b = prompt_block_hashes(PROMPT, BS, adapter_namespace(None, "b", DIGEST_V2))
    base = prompt_block_hashes(PROMPT, BS, base_namespace(None))
    assert not set(a) & set(b) and not set(a) & set(base) and not set(b) & set(base)


def test_same_name_new_weights_vllm_30931_and_reload_vllm_42125() -> None:
    old = prompt_block_hashes(PROMPT, BS, adapter_namespace(None, "tuned", DIGEST_V1))
    new = prompt_block_hashes(PROMPT, BS, adapter_namespace(None, "tuned", DIGEST_V2))
    assert not set(old) & set(new)
    # the same content uploaded again (deleted and re-uploaded) is the same computation
    again = prompt_block_hashes(PROMPT, BS, adapter_namespace(None, "tuned", DIGEST_V1))
    assert again == old


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # an adapter named like a base namespace or a tenant (vLLM #44701)
        (adapter_namespace(None, "base", DIGEST_V1), base_namespace(None)),
        (adapter_namespace(None, "acme", DIGEST_V1), base_namespace("acme")),
        (adapter_namespace("acme", "x", DIGEST_V1), adapter_namespace(None, "acme/x", DIGEST_V1)),
        # raw concatenation would make these equal (SGLang #24638)
        (adapter_namespace("ac", "mex", DIGEST_V1), adapter_namespace("acm", "ex", DIGEST_V1)),
        (base_namespace("tenant"), base_namespace(None)),
    ],
)
def test_namespaces_that_a_string_would_confuse_never_collide(
    one: tuple[object, ...], other: tuple[object, ...]
) -> None:
    assert one != other
    assert not set(prompt_block_hashes(PROMPT, BS, one)) & set(
        prompt_block_hashes(PROMPT, BS, other)
    )


def test_tenants_base_prompts_are_apart_unless_the_scope_is_global() -> None:
    acme = prompt_block_hashes(PROMPT, BS, base_namespace("acme"))
    beta = prompt_block_hashes(PROMPT, BS, base_namespace("beta"))
    assert not set(acme) & set(beta)
    assert base_namespace("acme", "global") == base_namespace("beta", "global")


def test_hashes_are_stable_across_processes() -> None:
    # SHA-256 of a canonical encoding, not Python's salted hash(): the exact bytes hashed
    assert block_hash(None, [1, 2, 3], ("base",)) == hashlib.sha256(
        b'[null,[1,2,3],["base"]]'
    ).digest()
    parent = bytes(range(32))
    ns = adapter_namespace("acme", "tuned", DIGEST_V1)
    assert block_hash(parent, [4], ns) == hashlib.sha256(
        f'["{parent.hex()}",[4],["adapter",["tenant","acme"],"tuned","{DIGEST_V1}"]]'.encode()
    ).digest()


def test_a_block_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        prompt_block_hashes(PROMPT, 0, base_namespace(None))
