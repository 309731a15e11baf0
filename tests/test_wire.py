"""The wire format: request bodies and fields from configs, response parsing, JSON, Retry-After and
server messages; and the bodies we build checked against the openai SDK's own request types."""

from __future__ import annotations

import email.utils
import json
import re
import time
from typing import Any

import pytest
from conformance import CHAT, COMPLETIONS, check_request, check_response
from pydantic import ValidationError

from vllm_generator import vllm_generate
from vllm_generator.errors import RecipeError
from vllm_generator.recipe import GenerationConfig
from vllm_generator.wire import (
    FinalError,
    check_auth,
    decode,
    encode,
    parse_choice,
    parse_response,
    redact_text,
    redact_url,
    request_fields,
    retry_after,
    server_message,
    status_error,
)


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
        pytest.param(chat_choice(""), ("", None), id="content-empty"),
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


@pytest.mark.parametrize(
    ("choice", "chat", "message"),
    [
        pytest.param(chat_choice(None), True, "a choice has no content", id="content-null"),
        pytest.param({"index": 0, "message": None}, True, "a choice has no message (got NoneType)", id="message-null"),
        pytest.param({"index": 0, "finish_reason": "stop"}, True, "a choice has no message (got NoneType)", id="no-message"),
        pytest.param({"index": 0, "message": "hi"}, True, "a choice has no message (got str)", id="message-text"),
        pytest.param(chat_choice(42), True, "a choice's text is int, not a string", id="content-number"),
        pytest.param({"index": 0, "text": None}, False, "a choice has no text", id="text-null"),
    ],
)
def test_a_choice_without_text_is_a_broken_answer_not_an_empty_success(choice: dict[str, Any], chat: bool, message: str) -> None:
    # ValueError is what the client retries as a broken body (bad_body), never a "" response
    for parse_reasoning in (True, False):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            parse_choice(choice, chat=chat, parse_reasoning=parse_reasoning)


def test_token_counts_written_as_text_are_read_and_others_are_a_broken_body() -> None:
    ok = {"choices": [chat_choice("a")], "usage": {"prompt_tokens": "3", "completion_tokens": 4.0}}
    result = parse_response(ok, chat=True, n=1, parse_reasoning=True, want_logprobs=False)
    assert (result.prompt_tokens, result.completion_tokens) == (3, 4)
    for odd in ("three", -1.5, True, [3]):
        with pytest.raises(ValueError, match="^usage.prompt_tokens is .*, not a count$"):
            parse_response(
                {"choices": [chat_choice("a")], "usage": {"prompt_tokens": odd}}, chat=True, n=1, parse_reasoning=True, want_logprobs=False
            )


def test_a_redirect_is_a_row_error_naming_where_it_pointed_without_its_password() -> None:
    error = status_error("http://h:1/v1/chat/completions", 307, b"", None, "http://user:pw@other:2/v1/chat/completions")
    assert isinstance(error, FinalError) and error.kind == "http_307"
    assert str(error) == (
        "307 from http://h:1/v1/chat/completions: redirected to http://user:***@other:2/v1/chat/completions; "
        "redirects are not followed for generation requests: set base_url to the server itself"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@h:8000", "http://user:***@h:8000"),
        ("https://token@h", "https://token:***@h"),
        ("http://a:b@c@h/x", "http://a:***@h/x"),
        ("http://h:8000/path@x", "http://h:8000/path@x"),
        ("http://h:8000", "http://h:8000"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "secret" not in redact_text(f"error: cannot reach {url}/v1 (refused)")


def test_a_password_in_the_url_and_an_api_key_are_refused_together() -> None:
    check_auth(["http://user:pw@h:1"], None)
    check_auth(["http://h:1"], "key")
    with pytest.raises(RecipeError) as info:
        check_auth(["http://h:1", "http://user:pw@h:2"], "key")
    assert str(info.value).startswith("model.base_url http://user:***@h:2 carries a user and password, and an API key is set too")
    assert "pw" not in str(info.value)


# --------------------------------------------------------------------------- parse_response


def body(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"choices": list(choices), "usage": usage}


def testparse_response_single_choice() -> None:
    result = parse_response(
        body(chat_choice("<think>r</think>a"), usage={"prompt_tokens": 3, "completion_tokens": 4}),
        chat=True,
        n=1,
        parse_reasoning=True,
        want_logprobs=False,
    )
    assert (result.response, result.reasoning, result.finish_reason) == ("a", "r", "stop")
    assert (result.prompt_tokens, result.completion_tokens, result.error, result.logprobs) == (3, 4, None, None)


def testparse_response_orders_choices_by_index() -> None:
    second = {"index": 1, "message": {"content": "b"}, "finish_reason": "length", "logprobs": {"x": 1}}
    first = {"index": 0, "message": {"content": "a", "reasoning": "r"}, "finish_reason": "stop", "logprobs": None}
    result = parse_response(body(second, first), chat=True, n=2, parse_reasoning=True, want_logprobs=True)

    assert result.response == ["a", "b"]
    assert result.reasoning == ["r", None]
    assert result.finish_reason == ["stop", "length"]
    assert result.prompt_tokens is None  # no usage
    assert result.logprobs is not None and json.loads(result.logprobs) == [None, {"x": 1}]


def testparse_response_with_the_wrong_number_of_choices_is_a_broken_body() -> None:
    # ValueError is what _attempt turns into a retryable "broken response body"
    with pytest.raises(ValueError, match="^expected 2 choices, got 1$"):
        parse_response(body(chat_choice("a")), chat=True, n=2, parse_reasoning=True, want_logprobs=False)
    with pytest.raises(KeyError):
        parse_response({"object": "error"}, chat=True, n=1, parse_reasoning=True, want_logprobs=False)


# --------------------------------------------------------------------------- JSON on the hot path (orjson, json's answers where it differs)


def test_request_bodies_encode_what_json_encodes() -> None:
    import numpy as np

    body = {"logit_bias": {50256: -100}, "content": "café ✓", "seed": np.int64(3)}
    assert json.loads(encode(body)) == {"logit_bias": {"50256": -100}, "content": "café ✓", "seed": 3}
    assert json.loads(encode({"big": 2**70})) == {"big": 2**70}  # over 64 bits: json writes it
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode({"x": object()})


def test_responses_with_nan_or_infinity_still_parse() -> None:
    assert decode(b'{"logprob": -Infinity, "other": NaN}')["logprob"] == float("-inf")
    with pytest.raises(ValueError):
        decode(b'{"truncated": ')


# --------------------------------------------------------------------------- Retry-After and server messages


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        ("0.25", 0.25),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        # a header nobody can read is as good as none: fall back to backoff, never crash or sleep forever
        ("soon", None),
        ("inf", None),
        ("nan", None),
        ("1e999", None),
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


def test_retry_after_http_date() -> None:
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)  # e.g. "Wed, 25 Nov 2026 12:00:30 GMT"
    wait = retry_after(in_30s)
    assert wait is not None and 28.0 <= wait <= 30.5
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"error": {"message": "maximum context length is 512", "type": "BadRequestError", "code": 400}}',
            "maximum context length is 512",
        ),
        (b'{"error": "Unauthorized"}', "Unauthorized"),  # vLLM's 401: a string, not an object
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b"", "(empty body)"),
        (b'{"detail": "x"}', '{"detail": "x"}'),
    ],
)
def testserver_message(raw: bytes, message: str) -> None:
    assert server_message(raw) == message


