"""Structured outputs: a JSON schema as the request's constraint, the Arrow type of its column,
and each answer parsed and checked against it.

``load_schema`` takes what users write (a pydantic model class, a JSON schema dict, a path to a
``.json`` file, ``module:Class``) and gives the JSON schema; ``compile_schema`` turns it into a
``Shape``, the part of JSON Schema that maps onto Arrow types (strings, integers, numbers,
booleans, enums, arrays, objects, nullable values; ``$ref`` into ``$defs`` as pydantic writes
nested models). ``Structured`` is built once per transform: it adds the ``response_format`` field
to the requests and fills ``Result.parsed``, or makes the row a ``parse`` error.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pyarrow as pa

    from .wire import Result

__all__ = ["PARSE_ERROR", "Shape", "Structured", "SchemaError", "compile_schema", "conform", "load_schema", "parse_answer", "request_field"]

PARSE_ERROR = "parse"  # the error_type of an answer that does not fit the schema
_JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object")
Kind = Literal["string", "integer", "number", "boolean", "array", "object"]


class SchemaError(ValueError):
    """A schema this package cannot turn into a column type (pydantic shows it under the field)."""


class _AnswerError(ValueError):
    """An answer that is not JSON or does not fit the schema."""


# --------------------------------------------------------------------------- what users give


def load_schema(value: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic model class, a schema dict, a ``.json`` file or ``module:Class``.

    Raises:
        SchemaError: the value is none of those, or cannot be read.
    """
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        schema: dict[str, Any] = value.model_json_schema()
        return schema
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise SchemaError(f"give a pydantic model class, a JSON schema dict, a .json file or module:Class, not {type(value).__name__}")
    if value.endswith(".json"):
        try:
            loaded = json.loads(Path(value).read_text())
        except OSError as err:
            raise SchemaError(f"cannot read the schema file {value} ({err.strerror or err})") from err
        except ValueError as err:
            raise SchemaError(f"the schema file {value} is not valid JSON: {err}") from err
        if not isinstance(loaded, dict):
            raise SchemaError(f"the schema file {value} holds a {type(loaded).__name__}, not a JSON schema object")
        return loaded
    module, _, name = value.partition(":")
    if not module or not name:
        raise SchemaError(f"{value!r} is neither a .json file nor module:Class (e.g. myproject.schemas:Answer)")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SchemaError(f"cannot import {value} ({type(err).__name__}: {err}): is the module on PYTHONPATH?") from err
    if not (isinstance(target, type) and hasattr(target, "model_json_schema")):
        raise SchemaError(f"{value} is a {type(target).__name__}, not a pydantic model class")
    return load_schema(target)


def request_field(schema: dict[str, Any]) -> dict[str, Any]:
    """The standard OpenAI ``response_format`` that makes vLLM constrain the answer to ``schema``."""
    name = str(schema.get("title") or "output")
    # the API allows letters, digits, "_" and "-" in the name, 64 at most
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64]
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}}


# --------------------------------------------------------------------------- schema -> shape


@dataclass(frozen=True)
class Shape:
    """One node of a schema: its JSON type, whether null is allowed, enum values, and children."""

    kind: Kind
    nullable: bool = False
    enum: tuple[Any, ...] | None = None
    items: Shape | None = None  # arrays
    fields: tuple[tuple[str, Shape, bool], ...] = ()  # objects: (name, shape, required)
    closed: bool = False  # objects with additionalProperties: false

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa  # here: importing the package stays light

        if self.kind == "string":
            return pa.string()
        if self.kind == "integer":
            return pa.int64()
        if self.kind == "number":
            return pa.float64()
        if self.kind == "boolean":
            return pa.bool_()
        if self.kind == "array":
            assert self.items is not None
            return pa.list_(self.items.arrow_type())
        return pa.struct([pa.field(name, shape.arrow_type()) for name, shape, _ in self.fields])


def compile_schema(schema: Mapping[str, Any]) -> Shape:
    """The ``Shape`` of a JSON schema.

    Raises:
        SchemaError: naming the place in the schema (``$.items.tags``) that has no column type.
    """
    return _compile(schema, schema, "$", ())


def _compile(node: Any, root: Mapping[str, Any], where: str, seen: tuple[str, ...]) -> Shape:
    if not isinstance(node, Mapping):
        raise SchemaError(f"{where}: a schema node must be an object, got {node!r}")
    if "$ref" in node:
        ref = node["$ref"]
        if ref in seen:
            raise SchemaError(f"{where}: {ref} refers to itself: recursive schemas have no fixed column type")
        return _with_null(_compile(_resolve(ref, root, where), root, where, (*seen, ref)), _allows_null_beside(node))
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if not (isinstance(o, Mapping) and o.get("type") == "null")]
            if len(options) != 1:
                raise SchemaError(f"{where}: {key} of several types has no single column type: use one type (or one type or null)")
            return _with_null(_compile(options[0], root, where, seen), len(options) < len(node[key]))
    if "allOf" in node and len(node["allOf"]) == 1:  # pydantic wraps a $ref with a default this way
        return _compile(node["allOf"][0], root, where, seen)
    if "enum" in node or "const" in node:
        values = tuple(node["enum"]) if "enum" in node else (node["const"],)
        return _enum(values, node, where)
    kind, nullable = _kind(node, where)
    if kind == "array":
        if not isinstance(node.get("items"), Mapping):
            raise SchemaError(f"{where}: an array needs one items schema")
        return Shape("array", nullable, items=_compile(node["items"], root, f"{where}[]", seen))
    if kind == "object":
        properties = node.get("properties") or {}
        if not properties:
            raise SchemaError(f"{where}: an object needs properties (a free-form object has no fixed column type)")
        required = set(node.get("required") or [])
        fields = tuple((name, _compile(sub, root, f"{where}.{name}", seen), name in required) for name, sub in properties.items())
        return Shape("object", nullable, fields=fields, closed=node.get("additionalProperties") is False)
    return Shape(kind, nullable)


