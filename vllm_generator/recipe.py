"""Every configuration model, its defaults, and recipe loading.

One pydantic tree: ``Recipe`` holds the six sections of a YAML recipe; ``TransformConfig`` is the
part that ``vllm_generate`` needs and is built from the same section models, so a default lives in
exactly one place whether it comes from Python keywords, YAML or a ``--section.key=value`` override.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import RecipeError

__all__ = [
    "PromptConfig",
    "OutputColumns",
    "GenerationConfig",
    "ServeConfig",
    "ModelConfig",
    "RetryConfig",
    "TransformConfig",
    "InputConfig",
    "OutputConfig",
    "DataConfig",
    "ProcessingConfig",
    "LoggingConfig",
    "Recipe",
    "load_recipe",
    "dotted_overrides",
    "format_validation_error",
    "fixed_concurrency",
]

# Requests in flight per server (vllm_generate's max_concurrency, a recipe's processing.max_concurrency):
# "adaptive" follows each server's own load reports (adaptive.py), as vLLM's batch is 128 to 2,048
# sequences by GPU and flags, and no endpoint tells which; a number is a fixed cap.
DEFAULT_MAX_CONCURRENCY: Literal["adaptive"] = "adaptive"


def _concurrency(value: Any) -> int | str:
    if value == "adaptive":
        return value
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"expects 'adaptive' or a number of requests (1 or more), not {value!r}")
    return number


MaxConcurrency = Annotated[int | Literal["adaptive"], PlainValidator(_concurrency, json_schema_input_type=int | Literal["adaptive"])]


def fixed_concurrency(value: int | str) -> int | None:
    """A fixed ``max_concurrency``, or None for "adaptive"."""
    return value if isinstance(value, int) else None


API_KEY_ENV_VARS = ("VLLM_API_KEY", "OPENAI_API_KEY")


class _Config(BaseModel):
    # allow_inf_nan: ".inf" or ".nan" would be sent as null, or make every request fail
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes true as 1: "batch_size: true" is a mistake, not a batch of one
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and (int in kinds or float in kinds):
                raise ValueError(f"expects a number, not {str(value).lower()}")
        return value


def _kinds(annotation: Any) -> set[Any]:
    """The types an annotation admits (``int | None`` -> {int, NoneType})."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in args))
    return {annotation}


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinity anywhere inside a JSON-like value (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}: give a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def template_fields(template: str) -> list[str]:
    """Every field a ``str.format`` template reads, those nested in format specs included
    (``{x:>{width}}`` reads x and width), in order.

    Raises:
        ValueError: the template does not parse.
    """
    fields: list[str] = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            fields.append(name)
        if spec and "{" in spec:
            fields += template_fields(spec)
    return fields


