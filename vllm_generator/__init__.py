"""Generate text for every row of a Hugging Face dataset with one or more vLLM servers."""

from .errors import (
    GenerationError,
    HubError,
    MergeError,
    ModelSelectionError,
    RecipeError,
    ServerStartError,
    ServerUnavailableError,
    VllmGeneratorError,
)
from .recipe import GenerateConfig, Recipe, load_recipe
from .serve import serve_models
from .transform import VllmGenerate, vllm_generate

__version__ = "0.1.0"

__all__ = [
    "vllm_generate",
    "VllmGenerate",
    "GenerateConfig",
    "Recipe",
    "load_recipe",
    "serve_models",
    "VllmGeneratorError",
    "RecipeError",
    "ServerUnavailableError",
    "ModelSelectionError",
    "GenerationError",
    "ServerStartError",
    "MergeError",
    "HubError",
    "__version__",
]
