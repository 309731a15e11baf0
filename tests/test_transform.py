"""``vllm_generate`` inside ``Dataset.map``, against the fake vLLM server as a real subprocess.

Every test asserts on the columns written and on what the server received (``FakeServer.log``):
the fake server answers ``"echo: " + <prompt>``, so a row holding another row's response shows.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CHAT, COMPLETIONS, received, user_text
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import Hasher
from fake_server import FakeServer

from vllm_generator import (
    GenerationError,
    ModelSelectionError,
    RecipeError,
    ServerUnavailableError,
    VllmGenerate,
    vllm_generate,
)
from vllm_generator.wire import Result

REPO = Path(__file__).resolve().parent.parent

TEXT_COLUMNS = Features(
    {
        "prompt": Value("string"),
        "response": Value("string"),
        "reasoning": Value("string"),
        "finish_reason": Value("string"),
        "prompt_tokens": Value("int64"),
        "completion_tokens": Value("int64"),
        "error": Value("string"),
    }
)


# --------------------------------------------------------------------------- helpers


def fast(
    base_url: str | list[str],
    *,
    attempts: int = 3,
    timeout: float = 600,
    on_error: str = "record",
    max_wait: float = 1.0,
    **generation: Any,
) -> VllmGenerate:
    """A transform whose retries wait ~10 ms (a Retry-After is honoured up to ``max_wait``)."""
    return vllm_generate(
        base_url, timeout=timeout, max_attempts=attempts, initial_wait=0.01, max_wait=max_wait, on_error=on_error, **generation
    )


def assert_aligned(ds: Dataset, prompt_column: str = "prompt") -> None:
    """Every successful row holds the echo of its own prompt."""
    for row in ds:
        if row["error"] is None:
            assert row["response"] == "echo: " + row[prompt_column], row


def closed_ports(count: int = 1) -> list[int]:
    """Distinct ports on which nothing listens (held together while picked, so never the same)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def closed_port() -> int:
    return closed_ports()[0]


# --------------------------------------------------------------------------- inputs


def test_prompt_column_is_sent_as_the_user_message_after_the_system_prompt(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"question": ["What is 2+2?", "Name a colour."], "id": [1, 2]})
    out = ds.map(vllm_generate(fake_server.url, prompt_column="question", system_prompt="Be brief."), batched=True)

    assert out["response"] == ["echo: What is 2+2?", "echo: Name a colour."]
    assert out["id"] == [1, 2]
    log = fake_server.log()
    assert [e["path"] for e in log] == [CHAT, CHAT]
    assert sorted((e["body"]["messages"] for e in log), key=str) == sorted(
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in ["What is 2+2?", "Name a colour."]),
        key=str,
    )


def test_default_prompt_column_sends_only_a_user_message(fake_server: FakeServer) -> None:
    out = Dataset.from_dict({"prompt": ["hello"]}).map(vllm_generate(fake_server.url), batched=True)

    assert out["response"] == ["echo: hello"]
    (entry,) = fake_server.log()
    assert entry["body"]["messages"] == [{"role": "user", "content": "hello"}]


def test_messages_column_is_sent_as_is_and_gets_the_system_prompt_only_when_missing(fake_server: FakeServer) -> None:
    with_system = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    without_system = [{"role": "user", "content": "only question"}]
    ds = Dataset.from_dict({"chat": [with_system, without_system]})
    out = ds.map(vllm_generate(fake_server.url, messages_column="chat", system_prompt="Default system."), batched=True)

    assert out["response"] == ["echo: second question", "echo: only question"]
    sent = {user_text(e["body"]): e["body"]["messages"] for e in fake_server.log()}
    assert sent == {
        "second question": with_system,
        "only question": [{"role": "system", "content": "Default system."}, *without_system],
    }


def test_template_formats_each_row_from_its_columns(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"question": ["2+2?", "3+3?"], "lang": ["en", "fr"]})
    out = ds.map(vllm_generate(fake_server.url, template="Answer in {lang}: {question}"), batched=True)

    assert out["response"] == ["echo: Answer in en: 2+2?", "echo: Answer in fr: 3+3?"]
    assert sorted(received(fake_server)) == ["Answer in en: 2+2?", "Answer in fr: 3+3?"]


def test_template_missing_column_is_a_recipe_error_before_any_request(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"question": ["2+2?"], "id": [0]})
    with pytest.raises(RecipeError) as info:
        ds.map(vllm_generate(fake_server.url, template="Answer in {lang}: {question}"), batched=True)

    assert str(info.value) == ("the template reads column(s) 'lang' that the dataset does not have; its columns are: question, id")
    assert fake_server.log() == []


def test_missing_prompt_column_is_a_recipe_error_before_any_request(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"text": ["hello"]})
    with pytest.raises(RecipeError, match="the prompt reads column\\(s\\) 'prompt' that the dataset does not have; its columns are: text"):
        ds.map(vllm_generate(fake_server.url), batched=True)
    assert fake_server.log() == []


