"""Every configuration model, its defaults, and recipe loading.

One pydantic tree: ``Recipe`` holds the six sections of a YAML recipe; ``TransformConfig`` is the
part that ``vllm_generate`` needs and is built from the same section models, so a default lives in
exactly one place whether it comes from Python keywords, YAML or a ``--section.key=value`` override.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
]

# vLLM's default scheduler batch (max_num_seqs) is 256 on most GPUs: keeping that many requests in
# flight per server fills its batch without building a long queue on the server.
DEFAULT_MAX_CONCURRENCY = 256
# requests in flight per server (vllm_generate's max_concurrency, a recipe's processing.max_concurrency)
MaxConcurrency = Annotated[int, Field(ge=1)]
API_KEY_ENV_VARS = ("VLLM_API_KEY", "OPENAI_API_KEY")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PromptConfig(_Config):
    """Which row columns become the request: exactly one of the three sources."""

    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system_prompt: str | None = None

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
                fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
            except ValueError as err:
                raise ValueError(f"template is not a valid str.format string: {err}") from err
            if not fields:
                raise ValueError("template names no column: write it like 'Q: {question}'")
            if any(f == "" or f.isdigit() for f in fields):
                raise ValueError("template fields must be column names like {question}, not {} or {0}")
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
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
            # "{a.b}" or "{a[0]}" read column "a"
            return list(dict.fromkeys(re.split(r"[.\[]", f, maxsplit=1)[0] for f in names))
        return [self.column]


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

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, value: Any) -> Any:
        # YAML and Python both like int token ids; the wire format wants string keys
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
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

    attempts: int = Field(5, ge=1)  # including the first
    initial_wait: float = Field(1.0, ge=0)  # seconds; doubles each attempt, with jitter
    max_wait: float = Field(60.0, ge=0)
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
        return self

    def fingerprint(self, served_model: str | None = None) -> str:
        """A hash of what decides the generated text (not servers, keys, concurrency or retries).

        ``served_model``: the model the servers said they serve, when ``model.model`` is None.
        """
        relevant = {
            "prompt": self.prompt.model_dump(mode="json"),
            "generation": self.generation.model_dump(mode="json"),
            "columns": self.columns.model_dump(mode="json"),
            "model": self.model.model or served_model or (self.model.serve.model if self.model.serve else None),
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class InputConfig(_Config):
    """The input: a file or glob (Parquet, JSONL, CSV), a save_to_disk folder, or a Hub dataset."""

    path: str | None = None
    hub_id: str | None = None
    config: str | None = None  # Hub dataset config name
    split: str = "train"
    limit: int | None = Field(None, ge=1)  # the first N rows only

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        if bool(self.path) == bool(self.hub_id):
            raise ValueError("set exactly one of path (file, glob or folder) or hub_id")
        return self


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


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, expand ``${ENV}`` references, apply ``section.key`` overrides, and validate a recipe.

    Raises:
        RecipeError: naming the file and the field, for anything wrong.
    """
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise RecipeError(f"cannot read recipe {where}: {err.strerror or err}") from err
    try:
        raw = yaml.safe_load(text)
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
