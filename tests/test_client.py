"""Unit tests without a server: response parsing, Retry-After, routing and backoff, and the
config that decides what a request holds (request fields, prompt sources) with full error text."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from vllm_generator import RecipeError, ServerUnavailableError, vllm_generate
from vllm_generator.client import (
    Client,
    _parse_body,
    _retry_after,
    _RetryableError,
    _server_message,
    parse_choice,
)
from vllm_generator.recipe import GenerationConfig, PromptConfig, RetryConfig


def chat_choice(content: str | None, **message: Any) -> dict[str, Any]:
    return {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"}


# --------------------------------------------------------------------------- parse_choice


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        pytest.param(chat_choice("the answer"), ("the answer", None), id="plain"),
        pytest.param(chat_choice("the answer", reasoning="because"), ("the answer", "because"), id="field"),
        pytest.param(chat_choice("the answer", reasoning_content="because"), ("the answer", "because"), id="legacy"),
        pytest.param(
            chat_choice("the answer", reasoning=None, reasoning_content="because"), ("the answer", "because"), id="legacy-with-null-field"
        ),
        pytest.param(chat_choice("<think>because</think>\n\nthe answer"), ("the answer", "because"), id="inline"),
        pytest.param(chat_choice("\n<think>\nbecause\n</think>\n\nthe answer"), ("the answer", "because"), id="inline-whitespace"),
        pytest.param(chat_choice("because</think>\n\nthe answer"), ("the answer", "because"), id="close_only"),
        pytest.param(chat_choice("<think>because, and then"), ("", "because, and then"), id="unclosed"),
        pytest.param(chat_choice(None, reasoning="because, and then"), ("", "because, and then"), id="field_unclosed"),
        pytest.param(chat_choice(None), ("", None), id="content-none"),
        pytest.param(chat_choice(""), ("", None), id="content-empty"),
        pytest.param({"index": 0, "message": None}, ("", None), id="message-none"),
    ],
)
def test_parse_choice_chat_shapes(choice: dict[str, Any], expected: tuple[str, str | None]) -> None:
    assert parse_choice(choice, chat=True, parse_reasoning=True) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the answer", ("the answer", None)),
        ("<think>because</think>the answer", ("the answer", "because")),
        ("because</think> the answer", ("the answer", "because")),
        ("<think>because", ("", "because")),
        (None, ("", None)),
    ],
)
def test_parse_choice_completion_text(text: str | None, expected: tuple[str, str | None]) -> None:
    assert parse_choice({"index": 0, "text": text}, chat=False, parse_reasoning=True) == expected


def test_parse_choice_completion_ignores_a_reasoning_field() -> None:
    assert parse_choice({"text": "the answer", "reasoning": "x"}, chat=False, parse_reasoning=True) == ("the answer", None)


def test_parse_choice_without_parse_reasoning_keeps_the_text() -> None:
    choice = chat_choice("<think>because</think>the answer")
    assert parse_choice(choice, chat=True, parse_reasoning=False) == ("<think>because</think>the answer", None)
    # a reasoning field is still read: the server split it, not us
    assert parse_choice(chat_choice("a", reasoning="r"), chat=True, parse_reasoning=False) == ("a", "r")
    assert parse_choice(chat_choice(None), chat=True, parse_reasoning=False) == ("", None)


# --------------------------------------------------------------------------- _parse_body


def body(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"choices": list(choices), "usage": usage}


def test_parse_body_single_choice() -> None:
    result = _parse_body(
        body(chat_choice("<think>r</think>a"), usage={"prompt_tokens": 3, "completion_tokens": 4}),
        chat=True, n=1, parse_reasoning=True, want_logprobs=False,
    )
    assert (result.response, result.reasoning, result.finish_reason) == ("a", "r", "stop")
    assert (result.prompt_tokens, result.completion_tokens, result.error, result.logprobs) == (3, 4, None, None)


def test_parse_body_orders_choices_by_index() -> None:
    second = {"index": 1, "message": {"content": "b"}, "finish_reason": "length", "logprobs": {"x": 1}}
    first = {"index": 0, "message": {"content": "a", "reasoning": "r"}, "finish_reason": "stop", "logprobs": None}
    result = _parse_body(body(second, first), chat=True, n=2, parse_reasoning=True, want_logprobs=True)

    assert result.response == ["a", "b"]
    assert result.reasoning == ["r", None]
    assert result.finish_reason == ["stop", "length"]
    assert result.prompt_tokens is None  # no usage
    assert result.logprobs is not None and json.loads(result.logprobs) == [None, {"x": 1}]


def test_parse_body_with_the_wrong_number_of_choices_is_a_broken_body() -> None:
    # ValueError is what _attempt turns into a retryable "broken response body"
    with pytest.raises(ValueError, match="^expected 2 choices, got 1$"):
        _parse_body(body(chat_choice("a")), chat=True, n=2, parse_reasoning=True, want_logprobs=False)
    with pytest.raises(KeyError):
        _parse_body({"object": "error"}, chat=True, n=1, parse_reasoning=True, want_logprobs=False)


# --------------------------------------------------------------------------- Retry-After and server messages


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2", 2.0), ("0.25", 0.25), ("0", 0.0), ("-3", 0.0), (None, None), ("", None),
     # a header nobody can read is as good as none: fall back to backoff, never crash or sleep forever
     ("soon", None), ("inf", None), ("nan", None), ("1e999", None)],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert _retry_after(value) == seconds


def test_retry_after_http_date() -> None:
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)  # e.g. "Wed, 25 Nov 2026 12:00:30 GMT"
    wait = _retry_after(in_30s)
    assert wait is not None and 28.0 <= wait <= 30.5
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"error": {"message": "maximum context length is 512", "type": "BadRequestError", "code": 400}}', "maximum context length is 512"),
        (b'{"error": "Unauthorized"}', "Unauthorized"),  # vLLM's 401: a string, not an object
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b"", "(empty body)"),
        (b'{"detail": "x"}', '{"detail": "x"}'),
    ],
)
def test_server_message(raw: bytes, message: str) -> None:
    assert _server_message(raw) == message


# --------------------------------------------------------------------------- routing and backoff (no I/O)


def test_pick_server_prefers_the_least_busy_healthy_server() -> None:
    client = Client(["http://a:1", "http://b:2", "http://c:3"])
    a, b, c = client.servers
    a.in_flight, b.in_flight, c.in_flight = 5, 2, 3
    assert client._pick_server() is b
    b.down_until = time.monotonic() + 60
    assert client._pick_server() is c


def test_pick_server_with_every_server_down_names_them() -> None:
    client = Client(["http://a:1", "http://b:2"])
    for server in client.servers:
        server.down_until = time.monotonic() + 60
    with pytest.raises(ServerUnavailableError) as info:
        client._pick_server()
    assert str(info.value) == (
        "no server is reachable (http://a:1, http://b:2 all refused connections): is `vllm serve` running? "
        "try `vllm-generator list-models -m http://a:1`"
    )


def test_three_refusals_take_a_server_out_of_rotation() -> None:
    client = Client(["http://a:1", "http://b:2"])
    a, b = client.servers
    for _ in range(2):
        client._server_refused(a)
    assert a.down_until <= time.monotonic()
    client._server_refused(a)
    assert a.down_until > time.monotonic() + 20
    assert client._pick_server() is b


def test_backoff_honours_retry_after_and_otherwise_grows_within_bounds() -> None:
    client = Client(["http://a:1"], retry=RetryConfig(initial_wait=0.5, max_wait=3))
    assert client._backoff(_RetryableError("429", "http_429", retry_after=2.5), 1) == 2.5
    # a Retry-After beyond max_wait would stall the row: it is capped
    assert client._backoff(_RetryableError("429", "http_429", retry_after=3600.0), 1) == 3.0
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)]:
        waits = [client._backoff(_RetryableError("503", "http_503"), attempt) for _ in range(50)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling / 4  # jittered over the range, not stuck at 0


def test_client_repr_hides_the_api_key() -> None:
    client = Client(["http://a:1"], api_key="very-secret-key", model="m")
    assert repr(client) == "Client(['http://a:1'], model='m')"
    assert client._headers["Authorization"] == "Bearer very-secret-key"


def test_client_needs_a_url() -> None:
    with pytest.raises(ValueError, match="^Client needs at least one base URL$"):
        Client([])


# --------------------------------------------------------------------------- GenerationConfig.request_fields


def test_request_fields_default_is_empty() -> None:
    # n=1 is the server's default too: not sent; None means "server default"
    assert GenerationConfig().request_fields() == {}
    assert GenerationConfig(n=1, temperature=None).request_fields() == {}


def test_request_fields_sends_set_parameters() -> None:
    fields = GenerationConfig(temperature=0, n=2, stop="END", seed=7, logit_bias={50256: -100}).request_fields()
    assert fields == {"temperature": 0.0, "n": 2, "stop": ["END"], "seed": 7, "logit_bias": {"50256": -100.0}}


@pytest.mark.parametrize(
    ("thinking", "kwargs", "expected"),
    [
        (True, None, {"chat_template_kwargs": {"enable_thinking": True}}),
        (False, None, {"chat_template_kwargs": {"enable_thinking": False}}),
        (None, None, {}),
        (None, {"x": 1}, {"chat_template_kwargs": {"x": 1}}),
        (False, {"x": 1, "enable_thinking": True}, {"chat_template_kwargs": {"x": 1, "enable_thinking": False}}),
    ],
)
def test_request_fields_thinking(thinking: bool | None, kwargs: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    assert GenerationConfig(thinking=thinking, chat_template_kwargs=kwargs).request_fields() == expected


@pytest.mark.parametrize(
    ("mode", "logprobs", "top_logprobs", "expected"),
    [
        ("completion", True, None, {"logprobs": 1}),  # /v1/completions wants an int
        ("completion", True, 5, {"logprobs": 5}),
        ("completion", False, 5, {}),
        ("completion", 3, None, {"logprobs": 3}),
        ("chat", True, 3, {"logprobs": True, "top_logprobs": 3}),
    ],
)
def test_request_fields_logprobs(mode: str, logprobs: bool | int, top_logprobs: int | None, expected: dict[str, Any]) -> None:
    fields = GenerationConfig(mode=mode, logprobs=logprobs, top_logprobs=top_logprobs).request_fields()
    assert fields == expected
    assert type(fields.get("logprobs")) is type(expected.get("logprobs"))  # 1, not True


def test_request_fields_extra_body_wins() -> None:
    fields = GenerationConfig(temperature=0.5, extra_body={"temperature": 0.0, "priority": 1}).request_fields()
    assert fields == {"temperature": 0.0, "priority": 1}


def errors_of(err: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    return [(tuple(e["loc"]), e["msg"]) for e in err.errors()]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "completion", "thinking": True}, "Value error, thinking only applies to mode 'chat' (it sets chat_template_kwargs.enable_thinking)"),
        ({"mode": "completion", "chat_template_kwargs": {"x": 1}}, "Value error, chat_template_kwargs only applies to mode 'chat'"),
        (
            {"extra_body": {"guided_json": {}}},
            (
                "Value error, extra_body.guided_json is ignored by current vLLM (it answers unconstrained): "
                "use generation.structured_outputs, e.g. {'choice': ['yes', 'no']} or {'regex': '...'}"
            ),
        ),
    ],
)
def test_generation_config_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerationConfig(**kwargs)
    assert errors_of(info.value) == [((), message)]


# --------------------------------------------------------------------------- PromptConfig


@pytest.mark.parametrize(
    ("kwargs", "errors"),
    [
        (
            {"prompt_column": "q", "template": "Q: {q}"},
            [((), "Value error, give only one of prompt_column, messages_column, template (got prompt_column, template)")],
        ),
        (
            {"prompt_column": "q", "messages_column": "m"},
            [((), "Value error, give only one of prompt_column, messages_column, template (got prompt_column, messages_column)")],
        ),
        ({"template": "Q: {}"}, [(("template",), "Value error, template fields must be column names like {question}, not {} or {0}")]),
        ({"template": "Q: {0}"}, [(("template",), "Value error, template fields must be column names like {question}, not {} or {0}")]),
        ({"template": "no field here"}, [(("template",), "Value error, template names no column: write it like 'Q: {question}'")]),
        (
            {"template": "Q: {question"},
            [(("template",), "Value error, template is not a valid str.format string: expected '}' before end of string")],
        ),
    ],
)
def test_prompt_config_rejects(kwargs: dict[str, str], errors: list[tuple[tuple[str, ...], str]]) -> None:
    with pytest.raises(ValidationError) as info:
        PromptConfig(**kwargs)
    assert errors_of(info.value) == errors


def test_prompt_config_errors_through_vllm_generate_name_the_keyword() -> None:
    with pytest.raises(RecipeError) as info:
        vllm_generate("http://127.0.0.1:9", prompt_column="q", template="Q: {q}")
    assert str(info.value) == (
        "vllm_generate: prompt: give only one of prompt_column, messages_column, template (got prompt_column, template)"
    )
    with pytest.raises(RecipeError) as info:
        vllm_generate("http://127.0.0.1:9", template="Q: {}")
    assert str(info.value) == "vllm_generate: template: template fields must be column names like {question}, not {} or {0}"


@pytest.mark.parametrize(
    ("kwargs", "source", "columns"),
    [
        ({}, "prompt", ["prompt"]),
        ({"prompt_column": "question"}, "prompt", ["question"]),
        ({"messages_column": "chat"}, "messages", ["chat"]),
        ({"template": "{a} and {b.x} and {c[0]} and {a}"}, "template", ["a", "b", "c"]),
    ],
)
def test_prompt_config_source_and_columns(kwargs: dict[str, str], source: str, columns: list[str]) -> None:
    config = PromptConfig(**kwargs)
    assert config.source == source
    assert config.required_columns() == columns