def test_reused_transform_checks_the_columns_of_every_dataset(fake_server: FakeServer) -> None:
    transform = vllm_generate(fake_server.url, template="Q: {question}")
    first = Dataset.from_dict({"question": ["a"]}).map(transform, batched=True)
    assert first["response"] == ["echo: Q: a"]

    with pytest.raises(RecipeError, match="reads column\\(s\\) 'question' that the dataset does not have"):
        Dataset.from_dict({"other": ["b"]}).map(transform, batched=True)
    assert len(fake_server.log()) == 1


def test_a_row_of_the_wrong_type_is_a_recipe_error_before_any_request(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"prompt": [["not", "text"], ["x"]]})
    with pytest.raises(RecipeError) as info:
        ds.map(vllm_generate(fake_server.url), batched=True)
    assert str(info.value) == "row 0 of the batch: column 'prompt' must hold text, got list (use messages_column for chat messages)"
    assert fake_server.log() == []


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ({"prompt": ["fine", None, "also fine"]}, {}, "not sent: this row's prompt column 'prompt' is null (fill or filter such rows)"),
        (
            {"q": ["fine", "x", "also fine"], "lang": ["en", None, "fr"]},
            {"template": "{lang}: {q}"},
            "not sent: a column of this row's template ('lang', 'q') is null (fill or filter such rows)",
        ),
        (
            {"chat": [[{"role": "user", "content": "fine"}], None, [{"role": "user", "content": "also fine"}]]},
            {"messages_column": "chat"},
            "not sent: this row's prompt column 'chat' is null (fill or filter such rows)",
        ),
    ],
)
def test_a_row_with_a_null_prompt_gets_an_error_and_is_not_sent(
    fake_server: FakeServer, rows: dict[str, list[Any]], options: dict[str, Any], message: str
) -> None:
    out = Dataset.from_dict(rows).map(vllm_generate(fake_server.url, **options), batched=True)

    assert out["error"] == [None, message, None]
    assert out["response"][1] is None and out["finish_reason"][1] is None and out["completion_tokens"][1] == 0
    assert out["response"][0].startswith("echo: ") and out["response"][2].endswith("also fine")
    assert len(fake_server.log()) == 2  # "None" is never sent as text


def test_a_null_prompt_with_on_error_raise_stops_before_any_request(fake_server: FakeServer) -> None:
    with pytest.raises(GenerationError, match=r"^row 1 of the batch failed: not sent: this row's prompt column 'prompt' is null"):
        Dataset.from_dict({"prompt": ["a", None]}).map(vllm_generate(fake_server.url, on_error="raise"), batched=True)
    assert fake_server.log() == []


def test_a_null_prompt_with_on_error_raise_names_the_dataset_row(fake_server: FakeServer) -> None:
    with pytest.raises(GenerationError, match=r"^row 3 failed: not sent: this row's prompt column 'prompt' is null"):
        Dataset.from_dict({"prompt": ["a", "b", "c", None]}).map(
            vllm_generate(fake_server.url, on_error="raise"), batched=True, batch_size=2, with_indices=True
        )


def test_a_map_without_batched_is_refused_before_any_request(fake_server: FakeServer) -> None:
    with pytest.raises(RecipeError, match=r"^vllm_generate is a batched transform: use ds.map\(generate, batched=True"):
        Dataset.from_dict({"prompt": ["hello", "world"]}).map(vllm_generate(fake_server.url))
    with pytest.raises(RecipeError, match="batched transform"):
        Dataset.from_dict({"chat": [[{"role": "user", "content": "hi"}]]}).map(vllm_generate(fake_server.url, messages_column="chat"))
    with pytest.raises(RecipeError, match="batched transform"):  # a list column: one request per element
        Dataset.from_dict({"tags": [["a", "b"]]}).map(vllm_generate(fake_server.url, template="T: {tags}"))
    with pytest.raises(RecipeError, match="batched transform"):
        Dataset.from_dict({"prompt": ["hello"]}).with_format("numpy").map(vllm_generate(fake_server.url))
    assert fake_server.log() == []


@pytest.mark.parametrize("format", ["numpy", "pandas"])
def test_batched_maps_in_other_formats_work(fake_server: FakeServer, format: str) -> None:
    out = Dataset.from_dict({"prompt": ["a", "b", None]}).with_format(format).map(vllm_generate(fake_server.url), batched=True)
    assert out.with_format(None)["response"] == ["echo: a", "echo: b", None]


def test_completion_mode_sends_the_raw_prompt_to_completions(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"prompt": ["Once upon a time", "The end"]})
    out = ds.map(vllm_generate(fake_server.url, mode="completion", max_tokens=20), batched=True)

    assert out["response"] == ["echo: Once upon a time", "echo: The end"]
    log = fake_server.log()
    assert [e["path"] for e in log] == [COMPLETIONS, COMPLETIONS]
    assert sorted(e["body"]["prompt"] for e in log) == ["Once upon a time", "The end"]
    assert all("messages" not in e["body"] for e in log)


def test_rows_keep_their_own_responses_across_batches_when_answers_arrive_out_of_order(fake_server: FakeServer) -> None:
    # later rows of each batch answer first, and 23 rows do not fill the last batch of 5
    prompts = [f"row {i} [[sleep:{0.01 * (5 - i % 5):.2f}]]" for i in range(23)]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url), batched=True, batch_size=5)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert out["error"] == [None] * 23
    assert received(fake_server) == Counter(prompts)  # each row sent once


