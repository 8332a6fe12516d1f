"""docker/k8s: the KubeRay RayService (Ray path) and the plain Deployment + Service + GAIE pool
parse, and say what hotlora needs (no cluster here: structure only; needs no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hotlora.server.config import Settings

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"


def _docs(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
    return {d["kind"]: d for d in docs}


def _env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def _check_env(names: set[str] | dict[str, str]) -> None:
    """Every HOTLORA_* variable names a real setting (pydantic-settings ignores unknown ones)."""
    fields = {f"HOTLORA_{f.upper()}" for f in Settings.model_fields}
    unknown = {n for n in names if n.startswith("HOTLORA_")} - fields
    assert not unknown, unknown


def test_rayservice() -> None:
    docs = _docs("rayservice.yaml")
    svc = docs["RayService"]
    assert svc["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "hotlora.server.ray_app:app" and app["route_prefix"] == "/"
    _check_env(app["runtime_env"]["env_vars"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"HotloraReplica", "HotloraIngress", "MetricsBoard"}
    replica = deployments["HotloraReplica"]
    assert replica["num_replicas"] >= 2 and {"num_cpus", "num_gpus"} <= set(
        replica["ray_actor_options"]
    )
    cluster = svc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:  # every Ray pod mounts the one store
        (c,) = pod["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get("/data/adapters") == "adapters"
        volumes = pod["spec"]["volumes"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes}
        assert claims["adapters"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_plain_deployment_for_gaie() -> None:
    docs = _docs("gaie.yaml")
    dep, svc, pool = docs["Deployment"], docs["Service"], docs["InferencePool"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels
    assert svc["spec"]["selector"] == labels and pool["spec"]["selector"]["matchLabels"] == labels
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    _check_env(env)
    assert env["HOTLORA_SHARED_STORE"] == "true" and env["HOTLORA_HOST"] == "0.0.0.0"
    port = int(env["HOTLORA_PORT"])
    assert c["ports"][0]["containerPort"] == port
    assert pool["spec"]["targetPorts"][0]["number"] == port
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    text = (K8S / "gaie.yaml").read_text()
    for metric in ("hotlora_num_requests_waiting", "hotlora_kv_cache_usage_perc",
                   "hotlora_lora_requests_info"):  # fmt: skip
        assert metric in text
