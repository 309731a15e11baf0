"""SLURM: what a job array tells a task about its split.

The split runner (``run.run_split``) takes a split index and count and knows nothing of SLURM;
the command asks this module which split a task of an array is.
"""

from __future__ import annotations

import os

from .errors import RecipeError
from .recipe import ProcessingConfig

__all__ = ["resolve_split"]


def resolve_split(processing: ProcessingConfig) -> tuple[int, int]:
    """``(num_splits, split_id)``: the recipe's, or where it leaves them unset, the SLURM array's
    (``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN``), else one split.

    Raises:
        RecipeError: the split is out of range, or a SLURM variable is not a number.
    """
    num_splits, split_id = processing.num_splits, processing.split_id
    from_slurm = []
    if num_splits is None and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        num_splits = _env_int("SLURM_ARRAY_TASK_COUNT")
        from_slurm.append("num_splits from SLURM_ARRAY_TASK_COUNT")
    if split_id is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        split_id = _env_int("SLURM_ARRAY_TASK_ID") - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        from_slurm.append("split_id from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN")
    num_splits, split_id = num_splits or 1, split_id or 0
    if not 0 <= split_id < num_splits:
        source = f"; {' and '.join(from_slurm)}" if from_slurm else ""
        raise RecipeError(f"processing.split_id {split_id} is out of range for num_splits {num_splits} (use 0 to {num_splits - 1}){source}")
    return num_splits, split_id


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value or "")
    except ValueError:
        raise RecipeError(f"${name} is {value!r}, not a whole number: set processing.split_id and num_splits instead") from None