# --------------------------------------------------------------------------- generation parameters


def test_generation_parameters_reach_the_server_unchanged(fake_server: FakeServer) -> None:
    transform = vllm_generate(
        fake_server.url,
        temperature=0.7,
        max_tokens=50,
        n=2,
        stop=["\n\n", "END"],
        seed=1234,
        top_k=20,
        min_p=0.05,
        structured_outputs={"choice": ["yes", "no"]},
        chat_template_kwargs={"custom_flag": True},
        extra_body={"repetition_penalty": 1.1, "priority": 3},
    )
    Dataset.from_dict({"prompt": ["hi"]}).map(transform, batched=True)

    (entry,) = fake_server.log()
    assert entry["body"] == {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "max_tokens": 50,
        "n": 2,
        "stop": ["\n\n", "END"],
        "seed": 1234,
        "top_k": 20,
        "min_p": 0.05,
        "structured_outputs": {"choice": ["yes", "no"]},
        "chat_template_kwargs": {"custom_flag": True},
        "repetition_penalty": 1.1,
        "priority": 3,
    }


def test_extra_body_overrides_named_parameters(fake_server: FakeServer) -> None:
    transform = vllm_generate(fake_server.url, temperature=0.7, extra_body={"temperature": 0.1})
    Dataset.from_dict({"prompt": ["hi"]}).map(transform, batched=True)
    assert fake_server.log()[0]["body"]["temperature"] == 0.1


@pytest.mark.parametrize(
    ("thinking", "expected"),
    [(True, {"enable_thinking": True}), (False, {"enable_thinking": False}), (None, None)],
)
def test_thinking_sets_enable_thinking(fake_server: FakeServer, thinking: bool | None, expected: dict[str, bool] | None) -> None:
    Dataset.from_dict({"prompt": ["hi"]}).map(vllm_generate(fake_server.url, thinking=thinking), batched=True)

    body = fake_server.log()[0]["body"]
    assert body.get("chat_template_kwargs") == expected
    assert "thinking" not in body


def test_thinking_merges_with_chat_template_kwargs(fake_server: FakeServer) -> None:
    transform = vllm_generate(fake_server.url, thinking=False, chat_template_kwargs={"custom_flag": 1})
    Dataset.from_dict({"prompt": ["hi"]}).map(transform, batched=True)
    assert fake_server.log()[0]["body"]["chat_template_kwargs"] == {"custom_flag": 1, "enable_thinking": False}


def test_guided_fields_in_extra_body_are_a_recipe_error() -> None:
    with pytest.raises(RecipeError) as info:
        vllm_generate("http://127.0.0.1:9", extra_body={"guided_choice": ["yes", "no"]})
    assert str(info.value) == (
        "vllm_generate: generation: extra_body.guided_choice is ignored by current vLLM (it answers unconstrained): "
        "use generation.structured_outputs, e.g. {'choice': ['yes', 'no']} or {'regex': '...'}"
    )


def test_a_misspelt_keyword_is_a_recipe_error_naming_it() -> None:
    with pytest.raises(RecipeError) as info:
        vllm_generate("http://127.0.0.1:9", temprature=0.5)
    assert str(info.value) == "vllm_generate: temprature: unknown field (check the spelling; see the README's recipe reference)"


def test_an_invalid_value_is_a_recipe_error_naming_the_keyword() -> None:
    with pytest.raises(RecipeError, match="^vllm_generate: temperature: Input should be greater than or equal to 0$"):
        vllm_generate("http://127.0.0.1:9", temperature=-1)


# --------------------------------------------------------------------------- model resolution


