#!/usr/bin/env bash
# Installs Dynamo's standalone KV indexer (`python -m dynamo.indexer`, PyPI wheel
# ai-dynamo-runtime) into .cache/dynamo-venv for `benches/run daemon`. Idempotent: does nothing
# when the right version is already there. Prints the venv's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.6.1
venv=.cache/dynamo-venv
py=$venv/bin/python
installed() {
  [ -x "$py" ] && "$py" - "$version" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("ai-dynamo-runtime") == sys.argv[1] else 1)
PY
}
if ! installed; then
  python=${PYTHON:-python3}
  if ! command -v "$python" >/dev/null; then
    echo "dynamo-setup: no $python to create the venv with" >&2
    exit 1
  fi
  echo "dynamo-setup: installing ai-dynamo-runtime==$version into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
  "$py" -m pip install --quiet --cache-dir .cache/pip "ai-dynamo-runtime==$version" >&2
  if ! installed; then
    echo "dynamo-setup: ai-dynamo-runtime $version did not install" >&2
    exit 1
  fi
fi
# The indexer's entry point must be there and answer --help.
if ! timeout 60 "$py" -m dynamo.indexer --help >/dev/null 2>&1; then
  echo "dynamo-setup: python -m dynamo.indexer --help fails in $venv" >&2
  exit 1
fi
echo "$PWD/$py"
