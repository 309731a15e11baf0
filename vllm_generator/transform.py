"""``vllm_generate``: the ``Dataset.map`` transform."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from .client import Client, run_on_loop
from .columns import NewColumns
from .errors import GenerationError, RecipeError, RowFailedError
from .journal import Journal, default_folder, journal_keys, open_journal
from .recipe import ServeConfig, TransformConfig, fixed_concurrency, format_validation_error
from .wire import Result, Unsent, WireFormat, prompt_text, redact_url

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["vllm_generate", "VllmGenerate", "Pending"]

# Explicit api_key arguments, kept out of the pickled state (and so out of datasets' fingerprint).
# A worker forked by map(num_proc=N) inherits this dict; elsewhere the key comes from the environment.
_API_KEYS: dict[str, str] = {}
# URLs of the servers a ``serve=...`` transform started, by its state: forked map workers find them
# here, and the state (so the fingerprint) keeps naming the model instead of a random port.
_SERVED: dict[str, list[str]] = {}


@dataclass
class Pending:
    """A batch handed to the client: the exact request bodies and the future of their results."""

    bodies: list[dict[str, Any] | Unsent | None]  # None: the row has no prompt; Unsent: a bad image (not sent)
    future: concurrent.futures.Future[list[Result]]  # results of the rows sent, in order
    key: list[list[Any]] | None = None  # the rows' prompt columns (see lookahead.row_key)
    cached: dict[int, Result] | None = None  # rows found in the journal, by their place among the rows sent
    journal: Journal | None = None  # where the rows sent are recorded


class VllmGenerate:
    """A batched ``Dataset.map`` function that generates a response for every row.

    Build it with :func:`vllm_generate`. It holds only its frozen config when pickled, so
    ``datasets`` gives it the same fingerprint in every process and run, and a worker process
    (``num_proc>1``) gets its own event loop and HTTP session.
    """

    def __init__(self, config: TransformConfig, api_key: str | None = None, cache: bool | str | os.PathLike[str] = True) -> None:
        self.config = config
        # where the response journal goes; not in the config, since it does not decide the text
        self.cache: bool | str = os.fspath(cache) if isinstance(cache, os.PathLike) else cache
        self.wire = WireFormat.from_config(config)
        self.new_columns = NewColumns(config.columns, config.generation.n, self.wire.want_logprobs, self.wire.structured)
        self._api_key = api_key
        self._state = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        if api_key:
            _API_KEYS[self._state] = api_key
        self._client: Client | None = None
        self._client_pid = 0
        self._model: str | None = None  # the model named in journal keys (resolved once per process)
        self._lock = threading.Lock()
        self._servers: contextlib.ExitStack | None = None  # vLLM servers started for serve=...
        self._served_urls: list[str] | None = None  # their URLs, while they run
        self._unpickled = False  # set by _restore: a copy, e.g. in a map worker
        text_columns = config.prompt.prompt_columns()
        names = ", ".join(repr(c) for c in text_columns)
        self._no_prompt = (  # the error of a row with a null prompt
            f"not sent: this row's prompt column {names} is null (fill or filter such rows)"
            if len(text_columns) == 1
            else f"not sent: a column of this row's template ({names}) is null (fill or filter such rows)"
        )

    @property
    def prompt_columns(self) -> list[str]:
        """The columns a request is built from (the images' included)."""
        return self.config.prompt.input_columns()

    # -- pickling: configuration only

    def __reduce__(self) -> tuple[Any, ...]:
        # the default cache adds nothing: fingerprints stay those of transforms made before it
        return (_restore, (self._state,) if self.cache is True else (self._state, self.cache))

    def __repr__(self) -> str:
        m = self.config.model
        urls = [redact_url(u) for u in m.base_url]
        return f"vllm_generate(base_url={urls}, model={m.model!r}, mode={self.config.generation.mode!r})"

    # -- servers and the client, one per process

    def connect(self) -> Client:
        """This process's client; starts the ``serve`` section's vLLM servers first if they are
        not running yet. No request is sent."""
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
                    max_concurrency=fixed_concurrency(self.config.max_concurrency),
                    retry=self.config.retry,
                )
                self._client_pid = os.getpid()
            return self._client

    def journal(self) -> Journal | None:
        """This process's response journal, or None when it is off (``cache=False``, or the
        default folder with ``datasets.disable_caching()``)."""
        folder = default_folder() if self.cache is True else self.cache or None
        return open_journal(folder) if folder is not None else None

    def _model_name(self, client: Client) -> str:
        if self._model is None or self._client_pid != os.getpid():
            self._model = self.config.model.model or run_on_loop(client.resolve_model()).result()
        return self._model

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

    # -- a batch: submit, then collect

    def submit(self, bodies: list[dict[str, Any] | Unsent | None], indices: Sequence[int] | None = None) -> Pending:
        """Hand a batch's bodies (``wire.bodies``) to the background loop now; collect later."""
        sent = [b for b in bodies if isinstance(b, dict)]
        # on_error="raise": the first failed row stops the batch, its other rows are not sent
        stop = self.config.retry.on_error == "raise"
        if len(sent) < len(bodies) and stop:
            row = next(i for i, b in enumerate(bodies) if not isinstance(b, dict))
            raise _row_failed(row, self._unsent(bodies[row]), bodies, indices)
        client = self.connect()
        unsent = [self._unsent(b) for b in bodies if isinstance(b, Unsent)]
        if unsent:  # counted like the rows sent, on the loop thread that owns the counters
            run_on_loop(_count(client, unsent))
        journal = self.journal() if sent else None
        if journal is None:
            return Pending(bodies, client.submit(self.wire.path, sent, self.wire.parse, stop_on_error=stop))
        # only what the journal does not hold is sent; each answer is recorded as it arrives
        keys = journal_keys(self.wire.path, self._model_name(client), sent)
        found = journal.lookup(keys)
        cached = {i: found[k] for i, k in enumerate(keys) if k in found} if found else {}
        if cached:
            run_on_loop(_reuse(client, len(cached)))
            keys = [k for i, k in enumerate(keys) if i not in cached]
            sent = [b for i, b in enumerate(sent) if i not in cached]
        record = journal.record
        future = client.submit(
            self.wire.path, sent, self.wire.parse, stop_on_error=stop, on_result=lambda row, result: record(keys[row], result)
        )
        return Pending(bodies, future, cached=cached or None, journal=journal)

    def _unsent(self, body: Unsent | dict[str, Any] | None) -> Result:
        if isinstance(body, Unsent):
            return Result(error=body.error, error_type=body.error_type)
        return Result(error=self._no_prompt, error_type="no_prompt")

    def collect(self, pending: Pending, indices: Sequence[int] | None = None) -> list[Result]:
        """The results of a submitted batch, in row order (rows without a prompt included).

        Raises:
            GenerationError: ``on_error="raise"`` and a row failed; its other rows are cancelled.
        """
        try:
            results = pending.future.result()
        except RowFailedError as err:
            rows = [i for i, b in enumerate(pending.bodies) if isinstance(b, dict)]
            if pending.cached:
                rows = [r for i, r in enumerate(rows) if i not in pending.cached]
            raise _row_failed(rows[err.row], err.result, pending.bodies, indices) from None  # err.row counts the rows sent
        except BaseException:
            pending.future.cancel()
            if pending.journal is not None:  # Ctrl-C: the answers that came are on disk for the rerun
                with contextlib.suppress(Exception):
                    pending.journal.flush(timeout=10)
            raise
        if pending.journal is not None and results:
            # the batch's answers are on disk before map gets them: a map worker (num_proc > 1)
            # is terminated, not exited, when its shard is done
            pending.journal.flush()
        if pending.cached:
            sent = iter(results)
            results = [pending.cached[i] if i in pending.cached else next(sent) for i in range(len(results) + len(pending.cached))]
        if len(results) == len(pending.bodies):
            return results
        sent = iter(results)
        return [next(sent) if isinstance(b, dict) else self._unsent(b) for b in pending.bodies]

    def generate(self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None) -> list[Result]:
        """Every row's result, in order: build, send and wait."""
        return self.collect(self.submit(self.wire.bodies(batch, indices), indices), indices)

    # -- the map functions

    def __call__(self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None, offset: int = 0) -> dict[str, Any]:
        results = self.generate(batch, _offset(indices, offset))
        if type(batch) is dict and all(isinstance(v, list) for v in batch.values()):
            # IterableDataset.map hands over plain lists and yields our values row by row: give
            # Python values (a numpy row would be np.int64, and n > 1 an array) of the same types
            return self.new_columns.arrow(results).to_pydict()
        return self.new_columns.numpy(results)

    def generated_table(self, *args: Any, offset: int = 0, rows: Sequence[int] | None = None) -> pa.Table:
        """The map function of ``ds.map(..., input_columns=self.prompt_columns, with_indices=True)``
        (the recipe runner's): the prompt columns, then the indices, in; only the new columns out,
        as an Arrow table, so that map neither re-encodes the input columns nor copies them into
        its cache file (the runner joins them back)."""
        *values, indices = args
        return self.new_columns.arrow(self.generate(dict(zip(self.prompt_columns, values)), _offset(indices, offset, rows)))


