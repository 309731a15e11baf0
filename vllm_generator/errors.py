"""Exceptions raised by vllm-generator.

    VllmGeneratorError
    ├── RecipeError (ValueError)               bad recipe, argument, input data or API key
    ├── ServerUnavailableError (ConnectionError)  no server could be reached
    ├── ModelSelectionError (LookupError)       the model to use cannot be decided from /v1/models
    ├── GenerationError (RuntimeError)          a row failed and ``on_error="raise"`` was asked for
    ├── ServerStartError (RuntimeError)         a managed vLLM server did not come up
    ├── MergeError (ValueError)                 split outputs are missing or incomplete
    └── HubError (ConnectionError)              the Hub refused an upload (the local file is kept)

Every message says what happened, where (file, field, row, URL) and what to do next.
"""

from __future__ import annotations

__all__ = [
    "VllmGeneratorError",
    "RecipeError",
    "ServerUnavailableError",
    "ModelSelectionError",
    "GenerationError",
    "ServerStartError",
    "MergeError",
    "HubError",
]


class VllmGeneratorError(Exception):
    """Base class of every error this package raises on purpose."""


class RecipeError(VllmGeneratorError, ValueError):
    """The recipe, an argument or the input data is invalid (raised before any request), or a
    server refused the API key."""


class ServerUnavailableError(VllmGeneratorError, ConnectionError):
    """No server answered: all are refusing connections or out of rotation."""


class ModelSelectionError(VllmGeneratorError, LookupError):
    """No model name was given and the server does not serve exactly one."""


class GenerationError(VllmGeneratorError, RuntimeError):
    """A row failed for good and the transform was asked to raise (``on_error="raise"``)."""


class ServerStartError(VllmGeneratorError, RuntimeError):
    """A vLLM server that vllm-generator started itself exited or never became ready."""


class MergeError(VllmGeneratorError, ValueError):
    """The outputs of a split run cannot be merged: a split is missing or incomplete."""


class HubError(VllmGeneratorError, ConnectionError):
    """Pushing to the Hugging Face Hub failed; the Parquet file it was pushing is kept."""
