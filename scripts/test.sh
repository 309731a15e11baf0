#!/usr/bin/env bash
# The whole test suite: code quality (ruff format, ruff check, mypy), unit tests, the fake-server
# tests, the end-to-end tests against a real vLLM server (CPU build, tiny model), the SLURM tests (a
# one-node cluster they start, where SLURM is installed: .ci/run installs it) and the notebook.
# Installs what it needs first (but SLURM).
#   bash scripts/test.sh                   everything
#   bash scripts/test.sh -m "not slow"     the fast tier: no real server, no SLURM, no notebook
#   bash scripts/test.sh -m integration    only the tests against a real vLLM server
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "[test] ruff format --check, ruff check, mypy"
.venv/bin/python -m ruff format --check vllm_generator tests benchmarks scripts
.venv/bin/python -m ruff check vllm_generator tests benchmarks scripts
.venv/bin/python -m mypy vllm_generator
exec .venv/bin/python -m pytest "$@"
