#!/usr/bin/env bash
# Fuzzes kvindex's KV-event decoder: ./run.sh [SECONDS] (default 600).
#
# Installs cargo-fuzz if it is missing, seeds the (gitignored) corpus with the committed seeds
# (golden vLLM payloads and a few hand-made ones), then runs the decode_batch target for
# SECONDS. cargo-fuzz needs a nightly compiler: the nightly toolchain is used when rustup has
# one, otherwise the default toolchain with RUSTC_BOOTSTRAP=1. Crashes land in
# fuzz/artifacts/decode_batch/; the script exits non-zero if the fuzzer found one.
set -euo pipefail

secs="${1:-600}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.." # cargo fuzz runs from the crate that holds fuzz/

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    echo "no nightly toolchain; using RUSTC_BOOTSTRAP=1 with the default one" >&2
    export RUSTC_BOOTSTRAP=1
fi

corpus="fuzz/corpus/decode_batch"
mkdir -p "$corpus"
cp fuzz/seeds/*.bin "$corpus/"

# -rss_limit_mb: the decoder must never need much memory, whatever the input.
exec cargo "${toolchain[@]}" fuzz run decode_batch "$corpus" -- \
    -max_total_time="$secs" \
    -dict=fuzz/decode_batch.dict \
    -max_len=4096 \
    -rss_limit_mb=1024 \
    -print_final_stats=1
