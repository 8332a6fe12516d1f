"""Per-replica Prometheus metrics for the Ray Serve path (server/ray_app.py).

Every replica keeps its own `hotlora_*` registries. It pushes their text to one `MetricsBoard`
deployment every `PUSH_INTERVAL_S`; the ingress's `GET /metrics` answers all of them merged, each
sample labelled `replica="<id>"` (the id its responses carry in `X-Hotlora-Replica`), and
`GET /metrics/replica/<id>` one replica's text as it rendered it. A replica that stopped pushing
(dead, scaled down) drops out after `STALE_S`.
"""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families
from ray import serve

PUSH_INTERVAL_S = 1.0
STALE_S = 15.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def merge_texts(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one, every sample labelled with its replica;
    a family's HELP and TYPE once, its samples together (as the exposition format wants)."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica in sorted(texts):
        for fam in text_string_to_metric_families(texts[replica]):
            _, _, lines = families.setdefault(fam.name, (fam.documentation, fam.type, []))
            for s in fam.samples:
                labels = {"replica": replica, **s.labels}
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{inner}}} {_number(s.value)}")
    out: list[str] = []
    for name, (doc, kind, lines) in families.items():
        help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
        # The text format names a counter by its sample (`x_total`), as prometheus_client does.
        exposed = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {exposed} {help_text}")
        out.append(f"# TYPE {exposed} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class MetricsBoard:
    """The replicas' latest metric texts, by replica id."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def _fresh(self) -> dict[str, str]:
        now = time.monotonic()
        self._texts = {k: v for k, v in self._texts.items() if now - v[0] < STALE_S}
        return {k: text for k, (_, text) in self._texts.items()}

    def put(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.monotonic(), text)

    def replicas(self) -> list[str]:
        return sorted(self._fresh())

    def one(self, replica: str) -> str | None:
        return self._fresh().get(replica)

    def merged(self) -> str:
        return merge_texts(self._fresh())

    def __repr__(self) -> str:  # pragma: no cover - Ray's logs
        return f"MetricsBoard({len(self._texts)} replicas)"