def test_model_omitted_uses_the_servers_only_model(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--model", "only-model")
    out = Dataset.from_dict({"prompt": ["a", "b"]}).map(vllm_generate(server.url), batched=True)

    assert out["response"] == ["echo: a", "echo: b"]
    assert [e["body"]["model"] for e in server.log()] == ["only-model", "only-model"]


def test_model_omitted_with_two_served_models_is_a_model_selection_error(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--model", "a", "--model", "b")
    with pytest.raises(ModelSelectionError) as info:
        Dataset.from_dict({"prompt": ["x", "y"]}).map(vllm_generate(server.url), batched=True)

    assert str(info.value) == f"{server.url} serves 2 models (a, b): choose one with model=..."
    assert server.log() == []


def test_a_model_the_server_does_not_serve_is_a_model_selection_error(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--model", "a", "--model", "b")
    with pytest.raises(ModelSelectionError) as info:
        Dataset.from_dict({"prompt": ["x"]}).map(vllm_generate(server.url, model="c"), batched=True)

    assert str(info.value) == f"{server.url} does not serve model 'c'; it serves: a, b"
    assert server.log() == []


def test_a_named_model_is_sent(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--model", "a", "--model", "b")
    Dataset.from_dict({"prompt": ["x"]}).map(vllm_generate(server.url, model="b"), batched=True)
    assert [e["body"]["model"] for e in server.log()] == ["b"]


# --------------------------------------------------------------------------- output columns


def test_output_columns_and_their_types(fake_server: FakeServer) -> None:
    out = Dataset.from_dict({"prompt": ["one two", "three"]}).map(vllm_generate(fake_server.url), batched=True)

    assert out.features == TEXT_COLUMNS
    assert out.to_list() == [
        # the fake server counts words as tokens
        {
            "prompt": "one two",
            "response": "echo: one two",
            "reasoning": None,
            "finish_reason": "stop",
            "prompt_tokens": 2,
            "completion_tokens": 3,
            "error": None,
        },
        {
            "prompt": "three",
            "response": "echo: three",
            "reasoning": None,
            "finish_reason": "stop",
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "error": None,
        },
    ]


def test_n_above_one_gives_lists_of_length_n_also_for_failed_rows(fake_server: FakeServer) -> None:
    prompts = ["a", "b [[400]]", "c"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, n=3), batched=True, batch_size=2)

    text_list = List(Value("string"))
    assert out.features == Features({**TEXT_COLUMNS, "response": text_list, "reasoning": text_list, "finish_reason": text_list})
    assert out["response"] == [["echo: a #0", "echo: a #1", "echo: a #2"], [None] * 3, ["echo: c #0", "echo: c #1", "echo: c #2"]]
    assert out["finish_reason"] == [["stop"] * 3, [None] * 3, ["stop"] * 3]
    assert out["reasoning"] == [[None] * 3] * 3
    assert [e is None for e in out["error"]] == [True, False, True]
    assert all(e["body"]["n"] == 3 for e in fake_server.log())


@pytest.mark.parametrize("n", [1, 3])
def test_the_runner_s_arrow_table_matches_the_map_columns(fake_server: FakeServer, n: int) -> None:
    # the recipe runner maps generated_table (new columns only, as Arrow); the public transform
    # returns numpy columns: both must give the same types and values, failed rows included
    ds = Dataset.from_dict({"prompt": ["a", "b [[400]]", "c"], "other": [1, 2, 3]})
    transform = fast(fake_server.url, n=n, logprobs=True)
    public = ds.map(transform, batched=True)
    runner = ds.map(transform.generated_table, batched=True, input_columns=transform.prompt_columns, with_indices=True)

    assert runner.column_names == [*(c for c in public.column_names if c not in ("prompt", "other"))]
    assert runner.features == Features({k: v for k, v in public.features.items() if k in runner.column_names})
    # the fake server's logprobs differ per request: compare the rest
    keep = [c for c in runner.column_names if c != "logprobs"]
    assert runner.select_columns(keep).to_list() == public.select_columns(keep).to_list()
    assert [x is None for x in runner["logprobs"]] == [False, True, False]


def test_a_non_text_field_from_a_server_is_written_as_text_by_both_paths() -> None:
    # vLLM always sends text; another server might not: the row is written, not the run aborted
    transform = vllm_generate("http://127.0.0.1:9", model="m")
    results = [Result(response="a", reasoning={"x": 1}, finish_reason="stop", prompt_tokens=1, completion_tokens=True)]  # type: ignore[arg-type]
    table = transform.new_columns.arrow(results).to_pylist()
    columns = {k: v.tolist() for k, v in transform.new_columns.numpy(results).items()}
    assert table == [{k: v[0] for k, v in columns.items()}]
    assert table[0]["reasoning"] == "{'x': 1}" and table[0]["completion_tokens"] == 1


def test_output_columns_can_be_renamed(fake_server: FakeServer) -> None:
    transform = vllm_generate(fake_server.url, columns={"response": "answer", "error": "failure"})
    out = Dataset.from_dict({"prompt": ["a"]}).map(transform, batched=True)

    assert out.column_names == ["prompt", "answer", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens", "failure"]
    assert out["answer"] == ["echo: a"]
    assert out["failure"] == [None]


def test_a_later_failed_batch_keeps_the_error_column_text(fake_server: FakeServer) -> None:
    prompts = ["a", "b", "c", "d [[400]]"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url), batched=True, batch_size=2)

    assert out.features == TEXT_COLUMNS
    assert out["error"][:3] == [None, None, None]
    assert "maximum context length" in out["error"][3]
    assert out["response"] == ["echo: a", "echo: b", "echo: c", None]


def test_a_first_batch_of_only_failures_keeps_every_column_type(fake_server: FakeServer) -> None:
    prompts = ["a [[400]]", "b [[400]]", "c", "d"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url), batched=True, batch_size=2)

    assert out.features == TEXT_COLUMNS
    assert out["response"] == [None, None, "echo: c", "echo: d"]
    assert out["finish_reason"] == [None, None, "stop", "stop"]
    assert out["prompt_tokens"] == [0, 0, 1, 1]
    assert [e is None for e in out["error"]] == [False, False, True, True]


# --------------------------------------------------------------------------- reasoning


@pytest.mark.parametrize(
    ("shape", "answer", "finish_reason"),
    [
        ("field", "echo: {p}", "stop"),  # message.reasoning
        ("legacy", "echo: {p}", "stop"),  # message.reasoning_content
        ("inline", "echo: {p}", "stop"),  # <think>r</think>a in content
        ("close_only", "echo: {p}", "stop"),  # r</think>a (template put <think> in the prompt)
        ("unclosed", "", "length"),  # <think>r ... cut off
        ("field_unclosed", "", "length"),  # reasoning set, content null
    ],
)
def test_reasoning_goes_to_its_own_column_in_every_shape(fake_server: FakeServer, shape: str, answer: str, finish_reason: str) -> None:
    prompt = f"why? [[reasoning:{shape}]]"
    out = Dataset.from_dict({"prompt": [prompt]}).map(vllm_generate(fake_server.url), batched=True)

    row = out[0]
    assert row["response"] == answer.format(p=prompt)
    assert row["reasoning"] == "thinking about " + prompt
    assert row["finish_reason"] == finish_reason
    assert row["error"] is None


@pytest.mark.parametrize(("shape", "answer"), [("inline", "echo: {p}"), ("close_only", "echo: {p}"), ("unclosed", "")])
def test_reasoning_is_split_out_of_completion_text(fake_server: FakeServer, shape: str, answer: str) -> None:
    prompt = f"why? [[reasoning:{shape}]]"
    out = Dataset.from_dict({"prompt": [prompt]}).map(vllm_generate(fake_server.url, mode="completion"), batched=True)

    assert out[0]["response"] == answer.format(p=prompt)
    assert out[0]["reasoning"] == "thinking about " + prompt


def test_parse_reasoning_off_keeps_think_tags_in_the_response(fake_server: FakeServer) -> None:
    prompt = "why? [[reasoning:inline]]"
    transform = vllm_generate(fake_server.url, parse_reasoning=False)
    out = Dataset.from_dict({"prompt": [prompt]}).map(transform, batched=True)

    assert out[0]["response"] == f"<think>thinking about {prompt}</think>\n\necho: {prompt}"
    assert out[0]["reasoning"] is None


@pytest.mark.parametrize(
    "off",
    [
        {"thinking": False},
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},  # what is sent decides
    ],
)
def test_with_thinking_off_a_stray_think_end_stays_in_the_answer(fake_server: FakeServer, off: dict[str, Any]) -> None:
    # vLLM leaves a literal "</think>" in content when enable_thinking is false: it is answer text
    prompt = "why? [[reasoning:close_only]]"
    out = Dataset.from_dict({"prompt": [prompt]}).map(vllm_generate(fake_server.url, **off), batched=True)

    assert out[0]["response"] == f"thinking about {prompt}</think>\n\necho: {prompt}"
    assert out[0]["reasoning"] is None


def test_thinking_on_wins_over_chat_template_kwargs_and_the_reasoning_is_parsed(fake_server: FakeServer) -> None:
    prompt = "why? [[reasoning:close_only]]"
    transform = vllm_generate(fake_server.url, thinking=True, chat_template_kwargs={"enable_thinking": False})
    out = Dataset.from_dict({"prompt": [prompt]}).map(transform, batched=True)

    assert fake_server.log()[0]["body"]["chat_template_kwargs"] == {"enable_thinking": True}
    assert (out[0]["reasoning"], out[0]["response"]) == (f"thinking about {prompt}", f"echo: {prompt}")


@pytest.mark.parametrize("logprobs", [0, 2])
def test_completion_logprobs_count_zero_still_gets_its_column(fake_server: FakeServer, logprobs: int) -> None:
    out = Dataset.from_dict({"prompt": ["hi"]}).map(vllm_generate(fake_server.url, mode="completion", logprobs=logprobs), batched=True)

    assert fake_server.log()[0]["body"]["logprobs"] == logprobs
    assert "logprobs" in out.column_names and out["logprobs"] == ["[null]"]  # the fake server sends null logprobs


# --------------------------------------------------------------------------- retries and errors


def test_two_503s_then_success_sends_the_row_three_times(fake_server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    prompts = ["a", "b [[503:2]]", "c"]
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    # a fixed cap: a 503 spends an attempt like any retryable failure (with adaptive targets it is
    # backpressure that spends none: test_adaptive.py)
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, attempts=3, max_concurrency=8), batched=True)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert out["error"] == [None, None, None]
    assert received(fake_server) == Counter({"a": 1, "b [[503:2]]": 3, "c": 1})
    # one warning per retry, saying which attempt comes next and why
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying")]
    assert [m.split("]")[0].split("[")[1] for m in retries] == ["2/3", "3/3"]
    assert all(m.endswith(f": 503 from {fake_server.url}/v1/chat/completions: Service unavailable (fake_server [[503]]).") for m in retries)


