"""Exceptions raised by vllm-generator.

    VllmGeneratorError
    ├── RecipeError (ValueError)                  bad recipe, argument or input data
    │   └── AuthenticationError (PermissionError)   a server refused the API key (401/403)
    ├── ServerUnavailableError (ConnectionError)  no server could be reached
    ├── ModelSelectionError (LookupError)         the model to use cannot be decided from /v1/models
    ├── GenerationError (RuntimeError)            a row failed and ``on_error="raise"`` was asked for
    │   └── RowFailedError                          the same, inside the client (row of the batch)
    ├── ServerStartError (RuntimeError)           a managed vLLM server did not come up
    ├── MergeError (ValueError)                   split outputs are missing or incomplete
    ├── StorageError (OSError)                    no space left, or a folder that cannot be written
    ├── HubError (ConnectionError)                the Hub refused an upload (the local file is kept)
    └── SlurmError (RuntimeError)                 sbatch, squeue or scontrol failed or is missing

Every message says what happened, where (file, field, row, URL) and what to do next; the errors
that callers branch on carry the same facts as attributes (``err.url``, ``err.row``, ...).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "VllmGeneratorError",
    "RecipeError",
    "AuthenticationError",
    "ServerUnavailableError",
    "ModelSelectionError",
    "GenerationError",
    "RowFailedError",
    "ServerStartError",
    "MergeError",
    "StorageError",
    "HubError",
    "SlurmError",
]


class VllmGeneratorError(Exception):
    """Base class of every error this package raises on purpose."""


class RecipeError(VllmGeneratorError, ValueError):
    """The recipe, an argument or the input data is invalid (raised before any request)."""


class AuthenticationError(RecipeError, PermissionError):
    """A server answered 401 or 403: the API key is a setting to fix, not a server to wait for.

    Attributes: ``url`` (the request's URL), ``status``. The key itself is never in the message.
    """

    def __init__(self, message: str, *, url: str, status: int) -> None:
        super().__init__(message)
        self.url = url
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:  # map workers (num_proc>1) pickle exceptions
        return (_rebuild, (type(self), str(self), {"url": self.url, "status": self.status}))


class ServerUnavailableError(VllmGeneratorError, ConnectionError):
    """No server answered: all are refusing connections or out of rotation.

    Attributes: ``urls``, the servers that were tried.
    """

    def __init__(self, message: str, *, urls: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.urls = urls

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), {"urls": self.urls}))


class ModelSelectionError(VllmGeneratorError, LookupError):
    """No model name was given and the server does not serve exactly one."""


class GenerationError(VllmGeneratorError, RuntimeError):
    """A row failed for good and the transform was asked to stop (``on_error="raise"``).

    Attributes: ``row`` (the dataset row when map passed indices, else the row of the batch),
    ``error`` (the row's error text) and ``error_type`` (``"http_400"``, ``"timeout"``, ...).
    """

    def __init__(self, message: str, *, row: int, error: str | None, error_type: str | None) -> None:
        super().__init__(message)
        self.row = row
        self.error = error
        self.error_type = error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), {"row": self.row, "error": self.error, "error_type": self.error_type}))


class RowFailedError(GenerationError):
    """A row of a ``Client.submit(..., stop_on_error=True)`` batch failed for good, so the batch
    stopped. ``row`` counts the rows submitted; ``result`` is the row's ``wire.Result``. The
    transform turns it into a ``GenerationError`` naming the dataset row."""

    def __init__(self, row: int, result: Any) -> None:
        super().__init__(f"row {row} of the batch failed: {result.error}", row=row, error=result.error, error_type=result.error_type)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.row, self.result))


class ServerStartError(VllmGeneratorError, RuntimeError):
    """A vLLM server that vllm-generator started itself exited or never became ready."""


class MergeError(VllmGeneratorError, ValueError):
    """The outputs of a split run cannot be merged: a split is missing or incomplete."""


class StorageError(VllmGeneratorError, OSError):
    """Writing to disk failed for want of room (or a folder that cannot be written); what was
    finished is kept, and the same command resumes once there is room.

    Attributes: ``path``, where the write failed.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), {"path": self.path}))


class HubError(VllmGeneratorError, ConnectionError):
    """Pushing to the Hugging Face Hub failed; the Parquet file it was pushing is kept.

    Attributes: ``repo_id``, ``local_path``.
    """

    def __init__(self, message: str, *, repo_id: str, local_path: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.local_path = local_path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), {"repo_id": self.repo_id, "local_path": self.local_path}))


class SlurmError(VllmGeneratorError, RuntimeError):
    """A SLURM command failed or is not installed.

    Attributes: ``command`` (the argv run), ``returncode`` (None when it could not run),
    ``stderr`` (what it said), and ``submitted`` (ids of jobs submitted before the failure).
    """

    def __init__(
        self, message: str, *, command: list[str], returncode: int | None, stderr: str = "", submitted: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        self.submitted = submitted

    def __reduce__(self) -> tuple[Any, ...]:
        attributes = {"command": self.command, "returncode": self.returncode, "stderr": self.stderr, "submitted": self.submitted}
        return (_rebuild, (type(self), str(self), attributes))


def _rebuild(cls: type[Exception], message: str, attributes: dict[str, Any]) -> Exception:
    return cls(message, **attributes)
