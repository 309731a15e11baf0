"""Generate text for every row of a Hugging Face dataset with one or more vLLM servers."""

from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    GenerationError,
    HubError,
    MergeError,
    ModelSelectionError,
    RecipeError,
    ServerStartError,
    ServerUnavailableError,
    SlurmError,
    StorageError,
    VllmGeneratorError,
)
from .recipe import Recipe, TransformConfig, load_recipe
from .serve import serve_models
from .transform import VllmGenerate, vllm_generate

if TYPE_CHECKING:
    from .run import RunSummary, run_recipe

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

__all__ = [
    "vllm_generate",
    "VllmGenerate",
    "TransformConfig",
    "Recipe",
    "load_recipe",
    "run_recipe",
    "RunSummary",
    "serve_models",
    "VllmGeneratorError",
    "RecipeError",
    "AuthenticationError",
    "ServerUnavailableError",
    "ModelSelectionError",
    "GenerationError",
    "ServerStartError",
    "MergeError",
    "StorageError",
    "HubError",
    "SlurmError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # run imports datasets (about a second): loaded on first use, so that `import vllm_generator`
    # and the command's start stay quick
    if name in ("run_recipe", "RunSummary"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'vllm_generator' has no attribute {name!r}")