def test_429_waits_for_retry_after(fake_server: FakeServer) -> None:
    prompt = "a [[429]] [[retry_after:0.3]]"
    # backoff without Retry-After would be ~10 ms here, so the gap shows which one was used
    out = Dataset.from_dict({"prompt": [prompt]}).map(fast(fake_server.url), batched=True)

    assert out["response"] == ["echo: " + prompt]
    first, second = fake_server.log()
    assert 0.3 <= second["t"] - first["t"] < 10  # not the usual backoff; loose: this machine may be busy


def test_retry_after_is_capped_by_max_wait(fake_server: FakeServer) -> None:
    prompt = "a [[429]] [[retry_after:30]]"
    out = Dataset.from_dict({"prompt": [prompt]}).map(fast(fake_server.url, max_wait=0.2), batched=True)

    assert out["response"] == ["echo: " + prompt]
    first, second = fake_server.log()
    assert 0.2 <= second["t"] - first["t"] < 10  # far from the 30 s asked for


def test_a_dropped_connection_is_retried(fake_server: FakeServer) -> None:
    prompts = ["a [[drop]]", "b"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url), batched=True)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert received(fake_server) == Counter({"a [[drop]]": 2, "b": 1})


def test_a_malformed_body_is_retried(fake_server: FakeServer) -> None:
    prompts = ["a [[malformed]]", "b"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url), batched=True)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert received(fake_server) == Counter({"a [[malformed]]": 2, "b": 1})


