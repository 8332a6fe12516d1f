"""Every Prometheus metric hotlora exports, defined in one place.

Two registries, one per side of the engine boundary: `Metrics` lives with the API (requests,
latencies, tokens, the queue, uploads) and `CoreMetrics` with the engine loop (batches, adapter
tiers, slots, merges), which may run in its own process. /metrics serves both texts.
"""

from __future__ import annotations

from collections import Counter as Counter_
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KINDS = ("lora", "deu", "lora+deu")


class Metrics:
    """The API's metrics. Labels are bounded: outcomes, tiers and kinds are fixed enums."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "hotlora_requests", "Finished requests by outcome", ["outcome"], registry=r
        )  # outcome: stop | length | abort | error | rejected | timeout
        self.ttft = Histogram(
            "hotlora_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "hotlora_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=_TOKEN_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "hotlora_time_per_output_token_seconds",
            "(e2e - ttft) / (tokens - 1) per request",
            buckets=_TOKEN_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "hotlora_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_time = Histogram(
            "hotlora_request_queue_time_seconds",
            "Arrival to admission into a batch row",
            buckets=_LATENCY,
            registry=r,
        )
        self.prompt_tokens = Counter("hotlora_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(
            "hotlora_generation_tokens", "Tokens generated", registry=r
        )
        self.waiting = Gauge(
            "hotlora_num_requests_waiting", "Requests waiting for a row", registry=r
        )
        self.hot_swaps = Counter(
            "hotlora_adapter_hot_swaps", "New versions uploaded under an existing name", registry=r
        )
        self.uploads = Counter(
            "hotlora_adapter_uploads", "Adapter uploads by outcome", ["outcome"], registry=r
        )  # outcome: ok | rejected

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CoreMetrics:
    """The engine loop's metrics (see the module docstring)."""

    def __init__(self, max_lora: int) -> None:
        r = self.registry = CollectorRegistry()
        self.max_lora = max_lora
        self.running = Gauge("hotlora_num_requests_running", "Requests in batch rows", registry=r)
        self.kv_usage = Gauge(
            "hotlora_kv_cache_usage_perc",
            "Fraction of KV-cache rows in use, 0-1 (as vllm:kv_cache_usage_perc)",
            registry=r,
        )
        self.batch_size = Histogram(
            "hotlora_batch_size", "Rows per forward pass", ["phase"], buckets=_BATCH, registry=r
        )  # phase: prefill | decode
        self.adapter_loads = Counter(
            "hotlora_adapter_loads",
            "Adapter loads by source tier, outcome and adapter kind",
            ["tier", "outcome", "kind"],
            registry=r,
        )  # tier: device (already resident) | cpu (cache hit) | disk; outcome: ok | error;
        # kind: lora | deu | lora+deu
        self.adapter_load_time = Histogram(
            "hotlora_adapter_load_seconds",
            "Time to make an adapter resident",
            ["tier"],
            buckets=_LATENCY,
            registry=r,
        )
        self.evictions = Counter(
            "hotlora_adapter_evictions", "Adapters evicted", ["tier"], registry=r
        )  # tier: device | cpu
        self.cache_bytes = Gauge(
            "hotlora_adapter_cpu_cache_bytes", "CPU adapter cache size", registry=r
        )
        self.slots_used = Gauge(
            "hotlora_adapter_slots_used", "Device adapter slots in use", registry=r
        )
        self.resident = Gauge(
            "hotlora_adapters_resident", "Adapters in device slots by kind", ["kind"], registry=r
        )
        for kind in KINDS:
            self.resident.labels(kind).set(0)
        self.slots_total = Gauge("hotlora_adapter_slots_total", "Device adapter slots", registry=r)
        self.slots_total.set(max_lora)
        self.merged = Gauge(
            "hotlora_merged_adapters", "Adapters served from merged weights", registry=r
        )
        self.merges = Counter("hotlora_adapter_merges", "Merges of a hot adapter", registry=r)
        self.lora_info = Gauge(
            "hotlora_lora_requests_info",
            "Running and waiting adapters (for adapter-affinity routers)",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )

    def set_lora_info(self, running: list[str], waiting: list[str]) -> None:
        """One sample with the current adapter sets (vLLM's shape: the value is a timestamp)."""
        import time

        self.lora_info.clear()
        self.lora_info.labels(
            ",".join(sorted(running)), ",".join(sorted(waiting)), str(self.max_lora)
        ).set(time.time())

    def set_resident(self, kinds: Iterable[str]) -> None:
        counts = Counter_(kinds)
        for kind in KINDS:
            self.resident.labels(kind).set(counts.get(kind, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
