#!/usr/bin/env bash
# Installs what kvtransfer's UCX tests and `benches/run transfer` need, idempotently:
#   - a Python venv in .cache/transfer-venv with the `libucx-cu12` wheel (UCX >= 1.22: libucp,
#     headers, pkg-config files, ucx_perftest) and the `nixl-cu12` wheel (NIXL, for comparison);
#   - iproute2 (the `ip netns` tests).
# A second run is a fast no-op. Prints the environment to use (KVTRANSFER_UCX_LIB etc.) with
# `kvtransfer/setup.sh --env`.
#
# Environment overrides: KVMESH_CACHE (default <repo>/.cache), PYTHON (default python3),
# KVTRANSFER_SETUP_FORCE=1 to reinstall.
set -euo pipefail

UCX_WHEEL="libucx-cu12==1.22.0"
NIXL_WHEEL="nixl-cu12==1.5.1"
RECIPE="2"
STAMP_CONTENT="$UCX_WHEEL $NIXL_WHEEL recipe=$RECIPE"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="${KVMESH_CACHE:-$ROOT/.cache}"
VENV="$CACHE/transfer-venv"
STAMP="$VENV/.kvmesh-transfer-stamp"
PY="${PYTHON:-python3}"

export PIP_CACHE_DIR="$CACHE/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export PIP_PROGRESS_BAR=off

log() { printf '[transfer-setup] %s\n' "$*" >&2; }
die() { printf '[transfer-setup] ERROR: %s\n' "$*" >&2; exit 1; }

ucx_dir() { "$VENV/bin/python" -c 'import libucx, os; print(os.path.dirname(libucx.__file__))'; }

print_env() {
    local d; d="$(ucx_dir)"
    echo "KVTRANSFER_UCX_LIB=$d/lib/libucp.so"
    echo "KVTRANSFER_UCX_PERFTEST=$d/bin/ucx_perftest"
    echo "KVTRANSFER_PYTHON=$VENV/bin/python"
}

if [ "${1:-}" = "--env" ]; then
    [ -f "$STAMP" ] || die "not set up yet: run kvtransfer/setup.sh"
    print_env
    exit 0
fi

if ! command -v ip >/dev/null 2>&1; then
    log "installing iproute2 (Debian package)"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "iproute2 is missing and this user cannot install it"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq iproute2 >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_CONTENT" ] && [ "${KVTRANSFER_SETUP_FORCE:-0}" != 1 ]; then
    exit 0
fi

mkdir -p "$CACHE" "$PIP_CACHE_DIR"
rm -rf "$VENV"
log "creating $VENV"
"$PY" -m venv "$VENV" || die "python venv failed (is python3-venv installed?)"
log "installing $UCX_WHEEL $NIXL_WHEEL"
# nixl-cu12 declares torch as a dependency but its UCX path runs without it: no deps.
"$VENV/bin/pip" install -q --no-deps "$UCX_WHEEL" "$NIXL_WHEEL" || die "pip install failed"
"$VENV/bin/pip" install -q numpy || die "pip install numpy failed"
d="$(ucx_dir)"
[ -f "$d/lib/libucp.so" ] || die "libucp.so not found in the libucx wheel ($d/lib)"
"$VENV/bin/python" -c 'import nixl_cu12._api' || die "nixl does not import"
echo "$STAMP_CONTENT" > "$STAMP"
log "done"
