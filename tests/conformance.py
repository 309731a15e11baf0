"""The openai SDK's own types as the reference for the wire format (see the README's design notes).

``check_request`` validates a request body against the SDK's request parameters; the fields it does
not know must be vLLM's documented extensions, which the SDK would send through ``extra_body``.
``check_response`` validates a response body against the SDK's response model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, get_type_hints

from openai.types import Completion
from openai.types import completion_create_params as completion_params
from openai.types.chat import ChatCompletion
from openai.types.chat import completion_create_params as chat_params
from pydantic import BaseModel, TypeAdapter

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# vLLM's extra sampling and chat parameters (its OpenAI server's "extra parameters")
VLLM_EXTENSIONS = {
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "structured_outputs",
    "chat_template_kwargs",
    "priority",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "ignore_eos",
}
_REQUESTS: dict[str, Any] = {
    CHAT: chat_params.CompletionCreateParamsNonStreaming,
    COMPLETIONS: completion_params.CompletionCreateParamsNonStreaming,
}
_RESPONSES: dict[str, type[BaseModel]] = {CHAT: ChatCompletion, COMPLETIONS: Completion}


@functools.cache
def _adapter(path: str) -> tuple[TypeAdapter[Any], frozenset[str]]:
    params = _REQUESTS[path]
    return TypeAdapter(params), frozenset(get_type_hints(params))


def check_request(path: str, body: dict[str, Any]) -> None:
    """Raise (pydantic's ``ValidationError``, or ``AssertionError``) unless ``body`` is a request
    the SDK could send to ``path``."""
    adapter, known = _adapter(path)
    extra = set(body) - known
    assert extra <= VLLM_EXTENSIONS, f"neither OpenAI nor vLLM request fields: {sorted(extra - VLLM_EXTENSIONS)}"
    validated = adapter.validate_python({k: v for k, v in body.items() if k in known})
    for value in validated.values():  # pydantic checks an Iterable field's items as they are read
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict, list)):
            list(value)


def check_response(path: str, body: dict[str, Any]) -> BaseModel:
    """The SDK's model of a 200 response body from ``path``; raises when the body does not fit it."""
    return _RESPONSES[path].model_validate(body)
