"""Structured outputs: ``output_schema`` as the request's ``response_format``, the ``parsed``
column's Arrow type, and answers that do not fit. Against the fake server, which answers a
json_schema request with JSON that follows the schema (strings are the echo of the prompt)."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conformance import check_request
from conftest import CHAT, write_recipe
from datasets import Dataset
from fake_server import FakeServer
from pydantic import BaseModel

from vllm_generator import GenerationError, RecipeError, vllm_generate
from vllm_generator.recipe import load_recipe
from vllm_generator.run import run_recipe
from vllm_generator.structured import SchemaError, compile_schema, load_schema

REPO = Path(__file__).resolve().parent.parent


class Colour(enum.StrEnum):
    red = "red"
    green = "green"


class Place(BaseModel):
    city: str
    rank: int


class Answer(BaseModel):
    """Every kind the parsed column maps: strings, integers, numbers, booleans, enums, lists,
    nested objects, optional (nullable) fields."""

    text: str
    words: int
    score: float
    ok: bool
    colour: Colour
    tags: list[str]
    place: Place
    places: list[Place]
    note: str | None = None


ANSWER_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("words", pa.int64()),
        ("score", pa.float64()),
        ("ok", pa.bool_()),
        ("colour", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("place", pa.struct([("city", pa.string()), ("rank", pa.int64())])),
        ("places", pa.list_(pa.struct([("city", pa.string()), ("rank", pa.int64())]))),
        ("note", pa.string()),
    ]
)


def generate(url: str, **kwargs: Any) -> Any:
    return vllm_generate(url, max_attempts=2, initial_wait=0.01, max_wait=0.05, **kwargs)


def expected(prompt: str) -> dict[str, Any]:
    """What the fake server answers to ``prompt`` for the Answer schema."""
    echo = "echo: " + prompt
    place = {"city": echo, "rank": len(prompt.split())}
    return {
        "text": echo,
        "words": len(prompt.split()),
        "score": 0.5,
        "ok": True,
        "colour": "red",
        "tags": [echo, echo],
        "place": place,
        "places": [place, place],
        "note": None,
    }


# --------------------------------------------------------------------------- schema -> Arrow type


def test_every_schema_kind_gets_its_arrow_type() -> None:
    assert compile_schema(Answer.model_json_schema()).arrow_type() == ANSWER_TYPE
    assert compile_schema({"type": "array", "items": {"type": "integer"}}).arrow_type() == pa.list_(pa.int64())
    assert compile_schema({"enum": [1, 2, None]}).arrow_type() == pa.int64()
    shape = compile_schema({"type": ["number", "null"]})
    assert (shape.kind, shape.nullable) == ("number", True)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object"}, "$: an object needs properties"),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "$: anyOf of several types has no single column type"),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, "$.a: an array needs one items schema"),
        ({"enum": ["a", 1]}, "$: enum values ['a', 1] mix types"),
        ({"$ref": "#/$defs/Missing"}, "$: #/$defs/Missing points to nothing"),
        (
            {"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"},
            "$.next: #/$defs/N refers to itself",
        ),
    ],
)
def test_a_schema_without_a_column_type_is_refused_naming_the_place(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError) as info:
        compile_schema(schema)
    assert str(info.value).startswith(message)
    with pytest.raises(RecipeError) as refused:
        vllm_generate("http://localhost:8000", output_schema=schema)
    assert str(refused.value).startswith("vllm_generate: output_schema: " + message)


def test_load_schema_takes_a_model_a_dict_a_json_file_and_module_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = Answer.model_json_schema()
    (tmp_path / "answer.json").write_text(json.dumps(schema))
    (tmp_path / "my_schemas.py").write_text("from pydantic import BaseModel\nclass Q(BaseModel):\n    a: int\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_schema(Answer) == schema
    assert load_schema(schema) == schema
    assert load_schema(str(tmp_path / "answer.json")) == schema
    assert load_schema("my_schemas:Q")["properties"] == {"a": {"title": "A", "type": "integer"}}
    for bad, message in [
        (str(tmp_path / "none.json"), f"cannot read the schema file {tmp_path / 'none.json'} (No such file or directory)"),
        ("my_schemas:Nope", "cannot import my_schemas:Nope (AttributeError"),
        ("json:dumps", "json:dumps is a function, not a pydantic model class"),
        ("answer", "'answer' is neither a .json file nor module:Class"),
        (3, "give a pydantic model class, a JSON schema dict, a .json file or module:Class, not int"),
    ]:
        with pytest.raises(SchemaError) as info:
            load_schema(bad)
        assert str(info.value).startswith(message), str(info.value)


def test_output_schema_conflicts_are_refused() -> None:
    for other in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"choice": ["a"]}}):
        with pytest.raises(RecipeError, match="output_schema sets response_format itself: leave out"):
            vllm_generate("http://localhost:8000", output_schema=Answer, **other)
    with pytest.raises(RecipeError, match="output_schema applies to mode 'chat'"):
        vllm_generate("http://localhost:8000", output_schema=Answer, mode="completion")


# --------------------------------------------------------------------------- against the fake server


def test_answers_fill_a_typed_parsed_column_and_the_schema_is_sent(fake_server: FakeServer) -> None:
    prompts = [f"question {i}" for i in range(6)]
    out = Dataset.from_dict({"prompt": prompts}).map(generate(fake_server.url, output_schema=Answer), batched=True, batch_size=4)
    assert out.data.table.schema.field("parsed").type == ANSWER_TYPE
    assert out["parsed"] == [expected(p) for p in prompts]
    assert out["error"] == [None] * 6
    # the raw answer stays in response, and the one-liner gives the model back
    assert [json.loads(r) for r in out["response"]] == out["parsed"]
    assert Answer.model_validate(out[2]["parsed"]) == Answer.model_validate(expected("question 2"))
    bodies = [e["body"] for e in fake_server.log()]
    assert len(bodies) == 6
    for body in bodies:
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "Answer", "schema": Answer.model_json_schema(), "strict": True},
        }
        check_request(CHAT, body)  # the SDK's own type for response_format json_schema
        assert "output_schema" not in body


def test_an_answer_that_does_not_fit_is_a_parse_error_with_the_raw_text_kept(fake_server: FakeServer) -> None:
    prompts = ["question 0", "question 1 [[json:bad]]", "question 2 [[json:wrong]]", "question 3"]
    out = Dataset.from_dict({"prompt": prompts}).map(generate(fake_server.url, output_schema=Answer), batched=True)
    rows = out.to_list()
    assert [r["parsed"] is not None for r in rows] == [True, False, False, True]
    assert rows[1]["response"] == "echo: question 1 [[json:bad]] {not json"
    assert rows[1]["error"].startswith("parse: the answer is not valid JSON (")
    assert rows[2]["error"] == "parse: $.text is missing (required by the schema)"
    assert json.loads(rows[2]["response"])["words"] == 3  # the raw text, as the server sent it
    assert rows[2]["finish_reason"] == "stop" and rows[2]["completion_tokens"] > 0
    assert [r["error"] for r in (rows[0], rows[3])] == [None, None]
    assert len(fake_server.log()) == 4  # a parse error is a result: not retried


def test_a_truncated_answer_says_max_tokens_cut_it(fake_server: FakeServer) -> None:
    out = Dataset.from_dict({"prompt": ["question 0"]}).map(generate(fake_server.url, output_schema=Answer, max_tokens=5), batched=True)
    row = out[0]
    assert row["finish_reason"] == "length" and row["parsed"] is None
    assert row["error"].startswith("parse: the answer is not valid JSON (")
    assert row["error"].endswith("(finish_reason length: max_tokens cut the answer; raise max_tokens)")


def test_n_above_one_gives_a_list_of_values_and_names_the_choice_that_failed(fake_server: FakeServer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    prompts = ["question 0", "question 1", "question 2 [[500:9]]"]
    out = Dataset.from_dict({"prompt": prompts}).map(generate(fake_server.url, output_schema=schema, n=2), batched=True)
    assert out.data.table.schema.field("parsed").type == pa.list_(pa.struct([("a", pa.string())]))
    assert out[0]["parsed"] == [{"a": "echo: question 0 #0"}, {"a": "echo: question 0 #1"}]
    assert out[2]["parsed"] == [None, None] and out[2]["error"].startswith("gave up after 2 attempts")
    # choices parse one by one: a bad one is named, the good one keeps its value
    from vllm_generator.structured import Structured
    from vllm_generator.wire import Result

    result = Structured.from_schema(schema).apply(Result(response=['{"a": "x"}', '{"b": 1}'], finish_reason=["stop", "stop"]))
    assert (result.parsed, result.error, result.error_type) == (
        [{"a": "x"}, None],
        "parse: choice 1: $.a is missing (required by the schema)",
        "parse",
    )


def test_the_reasoning_is_never_parsed(fake_server: FakeServer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    prompts = ["q one [[reasoning:field]]", "q two three [[reasoning:inline]]"]
    out = Dataset.from_dict({"prompt": prompts}).map(generate(fake_server.url, output_schema=schema), batched=True)
    assert out["reasoning"] == ["thinking about " + p for p in prompts]
    assert out["parsed"] == [{"a": 3}, {"a": 4}] and out["error"] == [None, None]


def test_the_parsed_type_holds_when_the_first_batch_has_only_failures(fake_server: FakeServer) -> None:
    prompts = ["question 0 [[400]]", "question 1 [[json:bad]]", "question 2", "question 3"]
    out = Dataset.from_dict({"prompt": prompts}).map(generate(fake_server.url, output_schema=Answer), batched=True, batch_size=2)
    assert out.data.table.schema.field("parsed").type == ANSWER_TYPE
    assert out["parsed"] == [None, None, expected("question 2"), expected("question 3")]


def test_on_error_raise_stops_at_a_parse_error(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"prompt": ["question 0", "question 1 [[json:bad]]"]})
    with pytest.raises(GenerationError) as info:
        ds.map(generate(fake_server.url, output_schema=Answer, on_error="raise"), batched=True)
    assert info.value.error_type == "parse" and info.value.row == 1


def test_the_runner_writes_the_same_typed_column_and_counts_parse_errors(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = [f"question {i}" + (" [[json:wrong]]" if i in (3, 7) else "") for i in range(12)]
    pq.write_table(pa.table({"id": list(range(12)), "question": texts}), tmp_path / "in.parquet")
    (tmp_path / "answer.json").write_text(json.dumps(Answer.model_json_schema()))
    recipe = write_recipe(
        tmp_path,
        fake_server.url,
        tmp_path / "in.parquet",
        tmp_path / "out" / "answers.parquet",
        generation={"output_schema": str(tmp_path / "answer.json")},
    )
    summary = run_recipe(load_recipe(recipe), progress=False)
    assert (summary.failed, summary.failed_by_type) == (2, {"parse": 2})
    table = pq.read_table(tmp_path / "out" / "answers.parquet")
    assert table.schema.field("parsed").type == ANSWER_TYPE
    parsed = table.column("parsed").to_pylist()
    assert [p is None for p in parsed] == [i in (3, 7) for i in range(12)]
    assert parsed[0] == expected("question 0")
    metrics = json.loads((tmp_path / "out" / "answers.metrics.json").read_text())
    assert metrics["failed_by_type"] == {"parse": 2}


def test_a_recipe_takes_an_inline_schema_and_module_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "schemas_for_test.py").write_text("from pydantic import BaseModel\nclass R(BaseModel):\n    n: int\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    inline = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for value in (inline, "schemas_for_test:R"):
        recipe = write_recipe(tmp_path, "http://localhost:8000", generation={"output_schema": value})
        schema = load_recipe(recipe).generation.output_schema
        assert schema is not None and schema["properties"]["n"]["type"] == "integer"
    bad = write_recipe(tmp_path, "http://localhost:8000", generation={"output_schema": "missing.json"})
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert str(info.value) == f"{bad}: generation.output_schema: cannot read the schema file missing.json (No such file or directory)"


def test_the_cli_takes_output_schema(tmp_path: Path, fake_server: FakeServer) -> None:
    pq.write_table(pa.table({"prompt": ["question 0", "question 1"]}), tmp_path / "in.parquet")
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    out = tmp_path / "out.parquet"
    command = ["generate", "-i", "in.parquet", "-o", str(out), "-m", fake_server.url, "--output-schema", "schema.json", "--progress=false"]
    proc = subprocess.run([sys.executable, "-m", "vllm_generator", *command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).column("parsed").to_pylist() == [{"n": 2}, {"n": 2}]
    assert all(e["body"]["response_format"]["type"] == "json_schema" for e in fake_server.log())


def test_fingerprints_without_the_new_fields_are_unchanged(tmp_path: Path) -> None:
    """A run started before output_schema, image_column and the parsed column existed resumes:
    its chunk keys (the generation fingerprint) do not change while those are unset."""
    recipe = load_recipe(write_recipe(tmp_path, "http://localhost:8000"))
    config = recipe.transform_config()
    dumped = {
        "prompt": {k: v for k, v in config.prompt.model_dump(mode="json").items() if k != "image_column"},
        "generation": {k: v for k, v in config.generation.model_dump(mode="json").items() if k != "output_schema"},
        "columns": {k: v for k, v in config.columns.model_dump(mode="json").items() if k != "parsed"},
        "model": None,
    }
    import hashlib

    assert config.fingerprint() == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]
    with_schema = load_recipe(write_recipe(tmp_path, "http://localhost:8000", generation={"output_schema": {"type": "string"}}))
    assert with_schema.transform_config().fingerprint() != config.fingerprint()


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("number", '{"x": 1' + "0" * 400 + "}", "$.x should be a number, got 1000"),
        ("integer", '{"x": 1' + "0" * 400 + "}", "$.x is 1000"),
    ],
    ids=["huge-number", "huge-integer"],
)
def test_an_answer_too_big_is_that_row_s_parse_error(kind: str, text: str, message: str) -> None:
    from vllm_generator.structured import _AnswerError, parse_answer

    shape = compile_schema({"type": "object", "properties": {"x": {"type": kind}}, "required": ["x"]})
    with pytest.raises(_AnswerError) as info:  # never an OverflowError that ends the batch
        parse_answer(text, shape)
    assert str(info.value).startswith(message)