# --------------------------------------------------------------------------- request_fields


def test_request_fields_default_is_empty() -> None:
    # n=1 is the server's default too: not sent; None means "server default"
    assert request_fields(GenerationConfig()) == {}
    assert request_fields(GenerationConfig(n=1, temperature=None)) == {}


def test_request_fields_sends_set_parameters() -> None:
    fields = request_fields(GenerationConfig(temperature=0, n=2, stop="END", seed=7, logit_bias={50256: -100}))
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
    assert request_fields(GenerationConfig(thinking=thinking, chat_template_kwargs=kwargs)) == expected


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
    fields = request_fields(GenerationConfig(mode=mode, logprobs=logprobs, top_logprobs=top_logprobs))
    assert fields == expected
    assert type(fields.get("logprobs")) is type(expected.get("logprobs"))  # 1, not True


def test_request_fields_extra_body_wins() -> None:
    fields = request_fields(GenerationConfig(temperature=0.5, extra_body={"temperature": 0.0, "priority": 1}))
    assert fields == {"temperature": 0.0, "priority": 1}


# --------------------------------------------------------------------------- against the openai SDK's types


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="prompt"),
        pytest.param(
            {"system_prompt": "be terse", "temperature": 0.2, "max_tokens": 8, "n": 3, "seed": 1, "stop": "END"}, id="chat-sampling"
        ),
        pytest.param({"messages_column": "messages", "system_prompt": "be terse"}, id="messages"),
        pytest.param({"template": "Q: {prompt} ({n})", "top_p": 0.9, "logprobs": True, "top_logprobs": 2}, id="template-logprobs"),
        pytest.param(
            {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1, "thinking": False, "logit_bias": {50256: -100}},
            id="vllm-extensions",
        ),
        pytest.param(
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}, id="json-schema"
        ),
        pytest.param({"structured_outputs": {"choice": ["yes", "no"]}}, id="structured-outputs"),
        pytest.param(
            {"mode": "completion", "max_tokens": 4, "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5}, id="completion"
        ),
        pytest.param({"mode": "completion", "template": "{prompt}!", "n": 2, "frequency_penalty": 0.1}, id="completion-template"),
    ],
)
def test_every_body_the_wire_format_builds_is_an_openai_request(kwargs: dict[str, Any]) -> None:
    transform = vllm_generate("http://127.0.0.1:9", model="m", **kwargs)
    batch = {
        "prompt": ["a", None, "c"],
        "n": [1, 2, 3],
        "messages": [[{"role": "user", "content": "hi"}], None, [{"role": "user", "content": "x"}]],
    }
    bodies = [b for b in transform.wire.bodies(batch) if b is not None]
    assert len(bodies) == 2
    for body in bodies:
        check_request(transform.wire.path, {"model": "m", **body})


def test_the_request_check_refuses_what_openai_and_vllm_do_not_take() -> None:
    with pytest.raises(ValidationError):
        check_request(CHAT, {"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    with pytest.raises(AssertionError, match="guided_json"):
        check_request(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "guided_json": {}})
    with pytest.raises(ValidationError):
        check_request(COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": "many"})


def test_the_response_check_refuses_a_body_that_is_not_a_completion() -> None:
    with pytest.raises(ValidationError):
        check_response(CHAT, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]})  # no id, model, ...
