"""GET /metrics: every hotlora_ metric is exported, and the counters agree with the traffic.

The app has one adapter slot, so alternating two adapters evicts (and reloads from the CPU
cache) on every switch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.server.support import (
    DEMO,
    EXPECTED,
    complete,
    demo_files,
    greedy_text,
    idle_metric_samples,
    make_settings,
    metric,
    metric_samples,
    serve,
    upload,
)

# family name (as the parser reports it) -> type
FAMILIES = {
    "hotlora_requests": "counter",
    "hotlora_time_to_first_token_seconds": "histogram",
    "hotlora_inter_token_latency_seconds": "histogram",
    "hotlora_e2e_request_latency_seconds": "histogram",
    "hotlora_request_queue_time_seconds": "histogram",
    "hotlora_prompt_tokens": "counter",
    "hotlora_generation_tokens": "counter",
    "hotlora_num_requests_running": "gauge",
    "hotlora_num_requests_waiting": "gauge",
    "hotlora_batch_size": "histogram",
    "hotlora_adapter_loads": "counter",
    "hotlora_adapter_load_seconds": "histogram",
    "hotlora_adapter_evictions": "counter",
    "hotlora_adapter_cpu_cache_bytes": "gauge",
    "hotlora_adapter_slots_used": "gauge",
    "hotlora_adapter_hot_swaps": "counter",
    "hotlora_merged_adapters": "gauge",
    "hotlora_lora_requests_info": "gauge",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serve(make_settings(tmp_path_factory.mktemp("metrics"), max_adapters=1)) as c:
        # Traffic touching every metric: base and adapters, a stream, a switch, a hot swap.
        for model in (DEMO, "reverse", "upper", "reverse"):
            assert greedy_text(c, model) == EXPECTED[model]
        assert complete(c, "pirate", stream=True).status_code == 200
        for _ in range(2):
            assert upload(c, "hot", *demo_files("upper")).status_code == 201
        yield c


def test_every_hotlora_metric_is_exported_with_its_type(client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name, kind in FAMILIES.items():
        assert name in families, f"{name} is not exported"
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].samples, f"{name} has no samples"


def test_traffic_shows_in_the_latency_histograms(client: TestClient) -> None:
    samples = metric_samples(client)
    for name in (
        "hotlora_time_to_first_token_seconds",
        "hotlora_inter_token_latency_seconds",
        "hotlora_e2e_request_latency_seconds",
        "hotlora_request_queue_time_seconds",
        "hotlora_adapter_load_seconds",
    ):
        assert metric(samples, f"{name}_count") >= 1, name
        assert metric(samples, f"{name}_sum") > 0, name
    assert metric(samples, "hotlora_batch_size_count", phase="prefill") >= 1
    assert metric(samples, "hotlora_batch_size_count", phase="decode") >= 1


def test_token_and_request_counters_match_the_usage(client: TestClient) -> None:
    before = metric_samples(client)
    body = complete(client, "upper").json()
    short = complete(client, "upper", max_tokens=2).json()
    after = idle_metric_samples(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    usage, short_usage = body["usage"], short["usage"]
    assert (
        delta("hotlora_prompt_tokens_total")
        == usage["prompt_tokens"] + short_usage["prompt_tokens"]
    )
    assert (
        delta("hotlora_generation_tokens_total")
        == usage["completion_tokens"] + short_usage["completion_tokens"]
    )
    assert delta("hotlora_requests_total", outcome="stop") == 1
    assert delta("hotlora_requests_total", outcome="length") == 1
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"hotlora_{name}_seconds_count") == 2, name
    assert metric(after, "hotlora_num_requests_running") == 0
    assert metric(after, "hotlora_num_requests_waiting") == 0


def test_one_slot_evicts_and_reloads_from_the_cpu_cache(client: TestClient) -> None:
    before = metric_samples(client)
    for model in ("reverse", "upper", "reverse", "upper"):
        assert greedy_text(client, model) == EXPECTED[model]
    after = metric_samples(client)
    evicted = metric(after, "hotlora_adapter_evictions_total", tier="device") - metric(
        before, "hotlora_adapter_evictions_total", tier="device"
    )
    assert evicted >= 3
    cpu_loads = metric(after, "hotlora_adapter_loads_total", tier="cpu", outcome="ok") - metric(
        before, "hotlora_adapter_loads_total", tier="cpu", outcome="ok"
    )
    assert cpu_loads >= 3  # both were cached after their first load from disk
    assert metric(after, "hotlora_adapter_loads_total", tier="disk", outcome="ok") >= 2
    assert metric(after, "hotlora_adapter_loads_total", outcome="error") == 0
    assert metric(after, "hotlora_adapter_slots_used") == 1
    assert metric(after, "hotlora_adapter_cpu_cache_bytes") >= 2 * len(demo_files("upper")[1])


def test_hot_swap_counter_counts_the_reupload(client: TestClient) -> None:
    before = metric(metric_samples(client), "hotlora_adapter_hot_swaps_total")
    assert before >= 1  # the fixture's second upload of "hot"
    assert upload(client, "hot", *demo_files("reverse")).status_code == 201
    assert metric(metric_samples(client), "hotlora_adapter_hot_swaps_total") == before + 1
    assert greedy_text(client, "hot") == EXPECTED["reverse"]


def test_lora_requests_info_has_vllm_labels(client: TestClient) -> None:
    greedy_text(client, "reverse")
    info = [s for s in idle_metric_samples(client) if s.name == "hotlora_lora_requests_info"]
    assert len(info) == 1
    labels = info[0].labels
    assert set(labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert labels["max_lora"] == "1"
    assert labels["running_lora_adapters"] == "" and labels["waiting_lora_adapters"] == ""
    assert info[0].value > 1e9  # a unix timestamp, as vLLM exports it


@pytest.fixture(scope="module")
def lora_info_seen(client: TestClient) -> set[tuple[str, str]]:
    """(running, waiting) label pairs of hotlora_lora_requests_info seen while a long reverse
    request runs and an upper request waits for the single slot."""
    threads = [
        threading.Thread(
            target=complete, args=(client, m), kwargs={"max_tokens": 60, "ignore_eos": True}
        )
        for m in ("reverse", "upper")
    ]
    seen: set[tuple[str, str]] = set()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for s in metric_samples(client):
            if s.name == "hotlora_lora_requests_info":
                seen.add((s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"]))
    for t in threads:
        t.join()
    return seen


def test_lora_requests_info_shows_running_and_waiting_adapters(
    lora_info_seen: set[tuple[str, str]],
) -> None:
    running = {r for r, _ in lora_info_seen if r}
    waiting = {w for _, w in lora_info_seen if w}
    assert running and waiting, lora_info_seen
    assert {r.split("@")[0] for r in running} <= {"reverse", "upper"}
    assert {w.split("@")[0] for w in waiting} <= {"reverse", "upper"}


def test_lora_requests_info_names_adapters_as_clients_do(
    lora_info_seen: set[tuple[str, str]],
) -> None:
    names = {n for pair in lora_info_seen for labels in pair if labels for n in labels.split(",")}
    assert names and names <= {"reverse", "upper"}, names
