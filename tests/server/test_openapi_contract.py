"""The published OpenAPI contract (server/openapi.py) against a live server.

Unit tests pin what the spec must say (every status each operation answers, the error body,
/metrics as text, bearer security, the adapter-name pattern), independently of the table that
builds it. Then schemathesis (its CLI, every check, every phase) drives the live server from
/openapi.json and must find nothing: no 5xx, no undocumented status, content type or header, no
response that breaks its schema, no schema-valid request refused and no invalid one accepted
(beyond the rules listed in CONFIG that a schema cannot state), a correct Allow on 405.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotlora.server.openapi import OPERATIONS
from hotlora.server.schemas import ADAPTER_NAME_PATTERN
from tests.server.support import (
    DEMO,
    DEMO_NAMES,
    LiveServer,
    assert_error,
    free_port,
    make_settings,
)

ADMIN, API_KEY = "contract-admin", "contract-user"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
AUTH = (401, 403)

# What each operation must document, written out here rather than read from OPERATIONS, so a
# change to the table that drops a status fails this test. 413: the body limit is checked before
# routing, so every operation answers it to a body over the limit, even one that reads none.
EXPECTED: dict[str, tuple[int, ...]] = {
    "POST /v1/completions": (200, 400, *AUTH, 404, 413, 429, 503, 504),
    "POST /v1/chat/completions": (200, 400, *AUTH, 404, 413, 429, 503, 504),
    "POST /v1/adapters": (201, 400, *AUTH, 413, 429, 503),
    "GET /v1/adapters/{name}": (200, *AUTH, 404, 413),
    "DELETE /v1/adapters/{name}": (200, *AUTH, 404, 413),
    "POST /v1/load_lora_adapter": (200, 400, *AUTH, 404, 413),
    "POST /v1/unload_lora_adapter": (200, 400, *AUTH, 404, 413),
    "GET /v1/models": (200, 400, *AUTH, 413),
    "GET /v1/adapters": (200, 400, *AUTH, 413),
    "POST /tokenize": (200, 400, *AUTH, 404, 413),
    "POST /detokenize": (200, 400, *AUTH, 404, 413),
    "GET /tokenizer_info": (200, *AUTH, 413),
    "GET /ready": (200, 413, 503),
    "GET /health": (200, 413),
    "GET /metrics": (200, 413),
}
ERROR_REF = "#/components/schemas/ErrorResponse"

# schemathesis.toml. A schema-valid request must be accepted (positive_data_acceptance), but
# these operations refuse valid-looking requests with a 400 for rules no JSON schema of this API
# can state, so 400 is an expected answer to them (the defaults otherwise):
# - completions, chat: the prompt's length in tokens against the context, token ids against the
#   vocabulary, min_tokens <= max_tokens, n x prompts against the queue, the chat template's
#   own refusals (the demo template needs a user message);
# - tokenize: the chat template's refusals; detokenize: token ids against the vocabulary;
# - adapter upload and load_lora_adapter: the files must be a valid adapter for this base (the
#   fuzzer sends random bytes), a name already loaded, the base model's id as a name.
CONFIG = """
[[operations]]
include-name = [
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /tokenize",
    "POST /detokenize",
    "POST /v1/adapters",
    "POST /v1/load_lora_adapter",
]
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "400", "401", "403", "404", "409", "429",
]

# Half the names the fuzzer sends are real ones (the base model and the seeded demo adapters), so
# generation, inspection and deletion get past the 404 for an unknown name.
[dictionaries.models]
values = MODELS

