"""The OpenAI wire format, both ways: request bodies from rows, results from response bodies,
and what a status code means.

``WireFormat.from_config(config)`` is built once per transform: it knows the endpoint, the
fields every request carries, and how to read a response. Nothing here does I/O.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import RecipeError
from .images import IMAGE_ERROR, attach_images, clean_content_parts
from .recipe import GenerationConfig, PromptConfig, TransformConfig
from .structured import Structured, request_field

__all__ = [
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "Result",
    "Unsent",
    "WireFormat",
    "FinalError",
    "RetryableError",
    "check_auth",
    "check_columns",
    "decode",
    "encode",
    "is_null",
    "parse_choice",
    "parse_response",
    "prompt_text",
    "redact_text",
    "redact_url",
    "request_fields",
    "retry_after",
    "server_message",
]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
# as json does: logit_bias {50256: -100}, numpy scalars from a dataset's rows
_ENCODE_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def encode(body: dict[str, Any]) -> bytes:
    """A request body as JSON (orjson: see the README's design notes)."""
    try:
        return orjson.dumps(body, option=_ENCODE_OPTIONS)
    except TypeError:  # what orjson refuses (an int over 64 bits, say): json's answer, error included
        return json.dumps(body).encode()


def decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # NaN and Infinity, which Python servers may write: json reads them
        return json.loads(body)


# --------------------------------------------------------------------------- requests


def request_fields(gen: GenerationConfig) -> dict[str, Any]:
    """The JSON body fields a generation config adds to every request (``None`` is not sent)."""
    body: dict[str, Any] = {}
    skip = {"mode", "thinking", "parse_reasoning", "extra_body", "chat_template_kwargs", "output_schema"}
    for name, value in gen:
        if name not in skip and value is not None and not (name == "n" and value == 1):
            body[name] = value
    if gen.mode == "completion" and isinstance(gen.logprobs, bool):
        # /v1/completions takes an int (how many top logprobs), not a flag
        body.pop("top_logprobs", None)
        body.pop("logprobs")
        if gen.logprobs:
            body["logprobs"] = gen.top_logprobs or 1
    kwargs = dict(gen.chat_template_kwargs or {})
    if gen.thinking is not None:
        kwargs["enable_thinking"] = gen.thinking
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    body.update(gen.extra_body)
    return body


def check_columns(prompt: PromptConfig, columns: Sequence[str], where: str | None = None) -> None:
    """Raise ``RecipeError`` when the prompt reads a column that ``columns`` lacks.

    ``where`` (a recipe's input) names the file and the recipe field; without it the message
    speaks of the dataset handed to ``map``.
    """
    missing = [c for c in prompt.input_columns() if c not in columns]
    if not missing:
        return
    names = ", ".join(map(repr, missing))
    if where is not None:
        field = "template" if prompt.template else "messages_column" if prompt.messages_column else "prompt_column"
        if set(missing) <= set(prompt.image_columns()):
            field = "image_column"
        raise RecipeError(f"data.{field}: column(s) {names} not in {where} (columns: {', '.join(columns)})")
    what = "template" if prompt.template else "prompt"
    raise RecipeError(f"the {what} reads column(s) {names} that the dataset does not have; its columns are: {', '.join(columns)}")


def messages_problem(messages: Any) -> str | None:
    """What keeps a row's value from being chat messages, or None when it is a list of them."""
    if not isinstance(messages, list):
        return f"holds a {type(messages).__name__}, not a list of messages"
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"message {j} is a {type(message).__name__}, not a mapping"
        if not isinstance(message.get("role"), str):
            return f"message {j} has no 'role'"
    return None


def format_template(template: str, values: Mapping[str, Any], where: str) -> str:
    """``template.format(**values)``; a value the template cannot format is a ``RecipeError``
    naming the row (``{n:d}`` over a text, say)."""
    try:
        return template.format(**values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise RecipeError(f"{where}: the template {template!r} cannot format this row's values ({type(err).__name__}: {err})") from None


def is_null(value: Any) -> bool:
    # the pandas format shows a null text as NaN
    return value is None or (isinstance(value, float) and value != value)


def prompt_text(body: dict[str, Any] | Unsent | None) -> str:
    """The row's own text (the last message, not a shared system prompt), for error messages."""
    if not isinstance(body, dict):
        return ""
    if "prompt" in body:
        return str(body["prompt"])
    content = body["messages"][-1].get("content") if body["messages"] else ""
    return content if isinstance(content, str) else json.dumps(content)


@dataclass(frozen=True, slots=True)
class Unsent:
    """In place of a row's body: the row is not sent, and gets this error (an unreadable image)."""

    error: str
    error_type: str


# --------------------------------------------------------------------------- responses


@dataclass(slots=True)
class Result:
    """One row's outcome. ``error`` is None on success; n>1 makes the text fields lists."""

    response: str | list[str] | None = None
    reasoning: str | list[str | None] | None = None
    finish_reason: str | list[str | None] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    error_type: str | None = None  # for metrics: "http_400", "timeout", ...
    logprobs: str | None = None
    parsed: Any = None  # with an output schema: the answer as a value of the schema (a list when n > 1)
    attempts: int = 0
    latency: float = 0.0  # seconds the successful attempt took


def _split_reasoning(text: str | None) -> tuple[str | None, str]:
    """Separate inline ``<think>`` text from the answer: (reasoning, answer)."""
    if not text:
        return None, text or ""
    head = text.lstrip()
    close = head.find(_THINK_CLOSE)
    if close >= 0:
        # "<think>r</think>a", or "r</think>a" when the chat template put <think> in the prompt
        reasoning = head[:close].removeprefix(_THINK_OPEN)
        return reasoning.strip(), head[close + len(_THINK_CLOSE) :].lstrip()
    if head.startswith(_THINK_OPEN):
        # cut off (max_tokens) before </think>: everything is reasoning, there is no answer
        return head[len(_THINK_OPEN) :].strip(), ""
    return None, text


def parse_choice(choice: dict[str, Any], chat: bool, parse_reasoning: bool) -> tuple[str, str | None]:
    """(answer, reasoning) from one vLLM choice, whichever of the three shapes it uses.

    Raises:
        ValueError: the choice holds no text at all (no message, or neither content nor
            reasoning): a broken answer, never a successful empty one.
    """
    if chat:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ValueError(f"a choice has no message (got {type(message).__name__})")
        content = message.get("content")
        # vLLM >= 0.10 says "reasoning"; older servers "reasoning_content"
        reasoning = message.get("reasoning")
        if reasoning is None:
            reasoning = message.get("reasoning_content")
    else:
        content, reasoning = choice.get("text"), None
    if content is None and reasoning is None:
        raise ValueError("a choice has no content" if chat else "a choice has no text")
    if not isinstance(content, (str, type(None))) or not isinstance(reasoning, (str, type(None))):
        raise ValueError(
            f"a choice's text is {type(content if not isinstance(content, (str, type(None))) else reasoning).__name__}, not a string"
        )
    if reasoning is not None:
        return content or "", reasoning
    if parse_reasoning:
        inline, answer = _split_reasoning(content)
        return answer, inline
    return content or "", None


def _count(usage: Any, name: str) -> int | None:
    """A token count from ``usage``: an int, or a number written as text; None when absent."""
    value = usage.get(name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"usage.{name} is {value!r}, not a count")


def parse_response(data: Any, *, chat: bool, n: int, parse_reasoning: bool, want_logprobs: bool) -> Result:
    """A 200 response body as a ``Result``; ``ValueError``/``KeyError``/``TypeError`` when it is
    not the shape the request asked for (the client retries those as broken bodies)."""
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ValueError(f"expected {n} choices, got {len(choices)}")
    usage = data.get("usage") or {}
    parsed = [parse_choice(c, chat, parse_reasoning) for c in choices]
    result = Result(prompt_tokens=_count(usage, "prompt_tokens"), completion_tokens=_count(usage, "completion_tokens"))
    if n == 1:
        result.response, result.reasoning = parsed[0]
        result.finish_reason = choices[0].get("finish_reason")
    else:
        result.response = [p[0] for p in parsed]
        result.reasoning = [p[1] for p in parsed]
        result.finish_reason = [c.get("finish_reason") for c in choices]
    if want_logprobs:
        result.logprobs = json.dumps([c.get("logprobs") for c in choices])
    return result


# --------------------------------------------------------------------------- what a failure means


class RetryableError(Exception):
    """An attempt failed in a way that another attempt may fix (408, 429, 5xx, transport)."""

    def __init__(self, message: str, kind: str, retry_after: float | None = None, refused: bool = False, server: Any = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.refused = refused  # no connection: refused, or no answer to the SYN
        self.server = server  # the client's record of the server it failed on


class FinalError(Exception):
    """An attempt failed in a way that retrying cannot fix (a 4xx other than 401/403/408/429)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def status_error(
    url: str, status: int, body: bytes, retry_after_header: str | None, location: str | None = None
) -> RetryableError | FinalError:
    """The error of a non-200 answer other than 401/403 (see ``AuthenticationError``).

    A redirect is a row error: following one would record another server's answer (or a
    bodiless GET's) as the row's.
    """
    if 300 <= status < 400:
        where = redact_url(location) if location else "nowhere (no Location header)"
        return FinalError(
            f"{status} from {url}: redirected to {where}; redirects are not followed for generation requests: "
            "set base_url to the server itself",
            f"http_{status}",
        )
    message = f"{status} from {url}: {server_message(body)}"
    if status in (408, 429) or status >= 500:
        return RetryableError(message, f"http_{status}", retry_after=retry_after(retry_after_header))
    return FinalError(message, f"http_{status}")


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None  # unreadable: the usual backoff, not a crashed batch
        if parsed.tzinfo is None:  # "-0000": HTTP dates are GMT
            parsed = parsed.replace(tzinfo=datetime.UTC)
        seconds = parsed.timestamp() - time.time()
    # "inf" would sleep forever and "nan" means nothing
    return max(0.0, seconds) if math.isfinite(seconds) else None


def server_message(body: bytes) -> str:
    """The message of an OpenAI error body ``{"error": {"message": ...}}`` (vLLM's 401: a string)."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace").strip() or "(empty body)"


# --------------------------------------------------------------------------- credentials


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, user, host and the rest)`` of a URL with credentials, else None."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return None
    userinfo, _, host = authority.rpartition("@")
    return scheme + sep, userinfo.split(":", 1)[0], host + slash + path


def redact_url(url: str) -> str:
    """``url`` as it may be shown or stored: a password in it becomes ``***``."""
    parts = _split_userinfo(url)
    return url if parts is None else f"{parts[0]}{parts[1]}:***@{parts[2]}"


_CREDENTIALS_IN_TEXT = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")


def redact_text(value: object) -> str:
    """``str(value)`` with the password of any URL in it redacted (error texts of HTTP libraries)."""
    return _CREDENTIALS_IN_TEXT.sub(r"\1:***@", str(value))


def has_credentials(url: str) -> bool:
    return _split_userinfo(url) is not None


def check_auth(base_urls: Sequence[str], api_key: str | None) -> None:
    """Refuse a server URL with ``user:password`` together with an API key: both would be the
    request's Authorization header."""
    with_credentials = [u for u in base_urls if has_credentials(u)]
    if api_key and with_credentials:
        raise RecipeError(
            f"model.base_url {redact_url(with_credentials[0])} carries a user and password, and an API key is set too: "
            "both would be the Authorization header; drop the password from the URL or unset the key "
            "(VLLM_API_KEY, OPENAI_API_KEY or model.api_key_env)"
        )


# --------------------------------------------------------------------------- one transform's format


@dataclass(frozen=True)
class WireFormat:
    """How one transform's rows become request bodies and its responses become results."""

    prompt: PromptConfig
    path: str  # the endpoint
    fields: dict[str, Any]  # sent with every request
    chat: bool
    n: int
    parse_reasoning: bool
    want_logprobs: bool
    structured: Structured | None = None  # output_schema: answers parsed into Result.parsed

    @classmethod
    def from_config(cls, config: TransformConfig) -> WireFormat:
        gen = config.generation
        fields = request_fields(gen)
        structured = Structured.from_schema(gen.output_schema) if gen.output_schema is not None else None
        if structured is not None:
            fields.update(request_field(structured.schema))
        # With thinking off the chat template closes the think block in the prompt: everything
        # generated is answer, even a stray "</think>" (vLLM's parser leaves those in content).
        thinking_off = (fields.get("chat_template_kwargs") or {}).get("enable_thinking") is False
        return cls(
            prompt=config.prompt,
            path=CHAT_PATH if gen.mode == "chat" else COMPLETIONS_PATH,
            fields=fields,
            chat=gen.mode == "chat",
            n=gen.n,
            parse_reasoning=gen.parse_reasoning and not thinking_off,
            # decided from the body sent, so extra_body counts too; logprobs is a flag in chat
            # mode and a count (0 included) in completion mode
            want_logprobs=fields.get("logprobs", False) is not False,
            structured=structured,
        )

    def parse(self, data: Any) -> Result:
        result = parse_response(data, chat=self.chat, n=self.n, parse_reasoning=self.parse_reasoning, want_logprobs=self.want_logprobs)
        return self.structured.apply(result) if self.structured is not None else result

    def bodies(self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None) -> list[dict[str, Any] | Unsent | None]:
        """The request bodies (without ``model``) of every row of a batch; None for a row whose
        prompt is null (it gets an error and is not sent), ``Unsent`` for a row whose image cannot
        be read (the same, with that error). ``indices``, the rows' numbers in the dataset, name
        the row in errors.

        Raises:
            RecipeError: a column the prompt needs is missing, the batch is one row (map without
                ``batched=True``), or a row's value cannot make a request (naming the row).
        """
        # every batch: one transform may map several datasets, and the check is a few lookups
        check_columns(self.prompt, list(batch.keys()))
        self._check_batched(batch)
        prompt = self.prompt

        def row(i: int) -> str:
            return f"row {indices[i]}" if indices is not None else f"row {i} of the batch"

        if prompt.source == "messages":
            return [None if is_null(m) else self._messages_body(row(i), m) for i, m in enumerate(batch[prompt.column])]
        texts = self._texts(batch, row)
        bodies: list[dict[str, Any] | Unsent | None] = [
            None if is_null(text) else self._text_body(row(i), text) for i, text in enumerate(texts)
        ]
        if prompt.image_columns():  # encoded here, batch by batch: memory stays flat in the rows
            for i, error in attach_images(bodies, batch, prompt.image_columns()).items():
                bodies[i] = Unsent(error, IMAGE_ERROR)
        return bodies

    def _check_batched(self, batch: Mapping[str, Sequence[Any]]) -> None:
        # Without batched=True map hands over one row (a LazyRow; a dict of scalars with the numpy
        # format), whose text would be sent a character at a time. By name: importing datasets
        # here would slow down every import of this package.
        value = batch[self.prompt.prompt_columns()[0]]
        if type(batch).__name__ == "LazyRow" or isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise RecipeError("vllm_generate is a batched transform: use ds.map(generate, batched=True, batch_size=8192)")

    def _texts(self, batch: Mapping[str, Sequence[Any]], row: Callable[[int], str]) -> list[Any]:
        prompt = self.prompt
        if prompt.template is None:
            return list(batch[prompt.column])
        columns = [(name, batch[name]) for name in prompt.prompt_columns()]
        texts: list[Any] = []
        for i in range(len(columns[0][1])):
            values = {name: column[i] for name, column in columns}
            texts.append(None if any(map(is_null, values.values())) else format_template(prompt.template, values, row(i)))
        return texts

    def _messages_body(self, where: str, messages: Any) -> dict[str, Any]:
        prompt = self.prompt
        problem = messages_problem(messages)
        if problem is not None:
            raise RecipeError(f"{where}: column {prompt.column!r}: {problem} (each message is {{role, content}})")
        # content parts (text, image_url) pass through as they are, less the null fields that Arrow
        # gives every part of a list of structs (a text part's "image_url": null)
        msgs = [clean_content_parts(m) for m in messages]
        if prompt.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": prompt.system_prompt})
        return {"messages": msgs, **self.fields}

    def _text_body(self, where: str, text: Any) -> dict[str, Any]:
        prompt = self.prompt
        if not isinstance(text, str):
            hint = "use messages_column for chat messages" if isinstance(text, list) else "convert the column to text"
            raise RecipeError(f"{where}: column {prompt.column!r} must hold text, got {type(text).__name__} ({hint})")
        if not self.chat:
            return {"prompt": text, **self.fields}
        if prompt.system_prompt:
            return {"messages": [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": text}], **self.fields}
        return {"messages": [{"role": "user", "content": text}], **self.fields}
