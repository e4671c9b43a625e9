#!/usr/bin/env bash
# Long crash-safety run of kvstore's disk tier: ITERS (default 2000) rounds of a child process
# writing blocks from several threads, killed with SIGKILL at a random moment, then every
# recovered block read back and verified. The same test runs 100 rounds in `cargo test`.
#   kvstore/scripts/crash-long.sh [ITERS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export KVSTORE_CRASH_ITERS=${1:-2000}
exec cargo test --release -p kvstore --test crash -- --nocapture
