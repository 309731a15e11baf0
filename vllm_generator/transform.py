"""``vllm_generate``: the ``Dataset.map`` transform."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from .client import Client, Result, RowFailedError, _parse_body
from .errors import GenerationError, RecipeError
from .recipe import GenerateConfig, ServeConfig, format_validation_error

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["vllm_generate", "VllmGenerate"]

logger = logging.getLogger(__name__)

# Explicit api_key arguments, kept out of the pickled state (and so out of datasets' fingerprint).
# A worker forked by map(num_proc=N) inherits this dict; elsewhere the key comes from the environment.
_API_KEYS: dict[str, str] = {}
# URLs of the servers a ``serve=...`` transform started, by its state: forked map workers find them
# here, and the state (so the fingerprint) keeps naming the model instead of a random port.
_SERVED: dict[str, list[str]] = {}
# numpy's variable-width string dtype keeps None as a null of type string (numpy >= 2)
_TEXT = np.dtypes.StringDType(na_object=None)


@dataclass
class _Pending:
    """A batch handed to the client: the exact request bodies and the future of their results."""

    bodies: list[dict[str, Any] | None]  # None: the row has no prompt and was not sent
    future: concurrent.futures.Future[list[Result]]  # results of the rows sent, in order
    key: list[list[Any]] | None = None  # the rows' prompt columns (see row_key)


class VllmGenerate:
    """A batched ``Dataset.map`` function that generates a response for every row.

    Build it with :func:`vllm_generate`. It holds only its frozen config when pickled, so
    ``datasets`` gives it the same fingerprint in every process and run, and a worker process
    (``num_proc>1``) gets its own event loop and HTTP session.
    """

    def __init__(self, config: GenerateConfig, api_key: str | None = None) -> None:
        self.config = config
        self._api_key = api_key
        self._state = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        if api_key:
            _API_KEYS[self._state] = api_key
        self._client: Client | None = None
        self._servers: contextlib.ExitStack | None = None  # vLLM servers started for serve=...
        self._served_urls: list[str] | None = None  # their URLs, while they run
        self._unpickled = False  # set by _restore: a copy, e.g. in a map worker
        # set by the recipe runner on Ctrl-C: stop at the next batch even if Ctrl-C was swallowed
        self.interrupted: threading.Event | None = None
        self._client_pid = 0
        self._lock = threading.Lock()
        # batches submitted ahead of map (see run.py); consumed in order, checked body by body
        self._ahead: collections.deque[_Pending] = collections.deque()
        self._ahead_changed = threading.Condition()
        self._feeding = False
        gen = config.generation
        self._path = "/v1/chat/completions" if gen.mode == "chat" else "/v1/completions"
        self._fields = gen.request_fields()
        # Decided from the body actually sent, so extra_body and chat_template_kwargs count too.
        # logprobs is a flag in chat mode and a count (0 included) in completion mode.
        want_logprobs = self._fields.get("logprobs", False) is not False  # None values are never sent
        self._want_logprobs = want_logprobs
        # With thinking off the chat template closes the think block in the prompt: everything
        # generated is answer, even a stray "</think>" (vLLM's parser leaves those in content).
        thinking_off = (self._fields.get("chat_template_kwargs") or {}).get("enable_thinking") is False
        self._parse = partial(
            _parse_body,
            chat=gen.mode == "chat",
            n=gen.n,
            parse_reasoning=gen.parse_reasoning and not thinking_off,
            want_logprobs=want_logprobs,
        )
        self._required = config.prompt.required_columns()  # parsed once, read on every batch
        names = ", ".join(repr(c) for c in self._required)
        self._no_prompt = (  # the error of a row with a null prompt
            f"not sent: this row's prompt column {names} is null (fill or filter such rows)"
            if len(self._required) == 1
            else f"not sent: a column of this row's template ({names}) is null (fill or filter such rows)"
        )

    # -- pickling: configuration only

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._state,))

    def __repr__(self) -> str:
        m = self.config.model
        return f"vllm_generate(base_url={m.base_url}, model={m.model!r}, mode={self.config.generation.mode!r})"

    # -- the client, one per process

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                if self.config.model.serve is not None and self._served_urls is None:
                    self._start_servers()
                m = self.config.model
                self._client = Client(
                    self._served_urls or m.base_url,
                    api_key=self._api_key or m.api_key(),
                    model=m.model,
                    timeout=m.timeout,
                    max_concurrency=self.config.max_concurrency,
                    retry=self.config.retry,
                )
                self._client_pid = os.getpid()
            return self._client

    def _start_servers(self) -> None:
        """Start the ``serve`` section's vLLM servers; requests go to them until ``close()``."""
        from .serve import serve_models

        serve = self.config.model.serve
        assert serve is not None
        if self._unpickled:
            # a map worker (num_proc>1) got the config before the servers ran: one set per worker is wrong
            raise RecipeError(
                "vllm_generate(serve=...) with num_proc>1: start the servers before map with "
                "`with vllm_generate(serve=...) as generate: ds.map(generate, num_proc=N, ...)`"
            )
        self._servers = contextlib.ExitStack()
        self._served_urls = self._servers.enter_context(serve_models(serve))
        _SERVED[self._state] = self._served_urls

    def close(self) -> None:
        """Close the HTTP session and stop servers this transform started (it stays usable:
        the next batch opens a new session, and starts the servers again)."""
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        if self._servers is not None:
            _SERVED.pop(self._state, None)
            self._served_urls = None
            self._client = None  # its URLs are gone with the servers
            self._servers.close()
            self._servers = None

    def __enter__(self) -> VllmGenerate:
        """Start managed servers now (``serve=...``), so ``map`` workers share them."""
        if self.config.model.serve is not None:
            with self._lock:
                if self._served_urls is None:
                    self._start_servers()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- building requests

    def _check_columns(self, columns: Sequence[str]) -> None:
        missing = [c for c in self._required if c not in columns]
        if missing:
            what = "template" if self.config.prompt.template else "prompt"
            raise RecipeError(
                f"the {what} reads column(s) {', '.join(repr(c) for c in missing)} that the dataset does not have; "
                f"its columns are: {', '.join(columns)}"
            )

    def _check_batched(self, batch: Mapping[str, Sequence[Any]]) -> None:
        # Without batched=True map hands over one row (a LazyRow; a dict of scalars with the numpy
        # format), whose text would be sent a character at a time. By name: importing datasets
        # here would slow down every import of this package.
        value = batch[self._required[0]]
        if type(batch).__name__ == "LazyRow" or isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise RecipeError("vllm_generate is a batched transform: use ds.map(generate, batched=True, batch_size=8192)")

    def build_bodies(self, batch: Mapping[str, Sequence[Any]]) -> list[dict[str, Any] | None]:
        """The JSON request bodies (without ``model``) for every row of a batch; None for a row
        whose prompt is null (it gets an error and is not sent).

        Raises:
            RecipeError: a column the prompt needs is missing, or a row's value has the wrong type.
        """
        # every batch: one transform may map several datasets, and the check is a few lookups
        self._check_columns(list(batch.keys()))
        self._check_batched(batch)
        prompt = self.config.prompt
        fields = self._fields
        chat = self.config.generation.mode == "chat"
        texts: list[Any]
        if prompt.source == "template":
            assert prompt.template is not None
            names = self._required
            columns = [(n, batch[n]) for n in names]
            texts = []
            for i in range(len(columns[0][1])):
                values = {n: column[i] for n, column in columns}
                texts.append(None if any(map(_is_null, values.values())) else prompt.template.format(**values))
        else:
            texts = list(batch[prompt.column])
        bodies: list[dict[str, Any] | None] = []
        if chat and prompt.source == "messages":
            for i, messages in enumerate(texts):
                if _is_null(messages):
                    bodies.append(None)
                    continue
                if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
                    raise RecipeError(
                        f"row {i} of the batch: column {prompt.column!r} must hold a list of {{role, content}} messages, "
                        f"got {type(messages).__name__}"
                    )
                msgs = list(messages)
                if prompt.system_prompt and not any(m["role"] == "system" for m in msgs):
                    msgs.insert(0, {"role": "system", "content": prompt.system_prompt})
                bodies.append({"messages": msgs, **fields})
            return bodies
        for i, text in enumerate(texts):
            if _is_null(text):
                bodies.append(None)
            elif not isinstance(text, str):
                raise RecipeError(
                    f"row {i} of the batch: column {prompt.column!r} must hold text, got {type(text).__name__} "
                    f"({'use messages_column for chat messages' if isinstance(text, list) else 'convert the column to text'})"
                )
            elif not chat:
                bodies.append({"prompt": text, **fields})
            elif prompt.system_prompt:
                bodies.append({"messages": [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": text}], **fields})
            else:
                bodies.append({"messages": [{"role": "user", "content": text}], **fields})
        return bodies

    # -- submitting and collecting

    def submit(self, bodies: list[dict[str, Any] | None], indices: Sequence[int] | None = None) -> _Pending:
        """Hand a batch to the background loop now; collect its results later."""
        sent = [b for b in bodies if b is not None]
        # on_error="raise": the first failed row stops the batch, its other rows are not sent
        stop = self.config.retry.on_error == "raise"
        if len(sent) < len(bodies) and stop:
            raise _row_failed(bodies.index(None), self._no_prompt, bodies, indices)
        return _Pending(bodies, self.client.submit(self._path, sent, self._parse, stop_on_error=stop))

    def _results(self, pending: _Pending) -> list[Result]:
        """The rows' results in order, rows without a prompt included."""
        results = pending.future.result()
        if len(results) == len(pending.bodies):
            return results
        sent = iter(results)
        return [next(sent) if b is not None else Result(error=self._no_prompt, error_type="no_prompt") for b in pending.bodies]

    def row_key(self, batch: Mapping[str, Sequence[Any]]) -> list[list[Any]]:
        """The values of the columns the prompt reads: equal keys make equal request bodies."""
        return [list(batch[c]) for c in self._required]

    def submit_ahead(
        self, batch: Mapping[str, Sequence[Any]], max_ahead: int, stopped: threading.Event, max_unfinished: int | None = None
    ) -> bool:
        """Submit a batch that a later ``__call__`` will receive (pipelining across map batches).

        Blocks while ``max_ahead`` batches wait to be taken, or, with ``max_unfinished``, while two
        batches wait and the client already holds that many rows without a result (enough to
        keep the servers busy); returns False once ``stopped`` is set.
        """
        with self._ahead_changed:
            while len(self._ahead) >= max_ahead or (
                max_unfinished is not None and len(self._ahead) >= 2 and self.client.unfinished >= max_unfinished
            ):
                if stopped.is_set():
                    return False
                # rows finish on the loop thread without notifying: poll often enough that the
                # client's queue never runs dry (10 ms is ~50 rows at 5,000 rows/s)
                self._ahead_changed.wait(0.2 if len(self._ahead) >= max_ahead else 0.01)
            if stopped.is_set():
                return False
        pending = self.submit(self.build_bodies(batch))  # outside the lock: map may take meanwhile
        pending.key = self.row_key(batch)
        with self._ahead_changed:
            if stopped.is_set():  # stopped while building: nobody will take it
                pending.future.cancel()
                return False
            self._ahead.append(pending)
            self._ahead_changed.notify_all()
        return True

    def feeding(self, active: bool) -> None:
        """Say whether a feeder thread is sending batches ahead (``_take`` then waits for them)."""
        with self._ahead_changed:
            self._feeding = active
            self._ahead_changed.notify_all()

    def cancel_ahead(self) -> None:
        with self._ahead_changed:
            while self._ahead:
                self._ahead.popleft().future.cancel()
            self._ahead_changed.notify_all()

    def _take(self, key: list[list[Any]]) -> _Pending | None:
        """The batch sent ahead for these rows, if any."""
        with self._ahead_changed:
            # With a feeder attached this batch is on its way: wait for it rather than send it
            # too (the feeder would send it again, and every later batch would mismatch).
            while self._feeding and not self._ahead:
                self._ahead_changed.wait(0.05)
            pending = self._ahead.popleft() if self._ahead else None
            self._ahead_changed.notify_all()
        if pending is not None:
            # Rows must get their own responses: use the pre-sent batch only if it is this batch
            # (comparing the prompt columns is cheaper than building and comparing the bodies).
            if pending.key == key:
                return pending
            logger.warning("a batch sent ahead does not match the batch map gave; sending this batch again")
            pending.future.cancel()
            self.cancel_ahead()
        return None

    def __call__(
        self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None, offset: int = 0
    ) -> dict[str, np.ndarray]:
        return self.columns(self._generate(batch, indices, offset))

    def generated_table(self, *args: Any, offset: int = 0) -> pa.Table:
        """The map function of ``ds.map(..., input_columns=self.prompt_columns, with_indices=True)``
        (the recipe runner's): the prompt columns, then the indices, in; only the new columns out,
        as an Arrow table, so that map neither re-encodes the input columns nor copies them into
        its cache file (the runner joins them back)."""
        *values, indices = args
        return self.table(self._generate(dict(zip(self._required, values)), indices, offset))

    @property
    def prompt_columns(self) -> list[str]:
        """The columns a request is built from."""
        return list(self._required)

    def _generate(self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None, offset: int) -> list[Result]:
        if self.interrupted is not None and self.interrupted.is_set():
            raise KeyboardInterrupt
        if indices is not None and offset:
            indices = [i + offset for i in indices]
        pending = None
        if self._ahead or self._feeding:
            self._check_columns(list(batch.keys()))  # before row_key reads them (build_bodies checks too)
            pending = self._take(self.row_key(batch))
        if pending is None:
            pending = self.submit(self.build_bodies(batch), indices)
        bodies = pending.bodies
        try:
            results = self._results(pending)
        except RowFailedError as err:
            self.cancel_ahead()
            row = [i for i, b in enumerate(bodies) if b is not None][err.row]  # err.row counts the rows sent
            raise _row_failed(row, err.result.error, bodies, indices) from None
        except BaseException:
            pending.future.cancel()
            self.cancel_ahead()
            raise
        return results

    def _new_columns(self, results: list[Result]) -> list[tuple[str, str, list[Any]]]:
        """(name, kind, values) of each new column. kind "texts": a text per row, or with n > 1 a
        list of n (a failed row gets n nulls); "text": a text per row; "count": token counts, 0 on
        failed rows (nothing was generated)."""
        cols = self.config.columns
        n = self.config.generation.n

        def per_row(values: list[Any]) -> list[Any]:
            return [v if v is not None else [None] * n for v in values] if n > 1 else values

        out = [
            (cols.response, "texts", per_row([r.response for r in results])),
            (cols.reasoning, "texts", per_row([r.reasoning for r in results])),
            (cols.finish_reason, "texts", per_row([r.finish_reason for r in results])),
            (cols.prompt_tokens, "count", [r.prompt_tokens or 0 for r in results]),
            (cols.completion_tokens, "count", [r.completion_tokens or 0 for r in results]),
            (cols.error, "text", [r.error for r in results]),
        ]
        if self._want_logprobs:
            out.append((cols.logprobs, "text", [r.logprobs for r in results]))
        return out

    def table(self, results: list[Result]) -> pa.Table:
        """The new columns as an Arrow table with the same types as ``columns``."""
        import pyarrow as pa  # here: importing the package stays light

        n = self.config.generation.n
        types = {"texts": pa.list_(pa.string()) if n > 1 else pa.string(), "text": pa.string(), "count": pa.int64()}

        def array(kind: str, values: list[Any]) -> pa.Array:
            try:
                return pa.array(values, type=types[kind])
            except (pa.ArrowTypeError, pa.ArrowInvalid):  # a server that sent a non-text field: as columns() does
                return pa.array(_numpy_column(kind, values, n).tolist(), type=types[kind])

        return pa.table({name: array(kind, values) for name, kind, values in self._new_columns(results)})

    @property
    def new_column_names(self) -> list[str]:
        """The columns the transform adds, in order."""
        return [name for name, _, _ in self._new_columns([])]

    def columns(self, results: list[Result]) -> dict[str, np.ndarray]:
        """Arrow columns with fixed types, so batches of all-null values never change the schema."""
        # Typed numpy arrays, not lists: datasets fixes a column's Arrow type from the first batch
        # written, and a batch whose values are all None would make it a null column that later
        # batches cannot fill.
        n = self.config.generation.n
        return {name: _numpy_column(kind, values, n) for name, kind, values in self._new_columns(results)}


def _numpy_column(kind: str, values: list[Any], n: int) -> np.ndarray:
    """A new column's values (see ``VllmGenerate._new_columns``) as a typed numpy array."""
    if kind == "count":
        return np.array(values, dtype=np.int64)
    text = np.array(values, dtype=_TEXT)
    return text.reshape(len(values), n) if kind == "texts" and n > 1 else text


def _is_null(value: Any) -> bool:
    # the pandas format shows a null text as NaN
    return value is None or (isinstance(value, float) and value != value)


def _row_failed(i: int, error: str | None, bodies: list[dict[str, Any] | None], indices: Sequence[int] | None) -> GenerationError:
    where = f"row {indices[i]}" if indices is not None else f"row {i} of the batch"
    return GenerationError(f"{where} failed: {error} (prompt: {_prompt_text(bodies[i])[:120]!r})")


def _prompt_text(body: dict[str, Any] | None) -> str:
    """The row's own text (the last message, not a shared system prompt), for error messages."""
    if body is None:
        return ""
    if "prompt" in body:
        return str(body["prompt"])
    content = body["messages"][-1].get("content") if body["messages"] else ""
    return content if isinstance(content, str) else json.dumps(content)


def _restore(state: str) -> VllmGenerate:
    transform = VllmGenerate(GenerateConfig.model_validate_json(state), api_key=_API_KEYS.get(state))
    transform._unpickled = True
    transform._served_urls = _SERVED.get(state)
    return transform


def vllm_generate(
    base_url: str | Sequence[str] | None = None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    prompt_column: str | None = None,
    messages_column: str | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    mode: str = "chat",
    thinking: bool | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    max_attempts: int | None = None,
    initial_wait: float | None = None,
    max_wait: float | None = None,
    on_error: str | None = None,
    columns: Mapping[str, str] | None = None,
    serve: Mapping[str, Any] | ServeConfig | None = None,
    **generation: Any,
) -> VllmGenerate:
    """Make a batched ``Dataset.map`` function that generates text for every row with vLLM.

    Args:
        base_url: one server URL or a list of them (``/v1`` optional). Requests go to the server
            with the fewest in flight; a server that keeps refusing connections leaves the rotation.
        model: the served model name; None asks ``/v1/models`` and uses its only model.
        api_key: sent as a Bearer token; None reads ``VLLM_API_KEY`` then ``OPENAI_API_KEY``.
        prompt_column: a text column sent as the user message (the default, "prompt").
        messages_column: a column of chat messages ``[{"role", "content"}, ...]``.
        template: a ``str.format`` template over row columns, e.g. ``"Q: {question}"``.
        system_prompt: prepended as a system message (chat mode).
        mode: "chat" (``/v1/chat/completions``) or "completion" (``/v1/completions``, raw prompt).
        thinking: True/False set ``chat_template_kwargs.enable_thinking``; None keeps the default.
        max_concurrency: requests in flight per server (default 256).
        timeout: seconds per request (default 600).
        max_attempts: attempts per request, including the first (default 5).
        initial_wait, max_wait: exponential backoff bounds in seconds (default 1 and 60); a
            server's Retry-After is honoured up to ``max_wait``.
        on_error: "record" (default) puts a failed row's message in the ``error`` column;
            "raise" stops the map with ``GenerationError`` naming the row.
        columns: new names for output columns, e.g. ``{"response": "answer"}``.
        serve: start vLLM servers instead of using running ones (a ``ServeConfig`` or a dict:
            ``{"model": "Qwen/Qwen3-8B", "args": [...], "gpus": ["0", "1"]}``). They start on
            first use, or when entering ``with vllm_generate(serve=...) as generate:`` (needed
            with ``num_proc>1``), and stop at ``close()``, the end of the with-block, or exit.
        **generation: sampling parameters (``temperature``, ``max_tokens``, ``n``, ``seed``,
            ``stop``, ``top_p``, ``top_k``, ``min_p``, ``logprobs``, ``response_format``,
            ``structured_outputs``, ``chat_template_kwargs``, ...) and ``extra_body`` for any
            other field of vLLM's request.

    Returns:
        A picklable callable for ``ds.map(..., batched=True)`` that adds the columns
        ``response``, ``reasoning``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``
        and ``error`` (null when the row succeeded).

    Raises:
        RecipeError: an unknown or invalid argument (nothing is sent).

    Example:
        >>> from datasets import Dataset
        >>> from vllm_generator import vllm_generate
        >>> ds = Dataset.from_dict({"prompt": ["What is 2+2?", "Name a colour."]})
        >>> generate = vllm_generate("http://localhost:8000", temperature=0, max_tokens=64)
        >>> ds = ds.map(generate, batched=True, batch_size=8192)  # doctest: +SKIP
        >>> ds[0]["response"]  # doctest: +SKIP
    """
    def given(**values: Any) -> dict[str, Any]:  # None means "the config's default"
        return {k: v for k, v in values.items() if v is not None}

    model_fields = {"model": model, **given(base_url=base_url, serve=serve, timeout=timeout)}
    retry = given(attempts=max_attempts, on_error=on_error, initial_wait=initial_wait, max_wait=max_wait)
    generation |= given(thinking=thinking)
    raw: dict[str, Any] = {
        "prompt": {
            "prompt_column": prompt_column,
            "messages_column": messages_column,
            "template": template,
            "system_prompt": system_prompt,
        },
        "model": model_fields,
        "generation": {"mode": mode, **generation},
        "retry": retry,
        "columns": dict(columns or {}),
        **given(max_concurrency=max_concurrency),
    }
    try:
        config = GenerateConfig.model_validate(raw)
    except ValidationError as err:
        message = format_validation_error(err, "vllm_generate")
        # name the keyword the user typed, not the internal section
        for section in ("prompt.", "model.", "generation.", "retry.", "columns."):
            message = message.replace(f"vllm_generate: {section}", "vllm_generate: ")
        raise RecipeError(message) from None
    return VllmGenerate(config, api_key=api_key)