def test_a_hung_request_times_out_and_the_retry_succeeds(fake_server: FakeServer) -> None:
    prompts = ["a [[hang:1]]", "b"]
    started = time.monotonic()
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, timeout=0.5), batched=True)

    assert time.monotonic() - started >= 0.5
    assert out["response"] == ["echo: " + p for p in prompts]
    assert out["error"] == [None, None]
    assert received(fake_server) == Counter({"a [[hang:1]]": 2, "b": 1})


def test_a_request_that_always_hangs_records_a_timeout(fake_server: FakeServer) -> None:
    out = Dataset.from_dict({"prompt": ["a [[hang:5]]"]}).map(fast(fake_server.url, timeout=0.3, attempts=2), batched=True)

    assert out["response"] == [None]
    assert out["error"] == [f"gave up after 2 attempts: no answer from {fake_server.url} within 0.3s"]
    assert received(fake_server) == Counter({"a [[hang:5]]": 2})


def test_a_400_is_recorded_with_the_servers_message_and_not_retried(fake_server: FakeServer) -> None:
    prompts = ["a", "too long [[400]]", "c"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, attempts=5), batched=True)

    assert out["response"] == ["echo: a", None, "echo: c"]
    assert out["error"] == [
        None,
        (
            f"400 from {fake_server.url}/v1/chat/completions: This model's maximum context length is 512 tokens. "
            "However, you requested 900 tokens."
        ),
        None,
    ]
    assert received(fake_server) == Counter({"a": 1, "too long [[400]]": 1, "c": 1})


def test_a_row_that_exhausts_its_attempts_records_them(fake_server: FakeServer) -> None:
    prompts = ["a", "b [[500:10]]"]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, attempts=2), batched=True)

    assert out["response"] == ["echo: a", None]
    assert out["error"][1] == (
        f"gave up after 2 attempts: 500 from {fake_server.url}/v1/chat/completions: Internal server error (fake_server [[500]])."
    )
    assert received(fake_server) == Counter({"a": 1, "b [[500:10]]": 2})


def test_a_single_attempt_is_not_retried(fake_server: FakeServer) -> None:
    out = Dataset.from_dict({"prompt": ["b [[503]]"]}).map(fast(fake_server.url, attempts=1, max_concurrency=8), batched=True)

    assert out["error"][0].startswith("gave up after 1 attempts: 503 from ")
    assert received(fake_server) == Counter({"b [[503]]": 1})


def test_on_error_raise_names_the_row(fake_server: FakeServer) -> None:
    prompts = ["a", "b", "c", "d [[400]]"]
    with pytest.raises(GenerationError) as info:
        Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, on_error="raise"), batched=True, batch_size=2)

    assert str(info.value) == (
        f"row 1 of the batch failed: 400 from {fake_server.url}/v1/chat/completions: This model's maximum context "
        "length is 512 tokens. However, you requested 900 tokens. (prompt: 'd [[400]]')"
    )


def test_on_error_raise_shows_the_rows_own_text_not_the_system_prompt(fake_server: FakeServer) -> None:
    transform = fast(fake_server.url, on_error="raise", system_prompt="You are a very helpful assistant. " * 10)
    with pytest.raises(GenerationError, match=r"\(prompt: 'the bad row \[\[400\]\]'\)$"):
        Dataset.from_dict({"prompt": ["the bad row [[400]]"]}).map(transform, batched=True)


def test_on_error_raise_stops_at_the_first_failed_row(fake_server: FakeServer) -> None:
    # 16 in flight: the failing row is answered while most of the batch still waits in the client
    # (the server logs a request as it arrives)
    prompts = ["bad [[400]]"] + [f"row {i} [[sleep:0.2]]" for i in range(99)]
    transform = fast(fake_server.url, on_error="raise", max_concurrency=16)
    with pytest.raises(GenerationError, match=r"^row 0 of the batch failed: 400 from "):
        Dataset.from_dict({"prompt": prompts}).map(transform, batched=True, batch_size=100)
    assert len(fake_server.log()) < 40  # not the whole batch


def test_on_error_raise_names_the_dataset_row_with_indices(fake_server: FakeServer) -> None:
    prompts = ["a", "b", "c", "d [[400]]"]
    with pytest.raises(GenerationError, match="^row 3 failed: 400 from "):
        Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, on_error="raise"), batched=True, batch_size=2, with_indices=True)


