"""The dataset card (README.md) pushed with every Hub upload: what generated the data, how it
went, and the ``configs:`` block that makes the Hub's viewer show each split."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .recipe import Recipe
from .wire import redact_text

__all__ = ["redact", "render_card", "splits_in_repo"]

# names of settings whose values are secrets (an HF_TOKEN in serve.env, --api-key in serve.args)
# (whole words of the name: "max_tokens" is not a secret, "HF_TOKEN" and "--api-key" are)
_SECRET = re.compile(
    r"(?:^|[_.-])(?:token|api[_-]?key|key|secret|password|passwd|auth|authorization|credentials?)(?:$|[_.-])", re.IGNORECASE
)
_KEEP = {"api_key_env"}  # the name of a variable, not its value
_REDACTED = "<redacted>"
_DATA_FILE = re.compile(r"^data/(?P<split>.+)-\d{5}-of-\d{5}\.parquet$")


def redact(value: Any, key: str = "") -> Any:
    """A recipe (as plain data) with secrets replaced: values of secret-looking keys, the value
    after a secret-looking flag in an argument list, and passwords in URLs."""
    if isinstance(value, Mapping):
        return {
            k: _REDACTED if _SECRET.search(str(k)) and k not in _KEEP and v is not None else redact(v, str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        out: list[Any] = []
        for i, item in enumerate(value):
            flag = value[i - 1] if i else None
            secret_flag = isinstance(flag, str) and flag.startswith("-") and _is_secret(flag.lstrip("-"))
            out.append(_REDACTED if secret_flag else redact(item, key))
        return out
    if isinstance(value, str):
        name, eq, _ = value.partition("=")
        if eq and name.startswith("-") and _is_secret(name.lstrip("-")):  # --api-key=sk-...
            return f"{name}={_REDACTED}"
        return redact_text(value)  # a password in a URL, anywhere in the text
    return value


def _is_secret(name: str) -> bool:
    return name not in _KEEP and _SECRET.search(name) is not None


def splits_in_repo(files: Sequence[str]) -> list[str]:
    """The Hub splits whose data files (``data/<split>-00000-of-00001.parquet``) the repo holds."""
    found = {m.group("split") for f in files if (m := _DATA_FILE.match(f))}
    return sorted(found)


def _configs(splits: Sequence[str]) -> list[dict[str, Any]]:
    from .storage import hub_pattern

    def path(split: str) -> str:
        # the Hub's own pattern, unless another split's name starts with this one's ("train-v2")
        clash = any(other != split and other.startswith(f"{split}-") for other in splits)
        return hub_pattern(split) if clash else f"data/{split}-*"

    return [{"config_name": "default", "data_files": [{"split": s, "path": path(s)} for s in splits]}]


def render_card(repo_id: str, hub_split: str, files: Sequence[str], facts: Mapping[str, Any], recipe: Recipe | None) -> str:
    """The README.md of a dataset repo that holds ``files`` after this push.

    ``facts``: rows, succeeded, failed, failed_by_type, prompt_tokens, completion_tokens,
    rows_per_s, tokens_per_s, version, served_model, split_id, num_splits (a ``RunSummary``'s
    fields, or a merge's totals); ``recipe`` None for a merge of split files.
    """
    splits = sorted({*splits_in_repo(files), hub_split})
    header = yaml.safe_dump({"configs": _configs(splits), "tags": ["vllm-generator", "synthetic"]}, sort_keys=False)
    lines = [
        f"---\n{header}---",
        f"# {repo_id}",
        "",
        f"Generated with [vllm-generator](https://pypi.org/project/vllm-generator/) {facts.get('version', '')}.",
    ]
    lines += ["", "## What generated it", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in _generated_by(recipe, facts)]
    where = f"split {facts['split_id']} of {facts['num_splits']} of " if facts.get("num_splits", 1) > 1 else ""
    lines += ["", f"## This push: {where}`{hub_split}`", "", "| | |", "|---|---|"]
    for name, key in (("rows", "rows"), ("succeeded", "succeeded"), ("failed", "failed")):
        lines.append(f"| {name} | {facts.get(key, 0):,} |")
    failed_by_type = facts.get("failed_by_type") or {}
    lines.append(f"| failed by type | {', '.join(f'{k}: {v:,}' for k, v in sorted(failed_by_type.items())) or 'none'} |")
    lines.append(f"| tokens | {facts.get('prompt_tokens', 0):,} prompt, {facts.get('completion_tokens', 0):,} completion |")
    if "rows_per_s" in facts:
        lines.append(f"| throughput | {facts['rows_per_s']:,.1f} rows/s, {facts.get('tokens_per_s', 0):,.1f} completion tokens/s |")
    lines.append(f"| library version | vllm-generator {facts.get('version', '')} |")
    if recipe is not None:
        dumped = yaml.safe_dump(redact(recipe.model_dump(mode="json", exclude_defaults=True)), sort_keys=False)
        lines += ["", "## Recipe (secrets removed)", "", "```yaml", dumped.rstrip(), "```"]
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo_id}", split="{hub_split}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _generated_by(recipe: Recipe | None, facts: Mapping[str, Any]) -> list[tuple[str, Any]]:
    if recipe is None:
        return [("served model name", facts.get("served_model") or "not recorded (merged from split files)")]
    model = recipe.model.serve.model if recipe.model.serve else recipe.model.model
    generation = recipe.generation.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data = recipe.data
    source = (
        f"messages column `{data.messages_column}`"
        if data.messages_column
        else f"template `{data.template}`"
        if data.template
        else f"text column `{data.column}`"
    )
    rows: list[tuple[str, Any]] = [
        ("model", model or facts.get("served_model") or "the server's only model"),
        ("served model name", facts.get("served_model") or recipe.model.model),
        ("generation parameters", json.dumps(redact(generation), sort_keys=True) if generation else "the server's defaults"),
        ("prompt source", source + (f", system prompt `{data.system_prompt}`" if data.system_prompt else "")),
    ]
    if data.image_columns():
        rows.append(("images", ", ".join(f"`{c}`" for c in data.image_columns())))
    rows.append(("input", data.input.path or data.input.hub_id))
    return rows


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
