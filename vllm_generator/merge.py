"""Joining the outputs of a recipe's splits into one file (and optionally one Hub split)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import MergeError
from .storage import (
    hub_path,
    hub_pattern,
    metrics_path,
    push_to_hub,
    read_output_metadata,
    split_bounds,
    split_output_path,
    split_outputs,
    without_our_metadata,
    write_batches,
    write_json,
)

__all__ = ["merge_outputs"]


def merge_outputs(
    path: str, *, hub_repo_id: str | None = None, hub_split: str = "train", private: bool = True, api: Any = None
) -> dict[str, Any]:
    """Join ``<path stem>.split-*-of-N.parquet`` into ``path`` (and optionally one Hub split).

    Raises:
        MergeError: a split is missing, from another recipe, or has the wrong number of rows.
    """
    files = _split_files(path)
    metas = [read_output_metadata(f) for f in files]
    input_rows = _check_rows(path, files, metas)
    schema = pq.read_schema(files[0])
    for i, f in enumerate(files[1:], 1):
        if not pq.read_schema(f).remove_metadata().equals(schema.remove_metadata()):
            raise MergeError(f"cannot merge {path}: split {i} ({f}) has other columns than split 0; rerun it")

    def batches() -> Iterator[pa.RecordBatch]:
        # streamed split by split: memory stays flat whatever the dataset's size
        for f in files:
            yield from pq.ParquetFile(f).iter_batches(batch_size=10_000)

    metadata = {**metas[0], "split_id": None, "num_splits": 1, "rows": input_rows, "merged_from": len(files)}
    write_batches(path, without_our_metadata(schema), batches(), metadata)
    error_column = metas[0].get("error_column", "error")
    errors = sum(
        int(pq.read_table(f, columns=[error_column]).column(0).is_valid().to_numpy(zero_copy_only=False).sum())
        for f in files
        if error_column in schema.names
    )
    metrics = [json.loads(Path(metrics_path(f)).read_text()) for f in files if os.path.exists(metrics_path(f))]
    totals = ("rows", "succeeded", "failed", "requests", "retries", "prompt_tokens", "completion_tokens", "generated_rows", "reused_rows")
    summed = {f"total_{k}": sum(m.get(k, 0) for m in metrics) for k in totals}
    summary = {"output_path": path, "rows": input_rows, "splits": len(files), "rows_with_error": errors, **summed}
    write_json(metrics_path(path), summary)
    if hub_repo_id:
        from . import __version__
        from .card import render_card

        facts = {k.removeprefix("total_"): v for k, v in summed.items()} | {"rows": input_rows, "version": __version__}
        facts["failed_by_type"] = _added([m.get("failed_by_type") or {} for m in metrics])
        push_to_hub(
            path,
            hub_repo_id,
            hub_path(hub_split, 0, 1),
            private,
            api=api,
            delete_patterns=[hub_pattern(hub_split)],
            readme=lambda files: render_card(hub_repo_id, hub_split, files, facts, None),
        )
        summary["hub_repo_id"] = hub_repo_id
    return summary


def _added(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _split_files(path: str) -> list[str]:
    """Every split's output, in split order; refused when one is missing or the counts disagree."""
    found = list(split_outputs(path))
    if not found:
        raise MergeError(f"no split outputs next to {path} (expected files like {split_output_path(path, 2, 0)})")
    counts = {n for _, n, _ in found}
    if len(counts) != 1:
        listed = "; ".join(f"{n} splits: {', '.join(f for _, c, f in found if c == n)}" for n in sorted(counts))
        raise MergeError(f"split outputs of {path} disagree on the number of splits ({listed}): remove the stale ones")
    num_splits = counts.pop()
    by_id = {i: f for i, _, f in found}
    missing = [i for i in range(num_splits) if i not in by_id]
    if missing:
        raise MergeError(
            f"cannot merge {path}: split(s) {', '.join(map(str, missing))} of {num_splits} have no output yet; "
            f"run them with --split-id I --num-splits {num_splits} (finished splits are kept)"
        )
    return [by_id[i] for i in range(num_splits)]


def _check_rows(path: str, files: list[str], metas: list[dict[str, Any]]) -> int:
    """The input's row count, once every split is checked to come from the same settings and
    input and to hold all of its rows."""
    groups: dict[str, list[str]] = {}
    for i, m in enumerate(metas):
        groups.setdefault(m["generation_fingerprint"], []).append(str(i))
    if len(groups) != 1:
        listed = " vs ".join(f"split(s) {', '.join(ids)}" for ids in groups.values())
        raise MergeError(f"cannot merge {path}: the splits were generated with different settings ({listed}); rerun the odd ones")
    sizes = [m["input_rows"] for m in metas]
    if len(set(sizes)) != 1:
        # checked first: measured against split 0, a good split would be blamed for an odd split 0
        listed = ", ".join(f"split {i}: {n}" for i, n in enumerate(sizes))
        raise MergeError(
            f"cannot merge {path}: the splits were cut from inputs of different sizes ({listed} rows); "
            "rerun the odd ones with the same data.input"
        )
    input_rows = sizes[0]
    for i, (f, m) in enumerate(zip(files, metas)):
        start, stop = split_bounds(input_rows, len(files), i)
        actual = pq.ParquetFile(f).metadata.num_rows
        if actual != stop - start or m["rows"] != actual:
            raise MergeError(f"cannot merge {path}: split {i} ({f}) is incomplete: {actual} rows, expected {stop - start}; rerun it")
    return input_rows