async def _count(client: Client, results: list[Result]) -> None:
    for result in results:
        client.stats.add(result)


async def _reuse(client: Client, rows: int) -> None:
    client.stats.reused += rows


def _offset(indices: Sequence[int] | None, offset: int, rows: Sequence[int] | None = None) -> Sequence[int] | None:
    """The dataset rows of a batch: map's indices plus ``offset``, the first row of the chunk
    mapped; with ``rows`` (the chunk's rows that were selected), through them."""
    if indices is None:
        return None
    if rows is not None:
        return [offset + rows[i] for i in indices]
    return [i + offset for i in indices] if offset else indices


def _row_failed(i: int, result: Result, bodies: list[dict[str, Any] | Unsent | None], indices: Sequence[int] | None) -> GenerationError:
    row = indices[i] if indices is not None else i
    where = f"row {row}" if indices is not None else f"row {i} of the batch"
    return GenerationError(
        f"{where} failed: {result.error} (prompt: {prompt_text(bodies[i])[:120]!r})",
        row=row,
        error=result.error,
        error_type=result.error_type,
    )


def _restore(state: str, cache: bool | str = True) -> VllmGenerate:
    transform = VllmGenerate(TransformConfig.model_validate_json(state), api_key=_API_KEYS.get(state), cache=cache)
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
    max_concurrency: int | Literal["adaptive"] | None = None,
    timeout: float | None = None,
    max_attempts: int | None = None,
    initial_wait: float | None = None,
    max_wait: float | None = None,
    max_outage: float | None = None,
    on_error: str | None = None,
    columns: Mapping[str, str] | None = None,
    serve: Mapping[str, Any] | ServeConfig | None = None,
    image_column: str | Sequence[str] | None = None,
    output_schema: Any = None,
    cache: bool | str | os.PathLike[str] = True,
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
        max_concurrency: requests in flight per server: "adaptive" (the default) follows each
            server's load reports (vLLM's ``/metrics``) to keep its batch full with a short
            queue; a number is a fixed cap.
        timeout: seconds per request (default 600).
        max_attempts: attempts per request, including the first (default 5).
        initial_wait, max_wait: exponential backoff bounds in seconds (default 1 and 60); a
            server's Retry-After is honoured up to ``max_wait``.
        max_outage: seconds with no server answering before the map stops (default 600). While
            a server is down (refusing connections, or failing every row), rows wait for it
            and spend no attempts.
        on_error: "record" (default) puts a failed row's message in the ``error`` column;
            "raise" stops the map with ``GenerationError`` naming the row.
        columns: new names for output columns, e.g. ``{"response": "answer"}``.
        image_column: a column of images (or a list of such columns) sent after the text as
            content parts: a ``datasets.Image`` column, ``{"bytes", "path"}``, file paths or
            URLs, or a list of them per row. A row whose image cannot be read gets an error.
        output_schema: a pydantic model class or a JSON schema dict: vLLM constrains the answer
            to it (``response_format`` json_schema) and a ``parsed`` column holds each answer as
            a value of it; ``Model.model_validate(row["parsed"])`` gives the model back. An answer
            that does not fit is a row error of type ``parse`` (its text stays in ``response``).
        serve: start vLLM servers instead of using running ones (a ``ServeConfig`` or a dict:
            ``{"model": "Qwen/Qwen3-8B", "args": [...], "gpus": ["0", "1"]}``). They start on
            first use, or when entering ``with vllm_generate(serve=...) as generate:`` (needed
            with ``num_proc>1``), and stop at ``close()``, the end of the with-block, or exit.
        cache: the response journal, which keeps every answer as it arrives so that a map
            run again (after Ctrl-C, a kernel restart, kill -9) sends only the rows with no
            answer yet. True (default): a folder under datasets' cache directory
            (``HF_DATASETS_CACHE``), off with ``datasets.disable_caching()``; a path: that
            folder; False: off. The same request gets the journaled answer: pass ``cache=False``
            or another ``seed`` for fresh samples.
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

    if not isinstance(cache, (bool, str, os.PathLike)) or cache == "":
        raise RecipeError(f"vllm_generate: cache must be True, False or a folder, got {cache!r}")

    def given(**values: Any) -> dict[str, Any]:  # None means "the config's default"
        return {k: v for k, v in values.items() if v is not None}

    model_fields = {"model": model, **given(base_url=base_url, serve=serve, timeout=timeout)}
    retry = given(attempts=max_attempts, on_error=on_error, initial_wait=initial_wait, max_wait=max_wait, max_outage=max_outage)
    generation |= given(thinking=thinking)
    raw: dict[str, Any] = {
        "prompt": {
            "prompt_column": prompt_column,
            "messages_column": messages_column,
            "template": template,
            "system_prompt": system_prompt,
            "image_column": list(image_column) if image_column is not None and not isinstance(image_column, str) else image_column,
        },
        "model": model_fields,
        "generation": {"mode": mode, **generation, **given(output_schema=output_schema)},
        "retry": retry,
        "columns": dict(columns or {}),
        **given(max_concurrency=max_concurrency),
    }
    try:
        config = TransformConfig.model_validate(raw)
    except ValidationError as err:
        message = format_validation_error(err, "vllm_generate")
        # name the keyword the user typed, not the internal section
        for section in ("prompt.", "model.", "generation.", "retry.", "columns."):
            message = message.replace(f"vllm_generate: {section}", "vllm_generate: ")
        raise RecipeError(message) from None
    return VllmGenerate(config, api_key=api_key, cache=cache)
