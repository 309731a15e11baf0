#!/usr/bin/env bash
# The whole test suite: unit tests, the fake-server tests, the end-to-end tests against a real
# vLLM server (CPU build, tiny model) and the notebook. Installs what it needs first.
#   bash scripts/test.sh                 everything
#   bash scripts/test.sh -m "not vllm"   without the real server and the notebook
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
