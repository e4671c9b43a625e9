#!/usr/bin/env bash
# Runs kvmesh's GPU suite (the CUDA copy engine's tests, kvtransfer's GPU-memory tests and the
# Python store with GPU caches) and the GPU benchmarks (`gpu`, and `gpu2`: GPU to GPU between two
# processes, on two GPUs when there are two) in one go, on a machine with a GPU.
#
#   kvstore/cuda/run-gpu.sh [--quick]             build with cargo, then test and bench here
#   kvstore/cuda/run-gpu.sh --pack DIR            build only (no GPU needed), put the binaries in DIR
#   kvstore/cuda/run-gpu.sh --from DIR [--quick]  test and bench with binaries packed earlier
#                                                 (for GPU machines without a Rust toolchain)
#
# A missing GPU is a failure here (KVMESH_REQUIRE_GPU=1), unlike in CI where the GPU tests skip.
# Logs go to target/gpu-run/; the benchmark writes target/bench/gpu.json (as `benches/run gpu`).
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=build
dir=
bench_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --pack) mode=pack; dir=${2:?--pack needs a directory}; shift ;;
    --from) mode=from; dir=${2:?--from needs a directory}; shift ;;
    --quick) bench_args+=(--quick) ;;
    --no-torch) bench_args+=(--no-torch) ;;
    *) echo "usage: $0 [--quick] [--no-torch] [--pack DIR | --from DIR]" >&2; exit 2 ;;
  esac
  shift
done

# Prints the executables cargo built for the given cargo arguments.
executables() {
  cargo "$@" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(t["kind"][0] + ":" + t["name"] + " " + m["executable"])
'
}

build() {
  local out=$1
  mkdir -p "$out"
  cargo test --release -p kvstore-cuda --no-run
  cargo test --release -p kvtransfer --features cuda --test gpu --no-run
  cargo bench --bench gpu --no-run
  cargo bench -p kvtransfer --features cuda --bench gpu2 --no-run
  while read -r what exe; do
    case $what in
      lib:kvstore_cuda) cp "$exe" "$out/unit" ;;
      test:gpu) cp "$exe" "$out/gpu-tests" ;;
    esac
  done < <(executables test --release -p kvstore-cuda)
  while read -r what exe; do
    [ "$what" = test:gpu ] && cp "$exe" "$out/transfer-gpu-tests"
  done < <(executables test --release -p kvtransfer --features cuda --test gpu)
  while read -r what exe; do
    [ "$what" = bench:gpu ] && cp "$exe" "$out/gpu-bench"
  done < <(executables bench --bench gpu)
  while read -r what exe; do
    [ "$what" = bench:gpu2 ] && cp "$exe" "$out/gpu2-bench"
  done < <(executables bench -p kvtransfer --features cuda --bench gpu2)
  for f in unit gpu-tests transfer-gpu-tests gpu-bench gpu2-bench; do
    [ -x "$out/$f" ] || { echo "build did not produce $f" >&2; exit 1; }
    # Without debug symbols the pack is a few MiB instead of tens.
    if command -v strip >/dev/null; then strip "$out/$f"; fi
  done
  # The Python package (kvmesh.BlockStore with GPU caches, as the vLLM connector uses it).
  local maturin
  maturin=$(command -v maturin || echo .cache/vllm-venv/bin/maturin)
  [ -x "$maturin" ] || { echo "maturin is needed to build the kvmesh wheel (pip install maturin)" >&2; exit 1; }
  rm -rf "$out/wheels"
  "$maturin" build --release --strip --quiet -m python/Cargo.toml -o "$out/wheels"
}

case $mode in
  pack) build "$dir"; echo "packed into $dir: $(ls "$dir" | tr '\n' ' ')"; exit 0 ;;
  build) dir=target/gpu-run/bin; build "$dir" ;;
  from) ;;
esac

logs=target/gpu-run
mkdir -p "$logs" target/bench
export KVMESH_REQUIRE_GPU=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv | tee "$logs/nvidia-smi.txt"
fi

status=0
echo "== unit tests"
"$dir/unit" 2>&1 | tee "$logs/unit.log" || status=1
echo "== GPU tests"
"$dir/gpu-tests" 2>&1 | tee "$logs/gpu-tests.log" || status=1
echo "== kvtransfer: GPU memory through host staging, and GPU to GPU over CUDA IPC"
"$dir/transfer-gpu-tests" --nocapture 2>&1 | tee "$logs/transfer-gpu-tests.log" || status=1
echo "== Python: kvmesh.BlockStore with GPU caches (python/tests/test_gpu_store.py)"
site=$(mktemp -d)
if python3 -m pip install -q --no-deps --no-index --target "$site" "$dir"/wheels/kvmesh-*.whl; then
  PYTHONPATH="$site" python3 -m pytest -q -rs -s python/tests/test_gpu_store.py 2>&1 |
    tee "$logs/python-gpu.log" || status=1
else
  echo "installing the kvmesh wheel from $dir/wheels failed" | tee "$logs/python-gpu.log"
  status=1
fi
rm -rf "$site"
echo "== benches/run gpu ${bench_args[*]:-}"
KVMESH_BENCH_COMMAND="benches/run gpu${bench_args[*]:+ ${bench_args[*]}}" \
  "$dir/gpu-bench" "${bench_args[@]}" 2>&1 | tee "$logs/bench.log" || status=1
[ -f target/bench/gpu.json ] && cp target/bench/gpu.json "$logs/gpu.json"
echo "== benches/run gpu2 ${bench_args[*]:-} (GPU to GPU between two processes; one GPU: on GPU 0)"
KVMESH_BENCH_COMMAND="benches/run gpu2${bench_args[*]:+ ${bench_args[*]}}" \
  "$dir/gpu2-bench" "${bench_args[@]}" 2>&1 | tee "$logs/bench2.log" || status=1
[ -f target/bench/gpu2.json ] && cp target/bench/gpu2.json "$logs/gpu2.json"
if [ $status -ne 0 ]; then
  echo "GPU suite FAILED (logs in $logs)"
else
  echo "GPU suite passed (logs in $logs)"
fi
exit $status
