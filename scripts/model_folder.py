"""What the model build scripts share: a model folder is written whole or not at all."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

META_FILE = "vllm_generator_meta.json"  # written last: marks a complete build


def read_meta(folder: Path, expected_files: tuple[str, ...]) -> dict[str, Any] | None:
    """The build's metadata if ``folder`` holds a complete build, else None."""
    if not all((folder / name).is_file() for name in expected_files):
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def save(output: Path, model: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    """Save ``model`` and ``tokenizer`` with ``meta`` into ``output``: built next to it and renamed
    into place, so an interrupted build never leaves a folder that looks complete."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes a private folder; give the result ordinary permissions
        for path in tmp.iterdir():
            path.chmod(0o644)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
