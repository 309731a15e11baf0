"""Recipe loading and validation: every validator fails with the full message it promises."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from vllm_generator import RecipeError, vllm_generate
from vllm_generator.recipe import GenerationConfig, ModelConfig, PromptConfig, load_recipe
from vllm_generator.slurm import resolve_split
from vllm_generator.storage import load_input
from vllm_generator.transform import VllmGenerate
from vllm_generator.wire import request_fields

REPO = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "data": {"input": {"path": "in.parquet"}, "prompt_column": "question", "output": {"path": "out/answers.parquet"}},
    "model": {"base_url": "http://localhost:8000"},
}


def write_recipe(tmp_path: Path, raw: Any, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def recipe_with(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    change(raw)
    return raw


def load_error(path: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- a valid recipe


def test_minimal_recipe_gets_the_documented_defaults(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, recipe_with(lambda r: r["model"].update(base_url="http://localhost:8000/v1/")))
    recipe = load_recipe(path)
    assert recipe.model.base_url == ["http://localhost:8000"]  # "/v1" and "/" dropped, made a list
    assert recipe.generation.mode == "chat" and recipe.generation.n == 1
    assert recipe.processing.chunk_size == 10_000 and recipe.processing.max_concurrency == "adaptive"
    assert resolve_split(recipe.processing) == (1, 0)
    assert recipe.retry.attempts == 5 and recipe.retry.on_error == "record" and not recipe.retry.retry_failed
    assert recipe.data.input.split == "train" and recipe.data.output.private is True
    # the recipe is frozen: a typo in code is an error too, not a silent new attribute
    with pytest.raises(ValidationError, match="frozen"):
        recipe.processing.chunk_size = 5  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_fit_their_data(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository
    recipe = load_recipe(path)
    assert recipe.data.input.path is not None
    ds = load_input(recipe.data.input)
    config = recipe.transform_config()
    missing = [c for c in config.prompt.prompt_columns() if c not in ds.column_names]
    assert not missing, f"{path.name} reads columns {missing} that {recipe.data.input.path} lacks"
    body = VllmGenerate(config).wire.bodies(ds[:1])[0]
    assert ("prompt" in body) == (recipe.generation.mode == "completion")
    assert recipe.data.output.path is not None and recipe.data.output.path.endswith(".parquet")


# --------------------------------------------------------------------------- one test per failing validator

# (id, change to BASE, expected message after "<file>: ")
INVALID: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    (
        "unknown-field",
        lambda r: r.update(generation={"temprature": 0.7}),
        "generation.temprature: unknown field (check the spelling; see the README's recipe reference)",
    ),
    (
        "unknown-section",
        lambda r: r.update(generaton={"temperature": 0.7}),
        "generaton: unknown field (check the spelling; see the README's recipe reference)",
    ),
    (
        "wrong-type",
        lambda r: r.update(generation={"temperature": "hot"}),
        "generation.temperature: Input should be a valid number, unable to parse string as a number",
    ),
    (
        "out-of-bounds",
        lambda r: r.update(generation={"max_tokens": 0}),
        "generation.max_tokens: Input should be greater than or equal to 1",
    ),
    (
        "split-id-out-of-range",
        lambda r: r.update(processing={"num_splits": 3, "split_id": 3}),
        "processing: split_id 3 is out of range for num_splits 3 (use 0 to 2)",
    ),
    (
        "two-prompt-sources",
        lambda r: r["data"].update(template="Q: {question}"),
        "data: give only one of prompt_column, messages_column, template (got prompt_column, template)",
    ),
    (
        "template-unparsable",
        lambda r: r["data"].update(prompt_column=None, template="Q: {question"),
        "data.template: template is not a valid str.format string: expected '}' before end of string",
    ),
    (
        "template-without-column",
        lambda r: r["data"].update(prompt_column=None, template="Q: what?"),
        "data.template: template names no column: write it like 'Q: {question}'",
    ),
    (
        "template-positional-field",
        lambda r: r["data"].update(prompt_column=None, template="Q: {0}"),
        "data.template: template fields must be column names like {question}, not {} or {0}",
    ),
    (
        "output-not-parquet",
        lambda r: r["data"]["output"].update(path="out/answers.jsonl"),
        "data.output: output.path 'out/answers.jsonl' must end with .parquet",
    ),
    (
        "output-nowhere",
        lambda r: r["data"].update(output={"private": False}),
        "data.output: set output.path (a .parquet file) and/or output.hub_repo_id",
    ),
    (
        "input-neither",
        lambda r: r["data"].update(input={"split": "train"}),
        "data.input: set exactly one of path (file, glob or folder) or hub_id",
    ),
    (
        "input-both",
        lambda r: r["data"].update(input={"path": "in.parquet", "hub_id": "org/data"}),
        "data.input: set exactly one of path (file, glob or folder) or hub_id",
    ),
    (
        "no-server",
        lambda r: r.update(model={"model": "m"}),
        "model: no server: set base_url (e.g. http://localhost:8000) or a serve section",
    ),
    (
        "base-url-and-serve",
        lambda r: r["model"].update(serve={"model": "Qwen/Qwen3-0.6B"}),
        "model: give either base_url (running servers) or serve (start them), not both",
    ),
    (
        "url-without-scheme",
        lambda r: r["model"].update(base_url="localhost:8000"),
        "model.base_url: server URL 'localhost:8000' must start with http:// or https://, e.g. http://localhost:8000",
    ),
    (
        "two-urls-in-one",
        lambda r: r["model"].update(base_url="http://a:8000,http://b:8000"),
        "model.base_url: server URL 'http://a:8000,http://b:8000' holds several URLs: give a list, e.g. [http://a:8000, http://b:8000] (or -m A -m B)",
    ),
    (
        "same-server-twice",
        lambda r: r["model"].update(base_url=["http://h:8000/v1", "http://h:8000"]),
        "model.base_url: base_url lists a server twice: ['http://h:8000', 'http://h:8000']",
    ),
    (
        "guided-decoding",
        lambda r: r.update(generation={"extra_body": {"guided_choice": ["a", "b"]}}),
        (
            "generation: extra_body.guided_choice is ignored by current vLLM (it answers unconstrained): "
            "use generation.structured_outputs, e.g. {'choice': ['yes', 'no']} or {'regex': '...'}"
        ),
    ),
    (
        "extra-body-n",
        lambda r: r.update(generation={"extra_body": {"n": 2}}),
        "generation: extra_body.n cannot be set: use generation.n",
    ),
    (
        "extra-body-messages",
        lambda r: r.update(generation={"extra_body": {"messages": [{"role": "user", "content": "fixed"}]}}),
        "generation: extra_body.messages cannot be set: use data.messages_column (or prompt_column, template)",
    ),
    (
        "chat-template-kwargs-in-completion",
        lambda r: r.update(generation={"mode": "completion", "chat_template_kwargs": {"enable_thinking": False}}),
        "generation: chat_template_kwargs only applies to mode 'chat'",
    ),
    (
        "thinking-in-completion",
        lambda r: r.update(generation={"mode": "completion", "thinking": True}),
        "generation: thinking only applies to mode 'chat' (it sets chat_template_kwargs.enable_thinking)",
    ),
    (
        "messages-in-completion",
        lambda r: (r.update(generation={"mode": "completion"}), r["data"].update(prompt_column=None, messages_column="messages")),
        "mode 'completion' sends a raw prompt: use prompt_column or template, not messages_column",
    ),
    (
        "system-prompt-in-completion",
        lambda r: (r.update(generation={"mode": "completion"}), r["data"].update(system_prompt="Be brief.")),
        "system_prompt only applies to mode 'chat'",
    ),
    (
        "chat-logprobs-count",
        lambda r: r.update(generation={"logprobs": 3}),
        "generation: logprobs is true or false in mode 'chat' (got 3): set top_logprobs: 3 for the number of alternatives",
    ),
    (
        "log-level",
        lambda r: r.update(logging={"level": "loud"}),
        "logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
    ),
    (
        "on-error",
        lambda r: r.update(retry={"on_error": "ignore"}),
        "retry.on_error: Input should be 'record' or 'raise'",
    ),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_recipe_names_file_and_field(tmp_path: Path, change: Callable[[dict[str, Any]], object], message: str) -> None:
    path = write_recipe(tmp_path, recipe_with(change))
    assert load_error(path) == f"{path}: {message}"


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, recipe_with(lambda r: r.update(generation={"temprature": 1, "top_p": 2}, processing={"batch_size": 0})))
    assert load_error(path).splitlines() == [
        f"{path}: generation.top_p: Input should be less than or equal to 1",
        f"{path}: generation.temprature: unknown field (check the spelling; see the README's recipe reference)",
        f"{path}: processing.batch_size: Input should be greater than or equal to 1",
    ]


def test_unreadable_or_malformed_recipe_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert load_error(missing) == f"cannot read recipe {missing}: No such file or directory"
    not_mapping = write_recipe(tmp_path, "- data\n- model\n", "list.yaml")
    assert load_error(not_mapping) == (
        f"{not_mapping}: a recipe is a mapping with sections data, model, generation, processing, retry, logging"
    )
    broken = write_recipe(tmp_path, "data: {input: [\n", "broken.yaml")
    assert load_error(broken).startswith(f"{broken}: not valid YAML: ")


def test_output_columns_must_differ() -> None:
    with pytest.raises(RecipeError) as info:
        vllm_generate("http://localhost:8000", columns={"response": "error"})
    assert str(info.value) == (
        "vllm_generate: columns: output column names must differ: "
        "['error', 'reasoning', 'finish_reason', 'prompt_tokens', 'completion_tokens', 'error', 'logprobs', 'parsed']"
    )


# --------------------------------------------------------------------------- coercing validators


def test_lenient_spellings_are_normalized(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        recipe_with(
            lambda r: r.update(
                generation={"stop": "\n\n", "logit_bias": {1025: 5}},
                logging={"level": "debug"},
                model={"serve": {"model": "m", "gpus": [0, 1]}},
            )
        ),
    )
    recipe = load_recipe(path)
    assert recipe.generation.stop == ["\n\n"]
    assert recipe.generation.logit_bias == {"1025": 5.0}
    assert recipe.logging.level == "DEBUG"
    assert recipe.model.serve is not None and recipe.model.serve.gpus == ["0", "1"] and recipe.model.serve.count == 2


def test_request_fields_follow_the_wire_format() -> None:
    chat = GenerationConfig(temperature=0.0, n=1, thinking=False, chat_template_kwargs={"x": 1}, extra_body={"top_k": 5})
    assert request_fields(chat) == {"temperature": 0.0, "chat_template_kwargs": {"x": 1, "enable_thinking": False}, "top_k": 5}
    completion = GenerationConfig(mode="completion", logprobs=True, top_logprobs=3, n=2)
    assert request_fields(completion) == {"n": 2, "logprobs": 3}
    assert request_fields(GenerationConfig(mode="completion", logprobs=False)) == {}


# --------------------------------------------------------------------------- environment and overrides


def test_env_references_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VG_TEST_HOST", "node7")
    monkeypatch.setenv("VG_TEST_OUT", "/scratch/run")
    monkeypatch.delenv("VG_TEST_PORT", raising=False)
    raw = recipe_with(
        lambda r: (
            r["model"].update(base_url=["http://${VG_TEST_HOST}:${VG_TEST_PORT:-8000}", "http://other:${VG_TEST_PORT:-9000}"]),
            r["data"]["output"].update(path="${VG_TEST_OUT:-out}/answers.parquet"),
        )
    )
    recipe = load_recipe(write_recipe(tmp_path, raw))
    assert recipe.model.base_url == ["http://node7:8000", "http://other:9000"]
    assert recipe.data.output.path == "/scratch/run/answers.parquet"  # a set variable beats its default


def test_unset_env_reference_names_variable_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VG_TEST_HOST", raising=False)
    path = write_recipe(tmp_path, recipe_with(lambda r: r["model"].update(base_url=["http://a:1", "http://${VG_TEST_HOST}:8000"])))
    assert load_error(path) == (
        f"{path}: model.base_url[1]: environment variable ${{VG_TEST_HOST}} is not set "
        "(export it, write ${VG_TEST_HOST:-default}, or $${VG_TEST_HOST} for the literal text)"
    )


def test_double_dollar_keeps_a_literal_env_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("price", "5")
    path = write_recipe(
        tmp_path, recipe_with(lambda r: r["data"].update(prompt_column=None, template="Is $${price} fair for {prompt}? ${price}"))
    )
    assert load_recipe(path).data.template == "Is ${price} fair for {prompt}? 5"


def test_overrides_set_nested_keys_and_are_validated(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, BASE)
    recipe = load_recipe(
        path,
        {"generation.temperature": 0.2, "processing.num_splits": 4, "processing.split_id": 3, "data.input.limit": 10, "retry.attempts": 1},
    )
    assert recipe.generation.temperature == 0.2
    assert resolve_split(recipe.processing) == (4, 3)
    assert recipe.data.input.limit == 10 and recipe.data.input.path == "in.parquet"  # siblings kept
    assert recipe.retry.attempts == 1  # a section absent from the file is created
    assert load_error(path, {"generation.temprature": 0.2}) == (
        f"{path}: generation.temprature: unknown field (check the spelling; see the README's recipe reference)"
    )
    assert load_error(path, {"processing.split_id": 2, "processing.num_splits": 2}) == (
        f"{path}: processing: split_id 2 is out of range for num_splits 2 (use 0 to 1)"
    )
    assert load_error(path, {"data.prompt_column.name": "x"}) == (
        f"{path}: cannot override data.prompt_column.name: prompt_column is not a section"
    )


# --------------------------------------------------------------------------- splits from SLURM


def test_split_comes_from_slurm_array_when_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_recipe(tmp_path, BASE)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert resolve_split(load_recipe(path).processing) == (4, 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-4
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert resolve_split(load_recipe(path).processing) == (4, 3)
    # the recipe's own values win over the environment
    assert resolve_split(load_recipe(path, {"processing.num_splits": 8, "processing.split_id": 5}).processing) == (8, 5)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    with pytest.raises(RecipeError) as info:
        resolve_split(load_recipe(path).processing)
    assert str(info.value) == (
        "processing.split_id 4 is out of range for num_splits 4 (use 0 to 3); num_splits from SLURM_ARRAY_TASK_COUNT "
        "and split_id from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN"
    )
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "x")
    with pytest.raises(RecipeError) as info:
        resolve_split(load_recipe(path).processing)
    assert str(info.value) == "$SLURM_ARRAY_TASK_ID is 'x', not a whole number: set processing.split_id and num_splits instead"


# --------------------------------------------------------------------------- what decides the output


def test_generation_fingerprint_ignores_servers_keys_and_concurrency(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, BASE)
    base = load_recipe(path)
    same: list[dict[str, Any]] = [
        {"model.base_url": ["http://a:1", "http://b:2"]},
        {"processing.max_concurrency": 8, "processing.batch_size": 7, "processing.chunk_size": 3},
        {"retry.attempts": 1, "retry.retry_failed": True},
        {"logging.level": "DEBUG", "model.api_key_env": "MY_KEY", "model.timeout": 5},
    ]
    for overrides in same:
        other = load_recipe(path, overrides)
        assert other.transform_config().fingerprint() == base.transform_config().fingerprint(), overrides
        assert other.hash() != base.hash(), overrides  # the recipe hash in the metrics still tells them apart
    for overrides in ({"generation.temperature": 0.5}, {"model.model": "other"}, {"data.system_prompt": "Be brief."}):
        assert load_recipe(path, overrides).transform_config().fingerprint() != base.transform_config().fingerprint(), overrides


def test_api_key_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert ModelConfig(base_url="http://a:1").api_key() == "sk-openai"
    monkeypatch.setenv("VLLM_API_KEY", "sk-vllm")
    assert ModelConfig(base_url="http://a:1").api_key() == "sk-vllm"
    monkeypatch.delenv("VG_TEST_KEY", raising=False)
    assert ModelConfig(base_url="http://a:1", api_key_env="VG_TEST_KEY").api_key() is None  # no fallback: a keyless server
    monkeypatch.setenv("VG_TEST_KEY", "sk-mine")
    assert ModelConfig(base_url="http://a:1", api_key_env="VG_TEST_KEY").api_key() == "sk-mine"


def test_recipe_and_keywords_build_the_same_config(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, recipe_with(lambda r: r.update(generation={"temperature": 0.3, "max_tokens": 9}))))
    direct = vllm_generate("http://localhost:8000", prompt_column="question", temperature=0.3, max_tokens=9)
    assert recipe.transform_config() == direct.config


# --------------------------------------------------------------------------- GenerationConfig and PromptConfig (moved from test_client.py)


def errors_of(err: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    return [(tuple(e["loc"]), e["msg"]) for e in err.errors()]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mode": "completion", "thinking": True},
            "Value error, thinking only applies to mode 'chat' (it sets chat_template_kwargs.enable_thinking)",
        ),
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
        ({"template": "{a} and {b!r} and {c:>{width}} and {a}"}, "template", ["a", "b", "c", "width"]),
    ],
)
def test_prompt_config_source_and_columns(kwargs: dict[str, str], source: str, columns: list[str]) -> None:
    config = PromptConfig(**kwargs)
    assert config.source == source
    assert config.prompt_columns() == columns


# --------------------------------------------------------------------------- caught before anything runs


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{prompt.__class__}", "template field {prompt.__class__} reads an attribute or an item"),
        ("{prompt.nope}", "template field {prompt.nope} reads an attribute or an item"),
        ("{prompt[x]}", "template field {prompt[x]} reads an attribute or an item"),
        ("{prompt:>{id.x}}", "template field {id.x} reads an attribute or an item"),
    ],
)
def test_templates_read_plain_columns_only(template: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        PromptConfig(template=template)
    assert errors_of(info.value) == [(("template",), f"Value error, {message}: templates take plain column names like {{question}}")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["generation"].update(temperature=float("inf")), "generation.temperature: Input should be a finite number"),
        (lambda r: r["generation"].update(presence_penalty=float("nan")), "generation.presence_penalty: Input should be a finite number"),
        (lambda r: r["generation"].update(extra_body={"x": [1, float("nan")]}), "generation: extra_body.x[1] is nan: give a finite number"),
        (lambda r: r["processing"].update(batch_size=True), "processing.batch_size: expects a number, not true"),
        (lambda r: r["retry"].update(attempts=False), "retry.attempts: expects a number, not false"),
        (lambda r: r["model"].update(timeout=True), "model.timeout: expects a number, not true"),
    ],
    ids=["inf", "nan", "nan-inside", "batch-size-true", "attempts-false", "timeout-true"],
)
def test_non_finite_numbers_and_flags_for_numbers_are_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], message: str
) -> None:
    raw = recipe_with(lambda r: [r.setdefault(k, {}) for k in ("generation", "processing", "retry")] and change(r))
    path = write_recipe(tmp_path, raw)  # yaml writes .inf and .nan
    assert load_error(path) == f"{path}: {message}"


def test_a_flag_stays_a_flag_where_a_field_takes_one() -> None:
    assert GenerationConfig(logprobs=True, thinking=False).logprobs is True


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  input: {path: in.parquet}\n  output: {path: out.parquet}\nmodel: {base_url: 'http://h:1'}\n"
                    "generation:\n  temperature: 0.1\ngeneration:\n  max_tokens: 3\n")  # fmt: skip
    assert load_error(path) == f"{path}: not valid YAML: line 7: the key 'generation' is given twice (first on line 5): merge them"


def test_a_recipe_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"data:\n  prompt_column: caf\xe9\n")
    assert load_error(path) == f"{path}: line 2: not UTF-8 text (byte 0xe9): save the recipe as UTF-8"


def test_yaml_merge_keys_still_load_and_a_list_as_a_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  input: {path: in.parquet}\n  output: {path: out.parquet}\nmodel: &m {base_url: 'http://h:1'}\n"
                    "generation: &g {temperature: 0.1}\nretry:\n  attempts: 2\n")  # fmt: skip
    base = load_recipe(path)
    path.write_text(path.read_text() + "logging:\n  <<: {level: DEBUG}\n  file: null\n")
    assert load_recipe(path).logging.level == "DEBUG" and base.generation.temperature == 0.1
    path.write_text("? [a, b]\n: 1\n")
    assert load_error(path) == f"{path}: not valid YAML: line 1: a key cannot be list"