class PromptConfig(_Config):
    """Which row columns become the request: exactly one of the three sources."""

    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    # Columns of images sent after the text (datasets.Image, {bytes, path}, file paths or URLs;
    # a list column for several per row): one name or a list of names.
    image_column: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PromptConfig:
        given = [k for k in ("prompt_column", "messages_column", "template") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give only one of prompt_column, messages_column, template (got {', '.join(given)})")
        return self

    @field_validator("template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                fields = template_fields(value)
            except ValueError as err:
                raise ValueError(f"template is not a valid str.format string: {err}") from err
            if not fields:
                raise ValueError("template names no column: write it like 'Q: {question}'")
            if any(f == "" or f.isdigit() for f in fields):
                raise ValueError("template fields must be column names like {question}, not {} or {0}")
            reaching = next((f for f in fields if "." in f or "[" in f), None)
            if reaching is not None:
                # {prompt.__class__} would send "<class 'str'>" for every row
                raise ValueError(
                    f"template field {{{reaching}}} reads an attribute or an item: templates take plain column names like {{question}}"
                )
        return value

    @property
    def source(self) -> str:
        """The effective source: the text column ``prompt`` when nothing was chosen."""
        if self.messages_column:
            return "messages"
        if self.template:
            return "template"
        return "prompt"

    @property
    def column(self) -> str:
        return self.messages_column or self.prompt_column or "prompt"

    def prompt_columns(self) -> list[str]:
        """The dataset columns a request is built from."""
        if self.template:
            return list(dict.fromkeys(template_fields(self.template)))
        return [self.column]

    def image_columns(self) -> list[str]:
        """The dataset columns whose images follow the text."""
        if self.image_column is None:
            return []
        return [self.image_column] if isinstance(self.image_column, str) else list(self.image_column)

    def input_columns(self) -> list[str]:
        """Every dataset column a request is built from: the prompt's, then the images'."""
        return list(dict.fromkeys(self.prompt_columns() + self.image_columns()))

    @model_validator(mode="after")
    def _images_after_text(self) -> PromptConfig:
        if self.image_column is not None and self.messages_column:
            raise ValueError(
                "image_column adds images to a text prompt (prompt_column or template); "
                "with messages_column put image_url parts in the messages' content, which is sent as it is"
            )
        if isinstance(self.image_column, list) and not self.image_column:
            raise ValueError("image_column is an empty list: name at least one column, or leave it out")
        return self


class OutputColumns(_Config):
    """Names of the columns the transform adds."""

    response: str = "response"
    reasoning: str = "reasoning"
    finish_reason: str = "finish_reason"
    prompt_tokens: str = "prompt_tokens"
    completion_tokens: str = "completion_tokens"
    error: str = "error"
    # only written when generation.logprobs is set: the choices' logprobs as JSON text
    logprobs: str = "logprobs"
    # only written when generation.output_schema is set: each answer as a value of the schema
    parsed: str = "parsed"

    @model_validator(mode="after")
    def _distinct(self) -> OutputColumns:
        names = list(self.model_dump().values())
        if len(set(names)) != len(names):
            raise ValueError(f"output column names must differ: {names}")
        return self


# Request fields that vLLM silently ignores since structured outputs replaced them.
_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend")
# Request fields the transform owns: set through extra_body they would give every row the same
# prompt, break the response parsing (n, stream) or route to another model.
_OWNED_FIELDS = {
    "model": "model.model",
    "messages": "data.messages_column (or prompt_column, template)",
    "prompt": "data.prompt_column (or template)",
    "n": "generation.n",
    "stream": "nothing: responses are read whole",
    "stream_options": "nothing: responses are read whole",
}


class GenerationConfig(_Config):
    """Sampling parameters. ``None`` means "the server's default" and is not sent."""

    mode: Literal["chat", "completion"] = "chat"
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[str, float] | None = None
    structured_outputs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # A JSON schema the answer must follow (sent as response_format json_schema) and be parsed
    # into the "parsed" column with: a pydantic model class, a schema, a .json file or module:Class.
    output_schema: dict[str, Any] | None = None
    # True/False set chat_template_kwargs.enable_thinking; None leaves the model's default.
    thinking: bool | None = None
    # Split "<think>...</think>" out of the text when the server has no reasoning parser.
    parse_reasoning: bool = True
    # Any other field of vLLM's request body, sent as is (and overriding the fields above).
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("output_schema", mode="before")
    @classmethod
    def _load_output_schema(cls, value: Any) -> Any:
        from .structured import compile_schema, load_schema

        if value is None:
            return None
        schema = load_schema(value)  # a SchemaError is a ValueError: pydantic names the field
        compile_schema(schema)  # fails here, naming the place in the schema, not at the first answer
        return schema

    @model_validator(mode="after")
    def _one_answer_constraint(self) -> GenerationConfig:
        if self.output_schema is not None:
            given = [k for k in ("response_format", "structured_outputs") if getattr(self, k) is not None or k in self.extra_body]
            if given:
                raise ValueError(f"output_schema sets response_format itself: leave out {given[0]}")
            if self.mode == "completion":
                raise ValueError("output_schema applies to mode 'chat' (it sends response_format)")
        return self

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, value: Any) -> Any:
        # YAML and Python both like int token ids; the wire format wants string keys
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        for name in ("extra_body", "response_format", "structured_outputs", "chat_template_kwargs"):
            _check_finite(getattr(self, name), name)
        owned = [k for k in _OWNED_FIELDS if k in self.extra_body]
        if owned:
            raise ValueError(f"extra_body.{owned[0]} cannot be set: use {_OWNED_FIELDS[owned[0]]}")
        guided = [k for k in _GUIDED_FIELDS if k in self.extra_body]
        if guided:
            raise ValueError(
                f"extra_body.{guided[0]} is ignored by current vLLM (it answers unconstrained): "
                "use generation.structured_outputs, e.g. {'choice': ['yes', 'no']} or {'regex': '...'}"
            )
        if self.mode == "chat" and self.logprobs is not None and not isinstance(self.logprobs, bool):
            # /v1/chat/completions takes a flag: vLLM would answer 400 to every row
            raise ValueError(
                f"logprobs is true or false in mode 'chat' (got {self.logprobs}): "
                f"set top_logprobs: {self.logprobs} for the number of alternatives"
            )
        if self.mode == "completion" and self.chat_template_kwargs:
            raise ValueError("chat_template_kwargs only applies to mode 'chat'")
        if self.mode == "completion" and self.thinking is not None:
            raise ValueError("thinking only applies to mode 'chat' (it sets chat_template_kwargs.enable_thinking)")
        return self


class ServeConfig(_Config):
    """Start vLLM servers for the run instead of using running ones."""

    model: str  # a Hub id or a local folder
    # The launcher. "{model}" is replaced by the model; without it the model is added after the
    # command. The CPU build: ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}"]
    command: list[str] = Field(default_factory=lambda: ["vllm", "serve"])
    args: list[str] = Field(default_factory=list)  # extra `vllm serve` arguments
    num_servers: int = Field(1, ge=1)
    # One server per entry with CUDA_VISIBLE_DEVICES set to it (overrides num_servers), e.g. ["0", "1"].
    gpus: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # server i listens on port + i; 0 picks free ports
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout: float = Field(900, gt=0)  # big models take minutes to load

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_as_text(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @property
    def count(self) -> int:
        return len(self.gpus) if self.gpus else self.num_servers


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "," in url or " " in url:
        raise ValueError(f"server URL {url!r} holds several URLs: give a list, e.g. [http://a:8000, http://b:8000] (or -m A -m B)")
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError(f"server URL {url!r} must start with http:// or https://, e.g. http://localhost:8000")
    # accept ".../v1" as users copy it from the OpenAI SDK; the client adds it back
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ModelConfig(_Config):
    """Where requests go."""

    base_url: list[str] = Field(default_factory=list)  # one or more servers; "/v1" optional
    model: str | None = None  # None: the only model the server lists
    # Name of the environment variable holding the API key (never the key itself).
    # None: VLLM_API_KEY, then OPENAI_API_KEY.
    api_key_env: str | None = None
    timeout: float = Field(600, gt=0)  # per request, seconds: long reasoning traces take minutes
    serve: ServeConfig | None = None

    @field_validator("base_url", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("base_url")
    @classmethod
    def _normalize(cls, value: list[str]) -> list[str]:
        urls = [_normalize_url(u) for u in value]
        if len(set(urls)) != len(urls):
            raise ValueError(f"base_url lists a server twice: {urls}")
        return urls

    @model_validator(mode="after")
    def _has_server(self) -> ModelConfig:
        if self.base_url and self.serve:
            raise ValueError("give either base_url (running servers) or serve (start them), not both")
        if not self.base_url and not self.serve:
            raise ValueError("no server: set base_url (e.g. http://localhost:8000) or a serve section")
        return self

    def api_key(self) -> str | None:
        """The API key from the environment (the one place it is read); None when the variable
        is unset, as for a server that needs no key."""
        names = (self.api_key_env,) if self.api_key_env else API_KEY_ENV_VARS
        return next((os.environ[n] for n in names if os.environ.get(n)), None)


class RetryConfig(_Config):
    """Retries of one request (408, 429, 5xx, dropped connections, timeouts, broken bodies)."""

    attempts: int = Field(5, ge=1)  # including the first; a server's outage spends none
    initial_wait: float = Field(1.0, ge=0)  # seconds; doubles each attempt, with jitter
    max_wait: float = Field(60.0, ge=0)
    # Seconds with no server answering before the run stops (answered rows are kept). Minutes:
    # a restarted vLLM server (or a SLURM job's) takes that long to load its model.
    max_outage: float = Field(600.0, gt=0)
    # "record": a row that fails for good gets its message in the error column and the run goes
    # on; "raise": the run stops with GenerationError naming the row.
    on_error: Literal["record", "raise"] = "record"
    # Recipes only: rows whose error is set in a previous run's results are sent again.
    retry_failed: bool = False


class TransformConfig(_Config):
    """Everything ``vllm_generate`` needs; built from keywords or from a ``Recipe``."""

    prompt: PromptConfig = Field(default_factory=PromptConfig)
    model: ModelConfig
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    columns: OutputColumns = Field(default_factory=OutputColumns)
    max_concurrency: MaxConcurrency = DEFAULT_MAX_CONCURRENCY

    @model_validator(mode="after")
    def _mode_fits_prompt(self) -> TransformConfig:
        if self.generation.mode == "completion":
            if self.prompt.messages_column:
                raise ValueError("mode 'completion' sends a raw prompt: use prompt_column or template, not messages_column")
            if self.prompt.system_prompt:
                raise ValueError("system_prompt only applies to mode 'chat'")
            if self.prompt.image_column is not None:
                raise ValueError("image_column only applies to mode 'chat' (images go as content parts of the user message)")
        return self

    def fingerprint(self, served_model: str | None = None) -> str:
        """A hash of what decides the generated text (not servers, keys, concurrency or retries).

        ``served_model``: the model the servers said they serve, when ``model.model`` is None.
        """
        relevant = {
            "prompt": _without_later_defaults(self.prompt.model_dump(mode="json"), {"image_column": None}),
            "generation": _without_later_defaults(self.generation.model_dump(mode="json"), {"output_schema": None}),
            "columns": _without_later_defaults(self.columns.model_dump(mode="json"), {"parsed": "parsed"}),
            "model": self.model.model or served_model or (self.model.serve.model if self.model.serve else None),
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _without_later_defaults(values: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the fields added in later versions while they hold their default: the
    chunk caches of a run started before those fields existed keep their keys and resume."""
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}


class InputConfig(_Config):
    """The input: a file or glob (Parquet, JSONL, CSV), a save_to_disk folder, or a Hub dataset."""

    path: str | None = None
    hub_id: str | None = None
    config: str | None = None  # Hub dataset config name
    split: str = "train"
    limit: int | None = Field(None, ge=1)  # the first N rows only
    # Refused (see the validator): a recipe's resume and splits need the input on disk.
    streaming: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        if bool(self.path) == bool(self.hub_id):
            raise ValueError("set exactly one of path (file, glob or folder) or hub_id")
        return self

    @field_validator("streaming")
    @classmethod
    def _no_streaming(cls, value: bool) -> bool:
        if value:
            # Resume is exact because each chunk's cache is keyed on the input's fingerprint and
            # its row range, and splits are Dataset.shard row ranges: a stream has neither a
            # fingerprint nor a length, so a rerun could not prove which rows are done.
            raise ValueError(
                "streaming: true is not supported by recipes: resume keys each chunk on the input's fingerprint and "
                "row range, and splits on its row count, which a stream does not have, so a rerun could not prove which "
                "rows are done. Let the recipe load the input (datasets keeps it memory-mapped on disk), or stream in "
                "Python: load_dataset(..., streaming=True).map(vllm_generate(...), batched=True)"
            )
        return value


class OutputConfig(_Config):
    path: str | None = None  # a .parquet file; the metrics JSON goes beside it
    hub_repo_id: str | None = None
    hub_split: str = "train"
    private: bool = True

    @model_validator(mode="after")
    def _somewhere(self) -> OutputConfig:
        if not self.path and not self.hub_repo_id:
            raise ValueError("set output.path (a .parquet file) and/or output.hub_repo_id")
        if self.path and not self.path.endswith(".parquet"):
            raise ValueError(f"output.path {self.path!r} must end with .parquet")
        return self


class DataConfig(PromptConfig):
    input: InputConfig
    output: OutputConfig


class ProcessingConfig(_Config):
    batch_size: int = Field(1024, ge=1)  # rows per Dataset.map batch
    max_concurrency: MaxConcurrency = DEFAULT_MAX_CONCURRENCY
    # None: SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID when set, else a single split
    num_splits: int | None = Field(None, ge=1)
    split_id: int | None = Field(None, ge=0)
    # Rows per checkpoint: a crash loses at most one chunk's work. Each chunk costs a cache file.
    chunk_size: int = Field(10_000, ge=1)
    num_proc: int = Field(1, ge=1)
    # Rows sent ahead of map's current batch so servers never drain at batch and chunk
    # boundaries or behind one slow row; None: up to 128 x max_concurrency x servers, but only
    # 2 x that many unfinished rows unless map is waiting. 0 turns it off. A crash loses these too.
    lookahead: int | None = Field(None, ge=0)
    # Another run writing the same split: false refuses at once (naming it), true waits for it.
    wait_for_lock: bool = False
    # Where chunk caches live; None: "<output path>.work" (Hub-only: ./.vllm_generator_work/<org>--<name>/<hub_split>)
    work_dir: str | None = None

    @model_validator(mode="after")
    def _split_in_range(self) -> ProcessingConfig:
        if self.split_id is not None and self.num_splits is not None and self.split_id >= self.num_splits:
            raise ValueError(f"split_id {self.split_id} is out of range for num_splits {self.num_splits} (use 0 to {self.num_splits - 1})")
        return self


class LoggingConfig(_Config):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: str | None = None
    max_bytes: int = Field(10_000_000, ge=0)  # rotate the log file at this size (0: never)
    backup_count: int = Field(5, ge=0)  # rotated files kept

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Recipe(_Config):
    data: DataConfig
    model: ModelConfig
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _transform_config_valid(self) -> Recipe:
        self.transform_config()  # cross-section checks (mode against prompt source)
        return self

    def transform_config(self, base_url: list[str] | None = None) -> TransformConfig:
        """The transform's config; ``base_url`` replaces the servers (managed servers' URLs)."""
        model = self.model if base_url is None else self.model.model_copy(update={"base_url": base_url, "serve": None})
        prompt = PromptConfig(**{k: getattr(self.data, k) for k in PromptConfig.model_fields})
        return TransformConfig(
            prompt=prompt,
            model=model,
            generation=self.generation,
            retry=self.retry,
            max_concurrency=self.processing.max_concurrency,
        )

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """A copy with ``section.key`` overrides applied, validated like a loaded recipe.

        Raises:
            RecipeError: naming ``where`` and the field.
        """
        return _validate(self.model_dump(exclude_unset=True), overrides, where)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# ${NAME} or ${NAME:-default}; $${NAME} is the literal text ${NAME}
_ENV_REF = re.compile(r"(\$?)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str, path: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, where, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, default = match.group(1), match.group(2), match.group(3)
        if escaped:
            return match.group(0)[1:]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise RecipeError(
            f"{where}: {path}: environment variable ${{{name}}} is not set "
            f"(export it, write ${{{name}:-default}}, or $${{{name}}} for the literal text)"
        )

    return _ENV_REF.sub(substitute, value)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: cannot override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def dotted_overrides(overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Python keyword overrides as ``section.key`` overrides: a dotted key is kept as is, and a
    section given as a mapping (``generation={"temperature": 0.2}``) is merged into the recipe's
    down to its fields, whose values are set whole (a ``stop`` list, a ``structured_outputs`` dict).

    Raises:
        RecipeError: a key that is neither a section nor dotted.
    """
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if "." in key:
            flat[key] = value
        elif key in Recipe.model_fields and isinstance(value, Mapping):
            _flatten(Recipe.model_fields[key].annotation, key, value, flat)
        else:
            sections = ", ".join(Recipe.model_fields)
            raise RecipeError(
                f"{where}: {key}={value!r} is not an override: give a section as a dict ({sections}), "
                f'e.g. generation={{"temperature": 0.2}}, or a dotted key, e.g. **{{"generation.temperature": 0.2}}'
            )
    return flat


def _flatten(annotation: Any, prefix: str, values: Mapping[str, Any], flat: dict[str, Any]) -> None:
    model = _config_model(annotation)
    for key, value in values.items():
        path = f"{prefix}.{key}"
        field = model.model_fields.get(str(key)) if model else None
        if field is not None and _config_model(field.annotation) and isinstance(value, Mapping):
            _flatten(field.annotation, path, value, flat)
        else:
            flat[path] = value  # an unknown key goes on to validation, which names it


def _config_model(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (``ServeConfig`` for ``ServeConfig | None``), if any."""
    options = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    return next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem: ``file: section.field: message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the README's recipe reference)"
        # a check across sections has no one field to name: its message names the fields
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: a second ``generation:``
    would silently replace the first."""


def _unique_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)  # "<<: *defaults" merge keys first, as SafeLoader does
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first
        except TypeError:  # a list or a mapping as a key
            raise yaml.constructor.ConstructorError(None, None, f"a key cannot be {type(key).__name__}", key_node.start_mark) from None
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice (first on line {first[key] + 1}): merge them", key_node.start_mark
            )
        first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, expand ``${ENV}`` references, apply ``section.key`` overrides, and validate a recipe.

    Raises:
        RecipeError: naming the file and the field, for anything wrong.
    """
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read recipe {where}: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        number = data[: err.start].count(b"\n") + 1
        raise RecipeError(f"{where}: line {number}: not UTF-8 text (byte 0x{data[err.start]:02x}): save the recipe as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_RecipeLoader)
    except yaml.MarkedYAMLError as err:
        at = f"line {err.problem_mark.line + 1}: " if err.problem_mark is not None else ""
        raise RecipeError(f"{where}: not valid YAML: {at}{err.problem}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with sections data, model, generation, processing, retry, logging")
    return _validate(_expand_env(raw, where, ""), overrides or {}, where)


def _validate(raw: dict[str, Any], overrides: Mapping[str, Any], where: str) -> Recipe:
    for key, value in overrides.items():
        _set_dotted(raw, key, value, where)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, where)) from None