def test_mixed_faults_never_give_a_row_another_rows_response(fake_server: FakeServer) -> None:
    faults = ["", "[[503:2]]", "[[drop]]", "[[malformed]]", "[[500]]", "[[429]] [[retry_after:0.05]]", "[[400]]"]
    prompts = [f"row {i} {faults[i % len(faults)]}".strip() for i in range(28)]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(fake_server.url, attempts=4), batched=True, batch_size=6)

    assert out["response"] == [None if "[[400]]" in p else "echo: " + p for p in prompts]
    assert [e is not None for e in out["error"]] == ["[[400]]" in p for p in prompts]
    assert set(received(fake_server)) == set(prompts)


# --------------------------------------------------------------------------- several servers


def test_requests_spread_over_two_servers_without_duplicates(start_fake_server: Callable[..., FakeServer]) -> None:
    first, second = start_fake_server("--latency", "0.02"), start_fake_server("--latency", "0.02")
    prompts = [f"row {i}" for i in range(20)]
    out = Dataset.from_dict({"prompt": prompts}).map(vllm_generate([first.url, second.url]), batched=True, batch_size=8)

    assert out["response"] == ["echo: " + p for p in prompts]
    got_first, got_second = received(first), received(second)
    assert got_first and got_second
    assert got_first + got_second == Counter(prompts)


@pytest.mark.parametrize("dead_first", [True, False], ids=["dead-first", "dead-second"])
def test_a_dead_server_is_skipped_and_reported(
    start_fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture, dead_first: bool
) -> None:
    dead, alive = start_fake_server(), start_fake_server()
    dead.kill()
    prompts = [f"row {i}" for i in range(12)]
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    # listed first, the dead server is also the one asked for the model name
    urls = [dead.url, alive.url] if dead_first else [alive.url, dead.url]
    out = Dataset.from_dict({"prompt": prompts}).map(fast(urls, attempts=5), batched=True)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert out["error"] == [None] * 12
    assert received(alive) == Counter(prompts)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(dead.url in m for m in warned), warned


def test_a_server_killed_mid_run_loses_no_row(start_fake_server: Callable[..., FakeServer]) -> None:
    doomed = start_fake_server("--slots", "4", "--latency", "0.05")
    survivor = start_fake_server("--slots", "4", "--latency", "0.05")
    prompts = [f"row {i}" for i in range(200)]
    before_kill: list[int] = []

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and doomed.stats()["requests"] < 40:
            time.sleep(0.01)
        before_kill.append(doomed.stats()["requests"])
        doomed.kill()  # with requests in flight

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    out = Dataset.from_dict({"prompt": prompts}).map(fast([doomed.url, survivor.url], attempts=5), batched=True, batch_size=50)
    killer.join()

    assert out["error"] == [None] * 200
    assert out["response"] == ["echo: " + p for p in prompts]  # every row its own answer
    assert 40 <= before_kill[0] < 200
    assert len(set(received(survivor))) >= 200 - before_kill[0]  # the dead server's rows went to the other


def test_all_servers_down_is_server_unavailable_naming_them() -> None:
    urls = [f"http://127.0.0.1:{port}" for port in closed_ports(2)]
    with pytest.raises(ServerUnavailableError) as info:
        Dataset.from_dict({"prompt": ["a", "b"]}).map(fast(urls), batched=True)

    assert isinstance(info.value, ConnectionError)
    for url in urls:
        assert url in str(info.value)
    assert "is the vLLM server running?" in str(info.value)


def test_one_server_down_is_server_unavailable_naming_it() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ServerUnavailableError, match=f"^cannot list models at {url}/v1/models"):
        Dataset.from_dict({"prompt": ["a"]}).map(vllm_generate(url), batched=True)


# --------------------------------------------------------------------------- concurrency


def test_max_concurrency_bounds_requests_in_flight(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--slots", "100", "--latency", "0.2")
    prompts = [f"row {i}" for i in range(12)]
    out = Dataset.from_dict({"prompt": prompts}).map(vllm_generate(server.url, max_concurrency=4), batched=True)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert server.stats()["max_in_flight"] == 4


# --------------------------------------------------------------------------- caching and fingerprints


def parquet_dataset(tmp_path: Path, prompts: list[str]) -> Dataset:
    path = tmp_path / "input.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    return Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))


def test_an_equal_transform_reuses_the_cache_and_a_changed_one_does_not(fake_server: FakeServer, tmp_path: Path) -> None:
    prompts = [f"row {i}" for i in range(6)]
    ds = parquet_dataset(tmp_path, prompts)

    first = ds.map(vllm_generate(fake_server.url, temperature=0.2), batched=True, batch_size=4)
    assert first["response"] == ["echo: " + p for p in prompts]
    assert len(fake_server.log()) == 6

    again = ds.map(vllm_generate(fake_server.url, temperature=0.2), batched=True, batch_size=4)
    assert again["response"] == first["response"]
    assert len(fake_server.log()) == 6  # nothing sent: read from the cache file

    changed = ds.map(vllm_generate(fake_server.url, temperature=0.9), batched=True, batch_size=4)
    assert changed["response"] == first["response"]
    log = fake_server.log()
    assert len(log) == 12
    assert [e["body"]["temperature"] for e in log[6:]] == [0.9] * 6


_HASH_CODE = """
from datasets.fingerprint import Hasher
from vllm_generator import vllm_generate
print(Hasher.hash(vllm_generate("http://127.0.0.1:9", model="m", temperature=0.3, max_tokens=7, system_prompt="Be brief.", api_key={key!r})))
"""


def hash_in_this_process(api_key: str | None, temperature: float = 0.3) -> str:
    return str(
        Hasher.hash(
            vllm_generate(
                "http://127.0.0.1:9", model="m", temperature=temperature, max_tokens=7, system_prompt="Be brief.", api_key=api_key
            )
        )
    )


def test_the_fingerprint_is_the_same_in_another_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _HASH_CODE.format(key="secret-1")], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    )
    assert proc.stdout.strip() == hash_in_this_process("secret-1")


