"""Generate text for every row of a Hugging Face dataset with one or more vLLM servers."""

from .errors import (
    AuthenticationError,
    GenerationError,
    HubError,
    MergeError,
    ModelSelectionError,
    RecipeError,
    ServerStartError,
    ServerUnavailableError,
    StorageError,
    VllmGeneratorError,
)
from .recipe import Recipe, TransformConfig, load_recipe
from .serve import serve_models
from .transform import VllmGenerate, vllm_generate

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

__all__ = [
    "vllm_generate",
    "VllmGenerate",
    "TransformConfig",
    "Recipe",
    "load_recipe",
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
    "__version__",
]
