#!/usr/bin/env bash
# Renders both kustomizations and checks what they would run: the expected objects, and a
# daemon configuration that `kvmesh serve` accepts. Usage: deploy/check.sh PATH_TO_KVMESH PYTHON
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kvmesh=${1:-target/debug/kvmesh}
python=${2:-python3}
command -v kubectl >/dev/null || { echo "error: kubectl is needed to render deploy/ (kubectl kustomize)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for variant in deploy deploy/with-redis; do
    kubectl kustomize "$variant" >"$tmp/out.yaml"
    "$python" - "$tmp/out.yaml" "$tmp/kvmesh.toml" "$variant" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
want = {"ConfigMap/kvmesh", "Deployment/kvmesh", "Service/kvmesh", "Service/vllm-engines", "Deployment/vllm-engine"}
if sys.argv[3].endswith("with-redis"):
    want |= {"StatefulSet/kvmesh-redis", "Service/kvmesh-redis", "Deployment/kvmesh-ingest", "ConfigMap/kvmesh-ingest"}
missing = want - set(kinds)
assert not missing, f"{sys.argv[3]}: missing {missing}; rendered {kinds}"
# Every kvmesh configuration, one file each, for the daemon to check.
cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kvmesh")]
for i, cm in enumerate(cms):
    open(f"{sys.argv[2]}.{i}", "w").write(cm["data"]["kvmesh.toml"])
[dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm-engine"]
args = " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])
assert "enable_kv_cache_events" in args and "replay_endpoint" in args, args
print(f"{sys.argv[3]}: {len(docs)} objects: {', '.join(kinds)}")
PY
    # The daemon must accept every configuration as rendered.
    for conf in "$tmp"/kvmesh.toml.*; do
        "$kvmesh" serve --config "$conf" --print-config >/dev/null
        rm "$conf"
    done
done
echo "deploy/ renders and its configuration is valid"
