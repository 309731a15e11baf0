"""Image inputs: a row's image values as OpenAI content parts, after the text of its user message.

A value may be a PIL image (what a ``datasets.Image`` column decodes to), ``{"bytes", "path"}``
(the same column undecoded), raw bytes, a local file path, an ``http(s)://`` URL or a ``data:``
URL; a list of them for several images per row. Local images are sent inline as base64
``data:`` URLs; URLs go as they are, for the server to fetch. Nothing here raises for a bad
value: the row gets the error and is not sent, so one unreadable file never stops a map.
"""

from __future__ import annotations

import base64
import io
import mimetypes
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["IMAGE_ERROR", "ImageValueError", "attach_images", "clean_content_parts", "image_url", "undecoded"]

IMAGE_ERROR = "image"  # the error_type of a row whose image cannot be read
_REMOTE = ("http://", "https://", "data:")
# magic numbers of the formats vision models' processors read
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class ImageValueError(ValueError):
    """An image value that cannot be sent (the message says which and why)."""


def _mime(data: bytes, path: str | None) -> str:
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(path)[0] if path else None
    if guessed and guessed.startswith("image/"):
        return guessed
    raise ImageValueError(f"{_describe(path, data)} is not a PNG, JPEG, GIF, WebP or BMP image")


def _describe(path: str | None, data: bytes | None = None) -> str:
    return f"file {path}" if path else f"{len(data or b'')} bytes"


def _data_url(data: bytes, path: str | None) -> str:
    return f"data:{_mime(data, path)};base64,{base64.b64encode(data).decode()}"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ImageValueError(f"cannot read image file {path} ({err.strerror or err})") from None


def image_url(value: Any) -> str:
    """The URL of one image value: a ``data:`` URL for local images, the URL itself for URLs.

    Raises:
        ImageValueError: the value is null, of another type, or not a readable image.
    """
    if value is None:
        raise ImageValueError("the image is null")
    if isinstance(value, str):
        return value if value.startswith(_REMOTE) else _data_url(_read(value), value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _data_url(bytes(value), None)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # datasets.Image(decode=False)
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _data_url(bytes(data), path)
        if path:
            return image_url(str(path))
        raise ImageValueError("the image has neither bytes nor a path")
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image: decoded pixels, sent as PNG (lossless)
        buffer = io.BytesIO()
        try:
            value.save(buffer, format="PNG")
        except (OSError, ValueError) as err:
            raise ImageValueError(f"cannot encode the {type(value).__name__} as PNG ({err})") from None
        return _data_url(buffer.getvalue(), None)
    raise ImageValueError(f"an image is a PIL image, {{bytes, path}}, bytes, a file path or a URL, not {type(value).__name__}")


def _parts(value: Any) -> list[dict[str, Any]]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [{"type": "image_url", "image_url": {"url": image_url(v)}} for v in values]


def attach_images(bodies: list[Any], batch: Mapping[str, Sequence[Any]], columns: Sequence[str]) -> dict[int, str]:
    """Add each row's images, as content parts after its text, to the user message of its body
    (chat bodies from text; None rows are skipped). Returns the errors of the rows whose image
    cannot be read, by row: those rows must not be sent."""
    errors: dict[int, str] = {}
    values = [batch[c] for c in columns]
    for i, body in enumerate(bodies):
        if not isinstance(body, dict):
            continue
        parts: list[dict[str, Any]] = []
        try:
            for column, column_values in zip(columns, values):
                try:
                    parts += _parts(column_values[i])
                except ImageValueError as err:
                    raise ImageValueError(f"image column {column!r}: {err}") from None
        except ImageValueError as err:
            errors[i] = f"not sent: {err}"
            continue
        user = body["messages"][-1]
        body["messages"][-1] = {**user, "content": [{"type": "text", "text": user["content"]}, *parts]}
    return errors


def clean_content_parts(message: Any) -> Any:
    """A chat message whose content parts lose the null fields that Arrow adds (a list of structs
    gives every part every field: a text part gets ``"image_url": null``); anything else as is."""
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        return message
    return {**message, "content": [_without_nulls(p) if isinstance(p, Mapping) else p for p in content]}


def _without_nulls(part: Mapping[str, Any]) -> dict[str, Any]:
    # one level down too: {"image_url": {"url": ..., "detail": null}}
    return {k: _without_nulls(v) if isinstance(v, Mapping) else v for k, v in part.items() if v is not None}


def undecoded(ds: Dataset, columns: Sequence[str]) -> Dataset:
    """``ds`` with its ``datasets.Image`` columns among ``columns`` read as ``{bytes, path}``: the
    file's own bytes are sent (no decode and PNG re-encode), and a corrupt file is its row's error
    here instead of an exception inside ``datasets``' decoding that would stop the map."""
    from datasets import Image

    for column in columns:
        feature = ds.features.get(column)
        if isinstance(feature, Image) and feature.decode:
            ds = ds.cast_column(column, Image(decode=False))  # only the features change: no rewrite
    return ds
