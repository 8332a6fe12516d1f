"""POST /tokenize and /detokenize: vLLM's shapes, the base tokenizer for every model name,
and refusals that name the parameter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hotlora.server.engine.tokenizer import load_tokenizer
from tests.helpers import make_hf_llama
from tests.server.support import DEMO, PROMPT, assert_error, make_settings, serve
from tests.tokenizer_builders import write_metaspace_tokenizer


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serve(make_settings(tmp_path_factory.mktemp("tok"))) as c:
        yield c


@pytest.mark.parametrize("model", [None, DEMO, "reverse"])
def test_tokenize_is_the_base_tokenizer_for_every_model(
    client: TestClient, model: str | None
) -> None:
    named = {} if model is None else {"model": model}
    r = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True} | named)
    assert r.status_code == 200, r.text
    out = r.json()
    want = list(PROMPT.encode())  # the demo tokenizer: one token per byte, ids = byte values
    assert (out["count"], out["max_model_len"], out["tokens"]) == (len(want), 128, want)
    # Byte-level token strings: GPT-2's printable stand-ins for space and newline.
    assert "".join(out["token_strs"]).replace("Ġ", " ").replace("Ċ", "\n") == PROMPT
    r = client.post("/detokenize", json={"tokens": want} | named)
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}


def test_detokenize_writes_special_tokens_out(client: TestClient) -> None:
    r = client.post("/detokenize", json={"tokens": [104, 105, 256]})
    assert r.status_code == 200 and r.json() == {"prompt": "hi<|endoftext|>"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
        ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 257]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 3}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": []}, 400, "messages"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        # Valid JSON, but a lone surrogate is no Unicode text: the tokenizer cannot take it.
        ("/tokenize", {"prompt": "a\ud800b"}, 400, "prompt"),
        ("/v1/completions", {"model": DEMO, "prompt": "a\ud800b"}, 400, "prompt"),
    ],
)
def test_bad_requests_name_the_parameter(
    client: TestClient, path: str, body: dict[str, object], status: int, param: str
) -> None:
    # Sent as ASCII JSON (json.dumps escapes a lone surrogate as \\ud800, which httpx cannot).
    raw = json.dumps(body).encode()
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, status, param=param)


def test_special_tokens_follow_the_flag_for_a_llama_tokenizer(tmp_path: Path) -> None:
    base = tmp_path / "llama"
    make_hf_llama(base, "llama3-gqa2")
    write_metaspace_tokenizer(base, add_bos_token=True)  # Llama 2 style: BOS from tokenizer.json
    tok = load_tokenizer(base)
    with serve(make_settings(tmp_path, model=base, seed_demo_adapters=False)) as c:
        with_bos = c.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
        without = c.post(
            "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}
        ).json()["tokens"]
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == without
    assert with_bos == tok.encode("hello world")


def test_tokenizer_info_names_the_special_tokens(client: TestClient) -> None:
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"  # config.json: 256, 256
    assert info["model_max_length"] == 128
    eos = client.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"]
    assert eos == [256]


def test_tokenize_messages_renders_the_chat_template(client: TestClient) -> None:
    msgs = [{"role": "system", "content": "hi"}, {"role": "user", "content": "hello"}]
    out = client.post("/tokenize", json={"model": "reverse", "messages": msgs}).json()
    assert out["tokens"] == list(PROMPT.encode())  # the demo template: "in: hello\nout:"
    for body in ({}, {"prompt": "x", "messages": msgs}):
        assert_error(
            client.post("/tokenize", json=body), 400, param="prompt", contains="exactly one"
        )
    assert_error(
        client.post("/tokenize", json={"messages": [{"role": "system", "content": "x"}]}),
        400,
        param="messages",
        contains="user message",
    )
