"""POST /v1/chat/completions through the real `openai` client: the demo template and adapters,
Llama-3 and ChatML templates against transformers' apply_chat_template + generate, streaming,
logprobs, n, and every refusal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from hotlora.adapters.demo_tasks import prompt_for
from hotlora.server.engine.chat_template import ChatTemplate
from tests.engine.test_chat_template import CHATML, LLAMA3
from tests.server.support import DEMO, EXPECTED, assert_error, complete, make_settings, serve
from tests.tokenizer_builders import write_bytelevel_tokenizer

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _openai(client: TestClient) -> Any:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serve(make_settings(tmp_path_factory.mktemp("chat"), max_queue=8)) as c:
        yield c


@pytest.mark.parametrize("name", ["reverse", "upper", "pirate", DEMO])
def test_demo_adapters_chat_like_their_completions(client: TestClient, name: str) -> None:
    oa = _openai(client)
    word = "hello"
    r = oa.chat.completions.create(
        model=name, messages=[{"role": "user", "content": word}], temperature=0, max_tokens=24
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (
        r.choices[0].message.content
        == EXPECTED[name]
        == complete(client, name, prompt_for(word)).json()["choices"][0]["text"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(prompt_for(word).encode())  # one byte per token
    # system and earlier turns are ignored by the demo template; text parts are joined
    r2 = oa.chat.completions.create(
        model=name,
        messages=[
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "ignored"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": word}]},
        ],
        temperature=0,
        max_completion_tokens=24,
    )
    assert r2.choices[0].message.content == EXPECTED[name]


def test_streamed_chat_equals_the_plain_one(client: TestClient) -> None:
    oa = _openai(client)
    msgs = [{"role": "user", "content": "hotlora"}]
    plain = oa.chat.completions.create(model="reverse", messages=msgs, temperature=0)
    chunks = list(
        oa.chat.completions.create(
            model="reverse",
            messages=msgs,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == plain.choices[0].message.content == " aroltoh"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_chat_logprobs_are_sorted_and_consistent(client: TestClient) -> None:
    oa = _openai(client)
    r = oa.chat.completions.create(
        model="reverse",
        messages=[{"role": "user", "content": "abc"}],
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert (
            t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        )  # greedy
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
    none = oa.chat.completions.create(
        model="reverse", messages=[{"role": "user", "content": "abc"}], temperature=0
    )
    assert none.choices[0].logprobs is None


def test_n_choices_with_a_seed_are_reproducible(client: TestClient) -> None:
    oa = _openai(client)
    kw: dict[str, Any] = {
        "model": "pirate",
        "messages": [{"role": "user", "content": "Zq!? 81 xW"}],
        "temperature": 2.0,
        "n": 3,
        "seed": 11,
        "max_tokens": 12,
    }
    a, b = oa.chat.completions.create(**kw), oa.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # choice j is seeded seed + j, not seed
    single = oa.chat.completions.create(**{**kw, "n": 1, "seed": 12})
    assert single.choices[0].message.content == texts[1]
    streamed = list(oa.chat.completions.create(**kw, stream=True))
    by_index = {
        i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i)
        for i in range(3)
    }
    assert [by_index[i] for i in range(3)] == texts
    order = [c.choices[0].index for c in streamed if c.choices[0].delta.content]
    assert order != sorted(order)  # the choices interleave, as they are generated together
    assert streamed[-1].choices[0].delta.content is None and streamed[-1].choices[0].finish_reason


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "user"),
        ({"messages": [{"role": "user"}]}, "messages", "required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages",
            "text",
        ),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ({"n": 0}, "n", "1"),
        ({"n": 9}, "n", "queue"),  # 9 choices can never wait in a queue of 8
        ({"max_completion_tokens": 100000}, "max_tokens", "context"),
        ({"response_format": {"type": "json_object"}}, "response_format", "text"),
        ({"presence_penalty": 3}, "presence_penalty", "2"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token id"),
        ({"logit_bias": {"999": 1}}, "logit_bias", "vocabulary"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "0"),
        ({"min_tokens": 30, "max_tokens": 20}, "min_tokens", "max_tokens"),
        (
            {"messages": [{"role": "system", "content": "only a system turn"}]},
            "messages",
            "user message",
        ),
    ],
)
def test_bad_chat_requests_are_400(
    client: TestClient, body: dict[str, Any], param: str, says: str
) -> None:
    full = {"model": "reverse", "messages": [{"role": "user", "content": "x"}], **body}
    assert_error(client.post("/v1/chat/completions", json=full), 400, param=param, contains=says)


def test_unknown_model_is_404(client: TestClient) -> None:
    body = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 404, param="model")


def test_a_model_without_a_template_says_how_to_supply_one(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model = tmp_path / "plain"
    model.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / f).symlink_to(
            (Path(__file__).parents[2] / "adapters/demo/hotlora-demo" / f).resolve()
        )
    with serve(make_settings(tmp_path_factory.mktemp("plain"), model=model)) as c:
        body = {"model": "plain", "messages": [{"role": "user", "content": "x"}]}
        assert_error(
            c.post("/v1/chat/completions", json=body),
            400,
            param="messages",
            contains="--chat-template",
        )
        # the flag supplies one
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[-1]['content'] }}")
    with serve(
        make_settings(tmp_path_factory.mktemp("plain2"), model=model, chat_template=template)
    ) as c:
        body = {
            "model": "plain",
            "messages": [{"role": "user", "content": "in: abc\nout:"}],
            "temperature": 0,
            "max_tokens": 5,
        }
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text


def test_a_hostile_template_is_refused_and_the_server_keeps_serving(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    evil = tmp_path / "evil.jinja"
    evil.write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "') }}"
    )
    with serve(make_settings(tmp_path_factory.mktemp("evil"), chat_template=evil)) as c:
        body = {"model": "reverse", "messages": [{"role": "user", "content": "x"}]}
        assert_error(
            c.post("/v1/chat/completions", json=body), 400, param="messages", contains="sandbox"
        )
        assert not (tmp_path / "pwned").exists()
        assert (
            c.post(
                "/v1/completions",
                json={"model": "reverse", "prompt": prompt_for("abc"), "temperature": 0},
            ).status_code
            == 200
        )


# ---------------------------------------------------------------- real templates vs transformers


def _llama_model(path: Path, flavour: str, template: str) -> Any:
    """A random tiny Llama with a byte-level tokenizer of `flavour` and a chat template."""
    write_bytelevel_tokenizer(path, flavour=flavour)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    eos = tok.convert_tokens_to_ids("<|eot_id|>" if flavour == "llama3" else "<|im_end|>")
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model, tok


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "what is 2+2?"},
]


@pytest.mark.parametrize(("flavour", "template"), [("llama3", LLAMA3), ("qwen2", CHATML)])
def test_templated_chat_equals_transformers_generate(
    tmp_path_factory: pytest.TempPathFactory, flavour: str, template: str
) -> None:
    path = tmp_path_factory.mktemp(flavour) / "model"
    model, tok = _llama_model(path, flavour, template)
    ids = tok.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # the Llama-3 template writes BOS itself: hotlora must not add a second one
    assert ids.count(tok.bos_token_id) == (1 if flavour == "llama3" else 0)
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert ChatTemplate.load(path).render(CONVERSATION) == text  # type: ignore[union-attr]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    eos = model.config.eos_token_id
    ref = ref[: ref.index(eos)] if eos in ref else ref
    want = tok.decode(ref, skip_special_tokens=True)
    with serve(make_settings(tmp_path_factory.mktemp("store"), model=path)) as c:
        oa = _openai(c)
        r = oa.chat.completions.create(
            model="model", messages=CONVERSATION, temperature=0, max_tokens=10
        )
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
        served = c.post("/tokenize", json={"messages": CONVERSATION}).json()["tokens"]
        assert served == ids  # the very ids transformers feeds the model: one BOS at most
        assert r.choices[0].message.content == want
        tokens = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()[
            "tokens"
        ]
        assert tokens == ids
        chunks = list(
            oa.chat.completions.create(
                model="model", messages=CONVERSATION, temperature=0, max_tokens=10, stream=True
            )
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
