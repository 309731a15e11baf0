"""The client: unit tests without a server (response parsing, Retry-After, routing and backoff,
the config that decides what a request holds, with full error text), then ``Client`` against the
fake vLLM server as a real subprocess, asserting on what the server received (``FakeServer.log``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import aiohttp
import pytest
from fake_server import BlackHole, FakeServer
from pydantic import ValidationError

from vllm_generator import GenerationError, RecipeError, ServerUnavailableError, vllm_generate
from vllm_generator.client import (
    Client,
    Result,
    RowFailedError,
    _dumps,
    _loads,
    _parse_body,
    _retry_after,
    _RetryableError,
    _server_message,
    parse_choice,
    run_on_loop,
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


# --------------------------------------------------------------------------- JSON on the hot path (orjson, json's answers where it differs)


def test_request_bodies_encode_what_json_encodes() -> None:
    import numpy as np

    body = {"logit_bias": {50256: -100}, "content": "café ✓", "seed": np.int64(3)}
    assert json.loads(_dumps(body)) == {"logit_bias": {"50256": -100}, "content": "café ✓", "seed": 3}
    assert json.loads(_dumps({"big": 2**70})) == {"big": 2**70}  # over 64 bits: json writes it
    with pytest.raises(TypeError, match="not JSON serializable"):
        _dumps({"x": object()})


def test_responses_with_nan_or_infinity_still_parse() -> None:
    assert _loads(b'{"logprob": -Infinity, "other": NaN}')["logprob"] == float("-inf")
    with pytest.raises(ValueError):
        _loads(b'{"truncated": ')


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


def test_pick_server_with_every_server_down_probes_the_one_down_longest() -> None:
    # out of rotation routes around a bad server only while another is up: with none up,
    # requests go on (each row with its own attempts) to the server that left first
    client = Client(["http://a:1", "http://b:2", "http://c:3"])
    a, b, c = client.servers
    a.down_until, b.down_until, c.down_until = [time.monotonic() + s for s in (50, 20, 40)]
    assert client._pick_server() is b
    b.down_until = 0.0  # b answered
    assert client._pick_server() is b


def test_a_failed_probe_sends_the_next_probe_to_another_server() -> None:
    client = Client(["http://a:1", "http://b:2"])
    a, b = client.servers
    for server in (a, b):
        for _ in range(3):
            client._server_refused(server)
    assert client._pick_server() is a  # out of rotation first
    client._server_refused(a)
    assert client._pick_server() is b
    client._server_refused(b)
    assert client._pick_server() is a


def test_three_refusals_of_the_only_server_keep_it_in_use(caplog: pytest.LogCaptureFixture) -> None:
    client = Client(["http://a:1"])
    (a,) = client.servers
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    for _ in range(3):
        client._server_refused(a)
    assert a.down_until > time.monotonic() + 20
    assert client._pick_server() is a
    assert [r.getMessage() for r in caplog.records] == [
        "http://a:1 did not accept 3 connections in a row, and no other server is up: rows keep trying it, with backoff"
    ]


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


# --------------------------------------------------------------------------- Client against the fake server

CHAT = "/v1/chat/completions"
PARSE = partial(_parse_body, chat=True, n=1, parse_reasoning=True, want_logprobs=False)
MakeClient = Callable[..., Client]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Clients with fast retries (``initial_wait``/``max_wait``/``attempts`` override them); closed after the test."""
    clients: list[Client] = []

    def make(urls: str | list[str], *, attempts: int = 3, initial_wait: float = 0.01, max_wait: float = 0.05, **kwargs: Any) -> Client:
        retry = RetryConfig(attempts=attempts, initial_wait=initial_wait, max_wait=max_wait)
        client = Client([urls] if isinstance(urls, str) else urls, retry=retry, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def chat_bodies(prompts: list[str]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": p}]} for p in prompts]


def send(client: Client, prompts: list[str], **kwargs: Any) -> list[Result]:
    return client.submit(CHAT, chat_bodies(prompts), PARSE, **kwargs).result(timeout=120)


def received(server: FakeServer) -> Counter[str]:
    """How many generation requests the server got for each prompt."""
    return Counter(entry["body"]["messages"][-1]["content"] for entry in server.log())


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying")]


# -- one server restarting, all servers out of rotation


def test_a_restart_blip_of_the_only_server_loses_no_row(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_fake_server("--latency", "0.02")
    # backoff ceilings 0.5, 1, 2, 2 s: four jittered waits all but never fit in a 0.1 s blip
    client = make_client(server.url, attempts=5, initial_wait=0.5, max_wait=2.0, max_concurrency=8)
    prompts = [f"row {i}" for i in range(60)]
    caplog.set_level(logging.INFO, logger="vllm_generator")
    futures = []

    def start_the_batch() -> None:
        futures.append(client.submit(CHAT, chat_bodies(prompts), PARSE))
        deadline = time.monotonic() + 60
        while server.stats()["requests"] < 16 and time.monotonic() < deadline:
            time.sleep(0.005)

    # killed mid-batch: in-flight requests dropped, then 0.1 s of refused connections
    server.restart(down=0.1, before_kill=start_the_batch)
    results = futures[0].result(timeout=120)

    assert [r.error for r in results] == [None] * 60
    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    # the blip was real: connections were refused often enough to take the server out of rotation
    warned = [r.getMessage() for r in caplog.records if "connections in a row" in r.getMessage()]
    assert warned and warned[0].startswith(f"{server.url} did not accept ")
    assert f"{server.url} answers again: back in rotation" in [r.getMessage() for r in caplog.records]
    # the restarted server got rows, each once, and only rows the first server did not finish
    after = received(server)
    assert after and set(after) <= set(prompts) and set(after.values()) == {1}
    assert client.stats.requests > 60 and client.stats.retries == client.stats.requests - 60


def test_a_rerun_right_after_every_server_refused_sends_again(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient
) -> None:
    server = start_fake_server()
    client = make_client(server.url, attempts=2)
    assert [r.response for r in send(client, ["a"])] == ["echo: a"]
    server.kill()
    with pytest.raises(ServerUnavailableError) as info:
        send(client, ["b", "c", "d"])
    assert str(info.value).startswith(f"cannot reach {server.url} after 2 attempts (cannot connect to {server.url} (")
    assert str(info.value).endswith(f"is `vllm serve` running? try `vllm-generator list-models -m {server.url}`")
    assert client.servers[0].down_until > time.monotonic()  # out of rotation, yet tried again:

    server.restart()
    assert [r.response for r in send(client, ["e", "f"])] == ["echo: e", "echo: f"]
    assert received(server) == Counter({"e": 1, "f": 1})
    assert client.servers[0].down_until == 0.0  # back in rotation


def test_a_dead_server_at_the_start_still_fails_at_once(make_client: MakeClient) -> None:
    server = FakeServer()
    with server:
        server.kill()
    client = make_client(server.url, attempts=5, initial_wait=10.0, max_wait=10.0)
    with pytest.raises(ServerUnavailableError, match=f"^cannot list models at {server.url}/v1/models \\(ClientConnectorError: "):
        send(client, ["a"])
    # one model lookup, no generation attempt and no backoff: the model lookup fails fast
    assert (client.servers[0].failures, client.stats.requests) == (1, 0)


# -- connect timeouts


def test_a_black_holed_server_costs_the_connect_timeout_and_leaves_the_rotation(
    fake_server: FakeServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = [f"row {i}" for i in range(16)]
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    with BlackHole() as hole:
        # without a connect timeout every attempt sent to the hole would wait the full 300 s
        client = make_client([fake_server.url, hole.url], timeout=300, connect_timeout=0.3, max_concurrency=4)
        results = client.submit(CHAT, chat_bodies(prompts), PARSE).result(timeout=100)

    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    assert received(fake_server) == Counter(prompts)  # each row once, all from the live server
    sent_to_hole = client.stats.requests - len(prompts)
    assert sent_to_hole >= 3 and all(r.attempts <= 2 for r in results)
    warned = [r.getMessage() for r in caplog.records if "connections in a row" in r.getMessage()]
    assert warned == [
        f"{hole.url} did not accept 3 connections in a row: out of rotation for 30s; its requests go to {fake_server.url}"
    ]
    assert all(
        m.endswith(f"cannot connect to {hole.url} (no answer within 0.3s)") for m in retry_lines(caplog)
    ), retry_lines(caplog)


def test_a_black_holed_server_at_the_start_fails_within_the_connect_timeout(make_client: MakeClient) -> None:
    with BlackHole() as hole:
        client = make_client(hole.url, timeout=300, connect_timeout=0.3)
        with pytest.raises(ServerUnavailableError) as info:
            send(client, ["a"])
    assert str(info.value).startswith(f"cannot list models at {hole.url}/v1/models (ConnectionTimeoutError: ")
    assert client.servers[0].failures == 1  # counted like a refusal


# -- request timeouts (enforced by the client's watchdog, not a timer per request)


def test_the_timeout_counts_from_the_attempt_not_from_the_queue(fake_server: FakeServer, make_client: MakeClient) -> None:
    # one slot: the last row waits ~1 s for it, more than the timeout, but its own request takes 0.2 s
    client = make_client(fake_server.url, timeout=0.6, attempts=1, max_concurrency=1)
    prompts = [f"row {i} [[sleep:0.2]]" for i in range(5)]
    results = send(client, prompts)

    assert [r.error for r in results] == [None] * 5
    assert received(fake_server) == Counter(prompts)


def test_a_hung_request_times_out_while_the_others_keep_flowing(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url, timeout=0.5, attempts=1, max_concurrency=4)
    prompts = ["stuck [[hang:5]]"] + [f"row {i} [[sleep:0.05]]" for i in range(30)]
    started = time.monotonic()
    results = send(client, prompts)
    took = time.monotonic() - started

    assert results[0].error == f"gave up after 1 attempts: no answer from {fake_server.url} within 0.5s"
    assert results[0].error_type == "timeout"
    assert [r.response for r in results[1:]] == ["echo: " + p for p in prompts[1:]]
    # the deadline is checked every timeout/10: the hung row ends by ~0.55 s, not at 5 s
    assert 0.5 <= took < 2.0
    # once nothing is in flight the watchdog stops, and a later batch starts it again
    deadline = time.monotonic() + 5
    while client._watchdog is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client._watchdog is None
    assert send(client, ["again [[hang:5]]"])[0].error_type == "timeout"


def test_a_watchdog_cancelled_before_its_first_step_is_replaced(fake_server: FakeServer, make_client: MakeClient) -> None:
    # a close in the same loop turn as the watchdog's creation cancels it before it ever runs
    client = make_client(fake_server.url, timeout=0.3, attempts=1)
    send(client, ["warm up"])
    deadline = time.monotonic() + 5
    while client._watchdog is not None and time.monotonic() < deadline:  # the warm-up's watchdog ends
        time.sleep(0.01)

    async def cancel_early() -> None:
        client._watchdog = asyncio.get_running_loop().create_task(client._watch())
        client._watchdog.cancel()
        await asyncio.sleep(0)

    run_on_loop(cancel_early()).result(timeout=5)
    assert client._watchdog is not None and client._watchdog.done()
    result = client.submit(CHAT, chat_bodies(["stuck [[hang:5]]"]), PARSE).result(timeout=20)[0]
    assert result.error_type == "timeout"


def test_a_watchdog_cancel_swallowed_below_the_client_does_not_stop_later_timeouts(
    fake_server: FakeServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = aiohttp.ClientSession._request
    swallowed: list[bool] = []

    async def request(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real(self, *args, **kwargs)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)  # as library code that suppresses a cancel and carries on
            return await real(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", request)
    # one worker: the hung row is sent by the task whose cancel was swallowed
    client = make_client(fake_server.url, timeout=0.3, attempts=1, max_concurrency=1)
    results = client.submit(CHAT, chat_bodies(["slow [[sleep:0.6]]", "stuck [[hang:5]]"]), PARSE).result(timeout=20)

    assert swallowed
    assert results[0].response == "echo: slow [[sleep:0.6]]"
    assert results[1].error_type == "timeout"


# -- retry bookkeeping


def test_a_row_that_always_503s_logs_one_line_per_retry(
    fake_server: FakeServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    client = make_client(fake_server.url, attempts=3)
    (result,) = send(client, ["x [[503:10]]"])

    message = f"503 from {fake_server.url}{CHAT}: Service unavailable (fake_server [[503]])."
    assert result.error == f"gave up after 3 attempts: {message}"
    assert result.attempts == 3 and client.stats.retries == 2
    assert received(fake_server) == Counter({"x [[503:10]]": 3})
    lines = retry_lines(caplog)
    assert [line.split("]")[0].split("[")[1] for line in lines] == ["2/3", "3/3"]  # no "[4/3]" after the last
    assert all(line.endswith(": " + message) for line in lines)


def test_503_503_then_400_counts_three_attempts(
    fake_server: FakeServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    client = make_client(fake_server.url, attempts=5)
    prompt = "x [[503:2]] [[400]]"
    ok, failed = send(client, ["y", prompt])

    assert ok.error is None and ok.attempts == 1
    assert failed.error is not None and failed.error.startswith(f"400 from {fake_server.url}{CHAT}: This model's maximum")
    assert failed.attempts == 3 and failed.error_type == "http_400"
    assert client.stats.retries == 2 and client.stats.requests == 4
    assert received(fake_server) == Counter({prompt: 3, "y": 1})
    assert len(retry_lines(caplog)) == 2


@pytest.mark.parametrize("fault", ["[[408]]", "[[truncate]]"])
def test_a_408_or_a_truncated_body_is_retried(fake_server: FakeServer, make_client: MakeClient, fault: str) -> None:
    prompts = [f"a {fault}", "b"]
    client = make_client(fake_server.url)
    results = send(client, prompts)

    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    assert [r.attempts for r in results] == [2, 1]
    assert received(fake_server) == Counter({prompts[0]: 2, "b": 1})


# -- a refused API key


def key_hint(url: str, status: str) -> str:
    return (
        f"{url}{CHAT} refused the API key ({status}): pass api_key=..., set VLLM_API_KEY, "
        "or name the variable in a recipe's model.api_key_env"
    )


def test_a_key_revoked_mid_run_stops_the_batch(start_fake_server: Callable[..., FakeServer], make_client: MakeClient) -> None:
    server = start_fake_server("--api-key", "key-one")
    client = make_client(server.url, api_key="key-one", max_concurrency=2)
    assert [r.response for r in send(client, ["a"])] == ["echo: a"]
    server.restart("--api-key", "key-two")  # the model was checked already: only generation requests now

    with pytest.raises(RecipeError) as info:
        send(client, [f"row {i}" for i in range(40)])
    assert str(info.value) == key_hint(server.url, "401: Unauthorized")
    assert "key-one" not in str(info.value)
    wait_until_idle(client)
    assert 1 <= len(server.log()) <= 10  # not one 401 per row


def test_a_403_stops_the_batch(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url, max_concurrency=2)
    with pytest.raises(RecipeError) as info:
        send(client, ["a [[403]]", *(f"row {i}" for i in range(1, 40))])
    assert str(info.value) == key_hint(fake_server.url, "403: Forbidden (fake_server [[403]]).")
    wait_until_idle(client)
    assert len(fake_server.log()) <= 10


# -- stop_on_error


def wait_until_idle(client: Client) -> None:
    """Until every row handed to the client has been sent or skipped."""
    deadline = time.monotonic() + 30
    while (client.unfinished or client.stats.in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.unfinished == 0


def test_stop_on_error_fails_the_batch_at_the_first_failed_row(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient
) -> None:
    server = start_fake_server("--latency", "0.05")
    client = make_client(server.url, max_concurrency=4)
    prompts = ["row 0 [[400]]", *(f"row {i}" for i in range(1, 40))]

    with pytest.raises(RowFailedError) as info:
        send(client, prompts, stop_on_error=True)
    assert info.value.row == 0
    assert info.value.result.error is not None and info.value.result.error.startswith(f"400 from {server.url}{CHAT}: ")
    assert str(info.value) == f"row 0 of the batch failed: {info.value.result.error}"
    assert isinstance(info.value, GenerationError)
    wait_until_idle(client)
    assert len(server.log()) <= 10  # the other rows were not sent

    # without it, the batch runs to the end and the row records its error
    server.reset()
    results = send(client, prompts)
    assert [r.error is not None for r in results] == [True] + [False] * 39
    assert len(server.log()) == 40


def test_stop_on_error_names_the_row_within_the_batch(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url, attempts=2)
    prompts = ["a", "b", "c [[500:5]]", "d"]
    with pytest.raises(RowFailedError) as info:
        send(client, prompts, stop_on_error=True)
    assert info.value.row == 2
    assert info.value.result.error == (
        f"gave up after 2 attempts: 500 from {fake_server.url}{CHAT}: Internal server error (fake_server [[500]])."
    )


def test_row_failed_error_pickles() -> None:
    err = RowFailedError(3, Result(error="400 from x", error_type="http_400", attempts=1))
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.row, copy.result, str(copy)) == (3, err.result, "row 3 of the batch failed: 400 from x")


# -- no I/O before the first batch


def test_creating_a_transform_does_no_network_io(fake_server: FakeServer) -> None:
    from datasets import Dataset

    transform = vllm_generate(fake_server.url)
    repr(transform)
    pickle.dumps(transform)
    transform.client  # noqa: B018 (built, not used)
    stats = fake_server.stats()
    assert (stats["models_requests"], stats["requests"]) == (0, 0)

    out = Dataset.from_dict({"prompt": ["a", "b"]}).map(transform, batched=True)
    assert out["response"] == ["echo: a", "echo: b"]
    stats = fake_server.stats()
    assert (stats["models_requests"], stats["requests"]) == (1, 2)  # the model lookup, once
    transform.close()
