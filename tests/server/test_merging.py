"""Hot adapter merging: a dominant adapter is served from merged weights without changing any
response, and merge_hot_adapters=False never merges."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from hotlora.adapters.demo_tasks import prompt_for
from tests.server.support import (
    DEMO,
    greedy_text,
    make_settings,
    metric,
    metric_samples,
    serve,
)

# Mostly one adapter (6 of 8 rows), plus the base and another adapter that must stay correct
# while "reverse" is merged into the base weights.
WORDS = ["hello", "planet", "banana", "quick", "zebra", "lemon"]
JOBS = [("reverse", prompt_for(w)) for w in WORDS] + [
    (DEMO, prompt_for("hello")),
    ("upper", prompt_for("lemon")),
]
SOLO = [" " + w[::-1] for w in WORDS] + [" hello", " LEMON"]


def _burst(client: TestClient) -> list[str]:
    """Every job at once, from as many threads as jobs."""
    with ThreadPoolExecutor(len(JOBS)) as pool:
        return list(pool.map(lambda job: greedy_text(client, *job), JOBS))


@pytest.fixture(scope="module", params=[True, False], ids=["merge", "no-merge"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path_factory.mktemp("merge"),
        merge_hot_adapters=request.param,
        merge_min_rows=2,
        merge_min_share=0.5,
    )
    with serve(settings) as c:
        assert [greedy_text(c, *job) for job in JOBS] == SOLO  # solo, one at a time
        yield c


def test_concurrent_requests_merge_the_hot_adapter_only_when_enabled(
    client: TestClient,
) -> None:
    enabled = client.app.state.hotlora.settings.merge_hot_adapters  # type: ignore[attr-defined]
    merges = 0.0
    # Whether requests overlap is up to thread scheduling: a few bursts make it certain.
    for _ in range(5):
        assert _burst(client) == SOLO
        merges = metric(metric_samples(client), "hotlora_adapter_merges_total")
        if merges >= 1:
            break
    if enabled:
        assert merges >= 1
    else:
        assert merges == 0
        assert metric(metric_samples(client), "hotlora_merged_adapters") == 0


def test_merged_adapter_is_unmerged_once_idle(client: TestClient) -> None:
    _burst(client)
    deadline = time.monotonic() + 5
    while metric(metric_samples(client), "hotlora_merged_adapters") != 0:
        assert time.monotonic() < deadline, "the hot adapter stayed merged with nothing running"
        time.sleep(0.05)
    # And the unmerged weights are the pristine base again.
    assert greedy_text(client, DEMO) == " hello"
    assert greedy_text(client, "reverse") == " olleh"