def test_the_fingerprint_ignores_the_api_key_but_not_the_parameters() -> None:
    assert hash_in_this_process("secret-1") == hash_in_this_process("secret-2") == hash_in_this_process(None)
    assert hash_in_this_process("secret-1", temperature=0.4) != hash_in_this_process("secret-1")


def test_the_api_key_is_not_in_the_repr_or_the_pickle() -> None:
    transform = vllm_generate("http://127.0.0.1:9", api_key="very-secret-key")
    assert "very-secret-key" not in repr(transform)
    assert b"very-secret-key" not in pickle.dumps(transform)
    assert "very-secret-key" not in repr(transform.connect())


# --------------------------------------------------------------------------- API key


def test_the_api_key_is_sent_as_a_bearer_token(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--api-key", "secret")
    out = Dataset.from_dict({"prompt": ["a", "b"]}).map(vllm_generate(server.url, api_key="secret"), batched=True)

    assert out["response"] == ["echo: a", "echo: b"]
    assert out["error"] == [None, None]
    assert [e["headers"]["has_auth"] for e in server.log()] == [True, True]


def test_the_api_key_is_read_from_vllm_api_key(start_fake_server: Callable[..., FakeServer], monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_fake_server("--api-key", "secret")
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    out = Dataset.from_dict({"prompt": ["a"]}).map(vllm_generate(server.url), batched=True)

    assert out["response"] == ["echo: a"]
    assert [e["headers"]["has_auth"] for e in server.log()] == [True]


def test_a_missing_api_key_stops_before_any_generation_request(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--api-key", "secret")
    with pytest.raises(RecipeError, match=r"refused the API key \(401: .*\): pass api_key=\.\.\., set VLLM_API_KEY"):
        Dataset.from_dict({"prompt": ["a"]}).map(vllm_generate(server.url), batched=True)
    assert server.log() == []


# --------------------------------------------------------------------------- lifecycle


def test_one_transform_serves_two_maps(fake_server: FakeServer) -> None:
    transform = vllm_generate(fake_server.url)
    first = Dataset.from_dict({"prompt": ["a", "b"]}).map(transform, batched=True)
    second = Dataset.from_dict({"prompt": ["c", "d", "e"]}).map(transform, batched=True, batch_size=2)

    assert first["response"] == ["echo: a", "echo: b"]
    assert second["response"] == ["echo: c", "echo: d", "echo: e"]
    assert received(fake_server) == Counter("abcde")


def test_map_works_while_an_event_loop_runs_in_the_calling_thread(fake_server: FakeServer) -> None:
    # what a Jupyter cell does: a synchronous ds.map called from inside a running loop
    ds = Dataset.from_dict({"prompt": ["a", "b", "c"]})

    async def cell() -> Dataset:
        asyncio.get_running_loop()  # a loop is running here
        return ds.map(vllm_generate(fake_server.url), batched=True, batch_size=2)

    out = asyncio.run(cell())
    assert out["response"] == ["echo: a", "echo: b", "echo: c"]


def test_num_proc_2_on_a_parquet_dataset_keeps_rows_aligned(start_fake_server: Callable[..., FakeServer], tmp_path: Path) -> None:
    # the key is not pickled: the worker processes must still send it
    server = start_fake_server("--api-key", "secret")
    prompts = [f"row {i} [[sleep:{0.01 * (i % 3):.2f}]]" for i in range(10)]
    ds = parquet_dataset(tmp_path, prompts)
    out = ds.map(vllm_generate(server.url, api_key="secret"), batched=True, batch_size=3, num_proc=2)

    assert out["response"] == ["echo: " + p for p in prompts]
    assert out["error"] == [None] * 10
    assert received(server) == Counter(prompts)


def test_a_dropped_transform_closes_its_http_session(fake_server: FakeServer) -> None:
    transform = vllm_generate(fake_server.url)
    Dataset.from_dict({"prompt": ["a"]}).map(transform, batched=True)
    session = transform.connect()._session
    assert session is not None and not session.closed
    session_ref = weakref.ref(session)
    del session

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del transform
        deadline = time.monotonic() + 2
        while session_ref() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
    # aiohttp warns "Unclosed client session" when it collects a session that is still open
    assert [str(w.message).split(" <")[0] for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert session_ref() is None