def _resolve(ref: Any, root: Mapping[str, Any], where: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise SchemaError(f"{where}: only local references (#/$defs/Name) are supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise SchemaError(f"{where}: {ref} points to nothing in the schema")
        node = node[part]
    return node


def _kind(node: Mapping[str, Any], where: str) -> tuple[Kind, bool]:
    declared = node.get("type")
    types = declared if isinstance(declared, list) else [declared]
    nullable = "null" in types
    others = [t for t in types if t != "null"]
    if len(others) != 1 or others[0] not in _JSON_TYPES:
        raise SchemaError(f"{where}: type {declared!r} has no single column type: give one of {', '.join(_JSON_TYPES)}")
    kind: Kind = others[0]
    return kind, nullable


def _enum(values: tuple[Any, ...], node: Mapping[str, Any], where: str) -> Shape:
    nullable = None in values or _allows_null_beside(node)
    present = [v for v in values if v is not None]
    kinds = {_value_kind(v) for v in present}
    if len(kinds) != 1:
        raise SchemaError(f"{where}: enum values {list(values)} mix types: one column holds one type")
    (kind,) = kinds
    if kind in ("array", "object"):
        raise SchemaError(f"{where}: enum values must be strings, numbers or booleans")
    return Shape(kind, nullable, enum=tuple(present))


def _value_kind(value: Any) -> Kind:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _with_null(shape: Shape, nullable: bool) -> Shape:
    return shape if not nullable or shape.nullable else Shape(shape.kind, True, shape.enum, shape.items, shape.fields, shape.closed)


def _allows_null_beside(node: Mapping[str, Any]) -> bool:
    return isinstance(node.get("type"), list) and "null" in node["type"]


# --------------------------------------------------------------------------- answer -> value


def conform(value: Any, shape: Shape, where: str = "$") -> Any:
    """``value`` (parsed JSON) as the column holds it: checked against ``shape``, optional object
    fields that are absent filled with None, fields the schema does not name left out.

    Raises:
        _AnswerError: naming the place (``$.tags[2]``) and what was expected.
    """
    if value is None:
        if shape.nullable:
            return None
        raise _AnswerError(f"{where} is null, but the schema requires a {shape.kind}")
    kind = shape.kind
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema: 1.0 is an integer
    if not _is_kind(value, kind):
        raise _AnswerError(f"{where} should be a {kind}, got {json.dumps(value)[:80]}")
    if shape.enum is not None and value not in shape.enum:
        raise _AnswerError(f"{where} is {json.dumps(value)[:80]}, not one of {list(shape.enum)}")
    if kind == "integer" and not -(2**63) <= value < 2**63:
        raise _AnswerError(f"{where} is {value}, beyond a 64-bit integer column")
    if kind == "number":
        return float(value)
    if kind == "array":
        assert shape.items is not None
        return [conform(item, shape.items, f"{where}[{i}]") for i, item in enumerate(value)]
    if kind == "object":
        return _conform_object(value, shape, where)
    return value


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    # a number: a finite float, or an int a float can hold (a 400-digit one overflows)
    return (isinstance(value, float) and math.isfinite(value)) or (isinstance(value, int) and abs(value) < 2**1023)


def _conform_object(value: dict[str, Any], shape: Shape, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sub, required in shape.fields:
        if name in value:
            out[name] = conform(value[name], sub, f"{where}.{name}")
        elif required:
            raise _AnswerError(f"{where}.{name} is missing (required by the schema)")
        else:
            out[name] = None
    if shape.closed:
        extra = sorted(set(value) - set(out))
        if extra:
            raise _AnswerError(f"{where} has fields the schema does not allow: {', '.join(extra)}")
    return out


def parse_answer(text: str | None, shape: Shape) -> Any:
    """The value of one answer; raises ``_AnswerError`` when it is not JSON or does not fit."""
    try:
        value = json.loads(text or "")
    except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than Python parses
        raise _AnswerError(f"the answer is not valid JSON ({err})") from None
    return conform(value, shape)


@dataclass(frozen=True)
class Structured:
    """A transform's output schema: what its requests add and how its answers are read."""

    schema: dict[str, Any]
    shape: Shape

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> Structured:
        return cls(schema, compile_schema(schema))

    def arrow_type(self, n: int) -> pa.DataType:
        """The ``parsed`` column's type: the schema's, or a list of n of them when n > 1."""
        import pyarrow as pa

        item = self.shape.arrow_type()
        return pa.list_(item) if n > 1 else item

    def apply(self, result: Result) -> Result:
        """Fill ``result.parsed`` from its answer(s); an answer that does not fit makes the row a
        ``parse`` error that keeps the raw text in ``response``. The reasoning is never parsed."""
        if result.error is not None:
            return result
        answers = result.response if isinstance(result.response, list) else [result.response]
        reasons = result.finish_reason if isinstance(result.finish_reason, list) else [result.finish_reason]
        values: list[Any] = []
        problems: list[str] = []
        for i, (text, reason) in enumerate(zip(answers, reasons)):
            try:
                values.append(parse_answer(text, self.shape))
            except _AnswerError as err:
                values.append(None)
                cut = " (finish_reason length: max_tokens cut the answer; raise max_tokens)" if reason == "length" else ""
                problems.append(f"{f'choice {i}: ' if len(answers) > 1 else ''}{err}{cut}")
        result.parsed = values if isinstance(result.response, list) else values[0]
        if problems:
            result.error = f"parse: {'; '.join(problems)}"
            result.error_type = PARSE_ERROR
        return result
