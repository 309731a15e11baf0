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
from .structured import Structured
from .wire import Result

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["NewColumns"]

# numpy's variable-width string dtype keeps None as a null of type string (numpy >= 2)
_TEXT = np.dtypes.StringDType(na_object=None)
# "texts": a text per row, or with n > 1 a list of n; "text": a text per row; "count": an int;
# "parsed": a value of the output schema per row (a list of n with n > 1)
Kind = Literal["texts", "text", "count", "parsed"]


@dataclass(frozen=True)
class NewColumns:
    """The names, kinds and values of the new columns of one transform."""

    names: OutputColumns
    n: int
    logprobs: bool  # the request asks for logprobs: a ``logprobs`` column is added
    structured: Structured | None = None  # an output schema: a ``parsed`` column of its type is added

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
        if self.structured is not None:
            out.append((cols.parsed, "parsed", per_row([r.parsed for r in results])))
        return out

    @property
    def column_names(self) -> list[str]:
        """The columns added, in order."""
        return [name for name, _, _ in self.values([])]

    def numpy(self, results: list[Result]) -> dict[str, Any]:
        """Typed numpy arrays, for a ``map`` function's return value (the ``parsed`` column: a
        list that gives Arrow its type, since numpy has no type for nested values)."""
        return {
            name: _TypedList(values, self._parsed_type()) if kind == "parsed" else _numpy_column(kind, values, self.n)
            for name, kind, values in self.values(results)
        }

    def _parsed_type(self) -> pa.DataType:
        assert self.structured is not None
        return self.structured.arrow_type(self.n)

    def arrow(self, results: list[Result]) -> pa.Table:
        """An Arrow table with the same types as ``numpy``."""
        import pyarrow as pa  # here: importing the package stays light

        types = {"texts": pa.list_(pa.string()) if self.n > 1 else pa.string(), "text": pa.string(), "count": pa.int64()}
        if self.structured is not None:
            types["parsed"] = self._parsed_type()

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


class _TypedList(list[Any]):
    """A map function's column of nested values with a fixed Arrow type.

    ``datasets`` takes a list from a batched map and builds its Arrow array with ``pa.array``,
    which asks the list for ``__arrow_array__``: the column gets the schema's type even when the
    first batch is all null, instead of a type inferred from that batch's values.
    """

    def __init__(self, values: list[Any], arrow_type: pa.DataType) -> None:
        super().__init__(values)
        self.arrow_type = arrow_type

    def __arrow_array__(self, type: pa.DataType | None = None) -> pa.Array:
        import pyarrow as pa

        return pa.array(list(self), type=self.arrow_type)
