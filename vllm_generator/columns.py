"""The columns a transform adds, from its rows' results, with types that never depend on the batch.

``datasets`` fixes a column's Arrow type from the first batch it writes: a first batch whose
errors are all None would make ``error`` a null column that a later failure cannot be written
to. So every new column has a fixed type: as numpy arrays (``StringDType`` keeps None as a null
string) for a plain ``map``, or as an Arrow table for the recipe runner's ``map``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .recipe import OutputColumns
from .wire import Result

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["NewColumns"]

# numpy's variable-width string dtype keeps None as a null of type string (numpy >= 2)
_TEXT = np.dtypes.StringDType(na_object=None)
# "texts": a text per row, or with n > 1 a list of n; "text": a text per row; "count": an int
Kind = Literal["texts", "text", "count"]


@dataclass(frozen=True)
class NewColumns:
    """The names, kinds and values of the new columns of one transform."""

    names: OutputColumns
    n: int
    logprobs: bool  # the request asks for logprobs: a ``logprobs`` column is added

    def values(self, results: list[Result]) -> list[tuple[str, Kind, list[Any]]]:
        """(name, kind, values) of each new column. A failed row gets nulls (n of them in a
        "texts" column with n > 1) and 0 tokens (nothing was generated)."""
        cols, n = self.names, self.n

        def per_row(values: list[Any]) -> list[Any]:
            return [v if v is not None else [None] * n for v in values] if n > 1 else values

        out: list[tuple[str, Kind, list[Any]]] = [
            (cols.response, "texts", per_row([r.response for r in results])),
            (cols.reasoning, "texts", per_row([r.reasoning for r in results])),
            (cols.finish_reason, "texts", per_row([r.finish_reason for r in results])),
            (cols.prompt_tokens, "count", [r.prompt_tokens or 0 for r in results]),
            (cols.completion_tokens, "count", [r.completion_tokens or 0 for r in results]),
            (cols.error, "text", [r.error for r in results]),
        ]
        if self.logprobs:
            out.append((cols.logprobs, "text", [r.logprobs for r in results]))
        return out

    @property
    def column_names(self) -> list[str]:
        """The columns added, in order."""
        return [name for name, _, _ in self.values([])]

    def numpy(self, results: list[Result]) -> dict[str, np.ndarray]:
        """Typed numpy arrays, for a ``map`` function's return value."""
        return {name: _numpy_column(kind, values, self.n) for name, kind, values in self.values(results)}

    def arrow(self, results: list[Result]) -> pa.Table:
        """An Arrow table with the same types as ``numpy``."""
        import pyarrow as pa  # here: importing the package stays light

        types = {"texts": pa.list_(pa.string()) if self.n > 1 else pa.string(), "text": pa.string(), "count": pa.int64()}

        def array(kind: Kind, values: list[Any]) -> pa.Array:
            try:
                return pa.array(values, type=types[kind])
            except (pa.ArrowTypeError, pa.ArrowInvalid):  # a server that sent a non-text field: as numpy() does
                return pa.array(_numpy_column(kind, values, self.n).tolist(), type=types[kind])

        return pa.table({name: array(kind, values) for name, kind, values in self.values(results)})


def _numpy_column(kind: Kind, values: list[Any], n: int) -> np.ndarray:
    if kind == "count":
        return np.array(values, dtype=np.int64)
    text = np.array(values, dtype=_TEXT)
    return text.reshape(len(values), n) if kind == "texts" and n > 1 else text