[parameters]
"path.name" = { dictionary = "models", probability = 0.5 }
"body.model" = { dictionary = "models", probability = 0.5 }
"body.lora_name" = { dictionary = "models", probability = 0.5 }
""".replace("MODELS", json.dumps([DEMO, *DEMO_NAMES]))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("contract")
    settings = make_settings(
        root,
        port=free_port(),
        admin_key=ADMIN,
        api_keys=[API_KEY],
        allowed_adapter_dirs=[root / "allowed"],
        # Bounded work per fuzzed request (n up to 16 rows of at most 64 tokens; more is a 400),
        # and the engine on a thread: no second process to start on a 2-core CI machine.
        max_queue=16,
        max_seq_len=64,
        engine_process=False,
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def spec(live: LiveServer) -> dict[str, Any]:
    r = httpx.get(f"{live.url}/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": op
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }


def test_every_operation_documents_each_status_it_answers(spec: dict[str, Any]) -> None:
    ops = _operations(spec)
    assert set(ops) == set(EXPECTED) == set(OPERATIONS)
    for key, op in ops.items():
        statuses = tuple(int(s) for s in op["responses"])
        assert statuses == EXPECTED[key], key
        for status in statuses[1:]:  # the errors: the shared body, never FastAPI's 422
            schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, (key, status)
    assert "422" not in str(spec["paths"]) and "HTTPValidationError" not in str(spec)
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_authenticated_operations_require_a_bearer_key(spec: dict[str, Any]) -> None:
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for key, op in _operations(spec).items():
        if 401 in EXPECTED[key]:
            assert op["security"] == [{"bearer": []}], key  # both kinds of key are configured
        else:
            assert "security" not in op, key


def test_rate_limits_and_outages_document_their_headers(spec: dict[str, Any]) -> None:
    op = _operations(spec)["POST /v1/completions"]
    too_many = op["responses"]["429"]["headers"]
    assert too_many["Retry-After"]["required"] is True
    assert {"x-ratelimit-limit-requests", "x-ratelimit-remaining-tokens"} <= set(too_many)
    assert "Retry-After" in op["responses"]["503"]["headers"]
    assert "text/event-stream" in op["responses"]["200"]["content"]  # stream: true


def test_metrics_are_documented_and_served_as_prometheus_text(
    live: LiveServer, spec: dict[str, Any]
) -> None:
    op = _operations(spec)["GET /metrics"]
    assert op["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    r = httpx.get(f"{live.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_adapter_names_state_the_pattern_the_server_enforces(spec: dict[str, Any]) -> None:
    ops = _operations(spec)
    for key in ("GET /v1/adapters/{name}", "DELETE /v1/adapters/{name}"):
        (param,) = ops[key]["parameters"]
        assert param["schema"]["pattern"] == ADAPTER_NAME_PATTERN
    upload = ops["POST /v1/adapters"]["requestBody"]["content"]
    assert set(upload) == {"multipart/form-data"}  # files, not a urlencoded form
    schemas = spec["components"]["schemas"]
    for model in ("LoadLoraRequest", "UnloadLoraRequest"):
        assert schemas[model]["properties"]["lora_name"]["pattern"] == ADAPTER_NAME_PATTERN


def test_405_lists_every_method_of_the_path(live: LiveServer) -> None:
    # GET and DELETE /v1/adapters/{name} are two routes; Starlette's own 405 names one.
    r = httpx.put(f"{live.url}/v1/adapters/pirate", timeout=30)
    assert_error(r, 405)
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["DELETE", "GET"]
    r = httpx.request("OPTIONS", f"{live.url}/v1/adapters", timeout=30)
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET", "POST"]


def test_a_body_over_the_limit_is_a_documented_413(live: LiveServer, spec: dict[str, Any]) -> None:
    # Checked before routing: an operation that reads no body answers it too.
    too_big = b" " * (live.state.settings.max_body_bytes + 1)
    ops = _operations(spec)
    for method, path in (("GET", "/v1/models"), ("POST", "/tokenize")):
        assert "413" in ops[f"{method} {path}"]["responses"]
        r = httpx.request(
            method,
            f"{live.url}{path}",
            content=too_big,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=60,
        )
        assert_error(r, 413)


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [("n", "2", 400), ("n", 2.5, 400), ("echo", 1, 400), ("n", 2.0, 200)],
)
def test_request_fields_take_the_json_types_the_schema_states(
    live: LiveServer, field: str, value: object, status: int
) -> None:
    # Strict validation (no "2" for an integer, no 1 for a boolean), but 2.0 is an integer in
    # JSON Schema, so it is one here too.
    body = {"model": DEMO, "prompt": "hi", "max_tokens": 1, field: value}
    r = httpx.post(
        f"{live.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, param=field)


def test_schemathesis_finds_no_contract_failure(live: LiveServer, tmp_path: Path) -> None:
    assert SCHEMATHESIS.exists(), "schemathesis is a test dependency: pip install -e '.[test]'"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [
        str(SCHEMATHESIS),
        "--config-file",
        str(config),
        "run",
        f"{live.url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        # The admin key may do everything (adapter changes too); ignored_auth sends requests
        # without it and with a wrong one.
        "--header",
        f"Authorization: Bearer {ADMIN}",
        "--max-examples",
        "25",  # per operation and phase: the whole run stays under a minute on 2 slow cores
        "--request-timeout",
        "30",
        # One worker: with more, hypothesis' lambda descriptions race in CPython's ast module
        # ("AST constructor recursion depth mismatch", a schemathesis runtime error).
        "--workers",
        "1",
        "--seed",
        "1",  # reproducible in CI; change it locally to explore other inputs
        "--generation-database",
        "none",
        "--no-color",
        "--output-sanitize",
        "false",  # the keys are throwaway; a failure's curl line should be runnable
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"schemathesis failed (rc {proc.returncode}, {took:.0f}s):\n{out}"
    assert f"Tested: {len(OPERATIONS)}" in out, out  # every operation ran
