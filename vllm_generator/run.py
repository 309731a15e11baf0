"""Running a recipe's split: check, plan, the map loop, then the summary and the outputs.

check_recipe   everything that needs no server (input, columns, split, output path, nulls)
_plan          the work folder, the served model, the chunks and which are done already
_generate      map every chunk (chunks.py), with batches sent ahead (lookahead.py)
_summarize     the RunSummary, also written as the metrics file
_write_outputs the Parquet output, the metrics, the Hub push
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from .card import render_card
from .chunks import Chunk, check_chunk, map_chunk, plan_chunks, remove_stale_chunks, retry_failed, with_input
from .client import Stats, run_on_loop
from .errors import RecipeError, ServerUnavailableError, StorageError
from .images import undecoded
from .journal import remove_journal
from .lookahead import Lookahead
from .recipe import Recipe, TransformConfig, dotted_overrides, fixed_concurrency, load_recipe
from .status import SplitStatus
from .storage import (
    check_output_path,
    datasets_bars_off,
    hold_lock,
    hub_path,
    hub_pattern,
    load_input,
    make_parent,
    metrics_path,
    no_space,
    push_to_hub,
    split_bounds,
    split_dir,
    split_output_path,
    split_tag,
    work_dir,
    write_json,
    write_parquet,
)
from .transform import VllmGenerate
from .wire import check_auth, check_columns, format_template, is_null, messages_problem

__all__ = ["RunSummary", "CheckedRecipe", "check_recipe", "run_recipe", "run_split"]

logger = logging.getLogger(__name__)

_TEMPLATE_ROWS_CHECKED = 100  # rows formatted before anything is sent (the rest as they go)
# Look-ahead rows are sized for this target per server when targets are adaptive (an H100's batch)
_NOMINAL_TARGET = 1024


@dataclass
class RunSummary:
    """What a run did; also the content of the metrics file.

    ``rows``, ``succeeded``, ``failed`` and the token totals describe the whole output (rows reused
    from an earlier run included); the request counters, rates and latencies describe this run.
    """

    rows: int = 0
    succeeded: int = 0
    failed: int = 0  # rows whose error column is set
    reused_rows: int = 0  # rows loaded from finished chunks of an earlier run
    generated_rows: int = 0  # rows sent this run
    failed_by_type: dict[str, int] = field(default_factory=dict)  # this run: "http_400", "timeout", ...
    requests: int = 0  # HTTP attempts this run, retries included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0  # the whole run, managed servers' start-up included
    # rates over the run once the servers are up
    rows_per_s: float = 0.0  # generated rows / s
    requests_per_s: float = 0.0  # HTTP attempts / s
    tokens_per_s: float = 0.0  # completion tokens generated this run / s
    latency_s: dict[str, float] = field(default_factory=dict)  # per successful request
    # per server (this process's client): its in-flight target, what it ran and queued, refusals
    servers: list[dict[str, Any]] = field(default_factory=list)
    split_id: int = 0
    num_splits: int = 1
    output_path: str | None = None
    metrics_path: str | None = None
    hub_repo_id: str | None = None
    work_dir: str = ""
    recipe_hash: str = ""
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- entry points


def run_recipe(recipe: Recipe | str | os.PathLike[str], *, progress: bool = True, **overrides: Any) -> RunSummary:
    """Run a recipe end to end: the split its ``processing`` section names or, left unset, the
    SLURM array task's (see ``slurm.resolve_split``); with ``model.serve`` in a SLURM job that was
    given GPUs, the servers run on those GPUs (``slurm.allocated_gpus``).

    Args:
        recipe: a ``Recipe``, or the path of its YAML file.
        progress: show a progress bar on stderr.
        **overrides: a section as a dict, merged into the recipe's down to its fields
            (``generation={"temperature": 0.2}``), or dotted keys as the command's
            ``--section.key=value`` (``**{"processing.split_id": 1}``).

    Returns:
        What the run did, also written as the metrics file beside the output.

    Raises:
        RecipeError: a bad recipe, override or input (before any request).
        ServerUnavailableError, GenerationError: the run stopped; finished chunks are kept and
        the same call resumes from them.

    Example::

        from vllm_generator import run_recipe

        summary = run_recipe("recipe.yaml", generation={"temperature": 0.2}, processing={"split_id": 1, "num_splits": 4})
        print(summary.rows, summary.failed, summary.output_path)
    """
    from .slurm import resolve_split, with_allocated_gpus

    flat = dotted_overrides(overrides, "run_recipe")
    loaded = load_recipe(recipe, flat) if not isinstance(recipe, Recipe) else recipe.with_overrides(flat, "run_recipe") if flat else recipe
    num_splits, split_id = resolve_split(loaded.processing)
    on_gpus = with_allocated_gpus(loaded, os.environ)
    if on_gpus is not loaded:
        assert on_gpus.model.serve is not None
        logger.info("model.serve.gpus on the GPUs SLURM gave this job: %s", on_gpus.model.serve.gpus)
    return run_split(on_gpus, split_id, num_splits, progress=progress)


def run_split(recipe: Recipe, split_id: int, num_splits: int, *, progress: bool = True, base_url: list[str] | None = None) -> RunSummary:
    """Run split ``split_id`` of ``num_splits`` of a recipe end to end; returns what it did (also
    written as the metrics file).

    Everything that can be checked without a server (input, columns, split, output path) is
    checked before managed servers start or any request is sent. ``base_url`` replaces the
    recipe's servers. The split's status file (``status.SplitStatus``) says what the run is doing.

    Raises:
        RecipeError: bad input (before any request). ServerUnavailableError, GenerationError:
        the run stopped; finished chunks are kept and the next run resumes from them.
    """
    started = time.monotonic()
    with SplitStatus(recipe, split_id, num_splits) as status:  # what `vllm-generator status` reads
        checked = check_recipe(recipe, split_id, num_splits)
        status.checked(len(checked.split))
        if checked.nulls:
            logger.warning("%s: they get an error and are not sent", checked.nulls_text())
        work = work_dir(recipe.data.output, recipe.processing.work_dir)
        folder = split_dir(work, split_id, num_splits)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise RecipeError(f"processing.work_dir: cannot create {folder} ({err.strerror or err})") from err
        what = f"split {split_id} of {num_splits} of {checked.out_path or recipe.data.output.hub_repo_id}"
        # before managed servers start: a second run must not load a model onto GPUs to be refused
        with hold_lock(folder, what, wait=recipe.processing.wait_for_lock):
            if recipe.model.serve is not None and base_url is None:
                from .serve import serve_models

                with serve_models(recipe.model.serve) as urls:
                    return _run(recipe, checked, urls, progress, started, status, work, folder)
            return _run(recipe, checked, base_url, progress, started, status, work, folder)


def _run(
    recipe: Recipe,
    checked: CheckedRecipe,
    base_url: list[str] | None,
    progress: bool,
    started: float,
    status: SplitStatus,
    work: str,
    folder: str,
) -> RunSummary:
    serving = time.monotonic()  # rates leave out the servers' start-up
    config = recipe.transform_config(base_url) if base_url is not None else checked.config
    # the split's response journal: a chunk killed midway resumes from the answers it got
    transform = VllmGenerate(config, cache=folder)
    stats = transform.connect().stats
    plan = _plan(recipe, checked, transform, work, folder)
    before = stats.done
    status.running(plan.reused, lambda: stats.done - before)
    try:
        result, retried = _generate(recipe, checked, plan, transform, progress)
    except Exception as err:
        _raise_if_no_space(err, plan, plan.split_dir)
        raise
    summary = _summarize(recipe, checked, plan, result, retried, stats, started, serving)
    try:
        _write_outputs(recipe, checked, plan, result, summary)
    except Exception as err:
        _raise_if_no_space(err, plan, os.path.dirname(os.path.abspath(checked.out_path or folder)))
        raise
    status.finish(summary.rows, summary.failed, summary.output_path)
    return summary


def _raise_if_no_space(err: BaseException, plan: _Plan, folder: str) -> None:
    """A full disk is a clear error that says what is kept; the temp files that cannot be
    resumed go, so that they do not keep the disk full."""
    full = no_space(err)
    if full is None:
        return
    for leftover in glob.glob(os.path.join(plan.split_dir, "tmp*")) + glob.glob(os.path.join(plan.split_dir, "*.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(leftover)
    done = [c for c in plan.chunks if c.files()]
    kept = (
        f"{len(done)} of {len(plan.chunks)} chunks ({sum(c.rows for c in done)} rows) are kept in {plan.split_dir}, "
        "and the responses journaled there for the others"
    )
    raise StorageError(
        f"no space left on {full.filename or folder} ({full.strerror}): {kept}; free some space and run the same command again "
        "(it sends only what is not kept)",
        path=str(full.filename or folder),
    ) from err


# --------------------------------------------------------------------------- check


@dataclass
class CheckedRecipe:
    """What ``check_recipe`` found: the input, this run's split and where its output goes."""

    ds: Dataset
    config: TransformConfig
    where: str
    num_splits: int
    split_id: int
    split: Dataset  # ds.shard(num_splits, split_id, contiguous=True)
    split_start: int  # the split's first row in the input
    out_path: str | None
    no_prompt: np.ndarray  # True for the rows of the split whose prompt is null

    @property
    def nulls(self) -> int:
        return int(self.no_prompt.sum())

    def nulls_text(self) -> str:
        rows = np.flatnonzero(self.no_prompt)
        shown = ", ".join(str(self.split_start + i) for i in rows[:5]) + (", ..." if rows.size > 5 else "")
        return f"{rows.size} rows have a null prompt (rows {shown} of {self.where})"


def check_recipe(recipe: Recipe, split_id: int = 0, num_splits: int = 1) -> CheckedRecipe:
    """Every check that needs no server: the split, the input and its prompt columns, the output
    path, and null prompts (an error with ``on_error: raise``). Used by run and validate alike.

    Raises:
        RecipeError: naming the field and what to do.
    """
    data = recipe.data
    ds = load_input(data.input)
    where = str(data.input.path or data.input.hub_id)
    config = recipe.transform_config()
    check_auth(config.model.base_url, config.model.api_key())
    if config.prompt.image_columns():
        ds = undecoded(ds, [c for c in config.prompt.image_columns() if c in ds.column_names])
    _check_prompt_columns(config, ds, where)
    if recipe.logging.file:
        make_parent(recipe.logging.file, "logging.file")
    if num_splits > len(ds):  # an empty split would crash in shard() and could never be merged
        raise RecipeError(f"processing.num_splits {num_splits} is more than the {len(ds)} rows of {where}: use at most {len(ds)} splits")
    out_path = None
    if data.output.path:
        out_path = split_output_path(data.output.path, num_splits, split_id)
        check_output_path(out_path, data.output.path, data.input)
    start, stop = split_bounds(len(ds), num_splits, split_id)
    split = ds.shard(num_splits, split_id, contiguous=True)
    assert len(split) == stop - start
    _check_rows(config, split, start, where)
    checked = CheckedRecipe(ds, config, where, num_splits, split_id, split, start, out_path, _null_prompts(config, split))
    if checked.nulls and recipe.retry.on_error == "raise":
        raise RecipeError(f"{checked.nulls_text()} and retry.on_error is raise: fill or filter those rows, or set on_error: record")
    return checked


def _check_prompt_columns(config: TransformConfig, ds: Dataset, where: str) -> None:
    """The prompt's columns exist, and a prompt or messages column has the right type (checked
    on the schema: no row is read)."""
    prompt = config.prompt
    check_columns(prompt, ds.column_names, where)
    if prompt.template:
        return  # str.format takes any type
    field = "messages_column" if prompt.messages_column else "prompt_column"
    kind = ds.data.schema.field(prompt.column).type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    messages = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind)
    if pa.types.is_null(kind) or (text if prompt.source == "prompt" else messages):
        return
    want = "text" if prompt.source == "prompt" else "lists of {role, content} messages"
    other = "use messages_column for chat messages" if messages else "use prompt_column for text" if text else None
    hint = other or "use a template such as '{" + prompt.column + "}' to format other types"
    raise RecipeError(f"data.{field}: column {prompt.column!r} of {where} holds {kind}, not {want} ({hint})")


def _check_rows(config: TransformConfig, split: Dataset, start: int, where: str) -> None:
    """Rows that could not make a request, found before the first one is sent: prompt text that
    is not UTF-8, messages that are not messages, values the template cannot format (on the first rows:
    the rest are checked as they are sent)."""
    table = split.data.table
    for name in config.prompt.prompt_columns():  # the columns decoded to text; the rest are copied as they are
        _check_utf8(table.column(name), name, start, where)
    prompt = config.prompt
    if prompt.source == "messages":
        _check_messages(split, prompt.column, start, where)
    elif prompt.template:
        first = split.select_columns(prompt.prompt_columns())[:_TEMPLATE_ROWS_CHECKED]
        for i in range(len(first[prompt.prompt_columns()[0]])):
            values = {name: first[name][i] for name in first}
            if not any(map(is_null, values.values())):
                format_template(prompt.template, values, f"data.template: row {start + i} of {where}")


def _check_utf8(column: pa.ChunkedArray, name: str, start: int, where: str) -> None:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return
    offset = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            for i, value in enumerate(chunk.view(binary).to_pylist()):
                try:
                    value is None or value.decode("utf-8")
                except UnicodeDecodeError:
                    raise RecipeError(
                        f"data.input: row {start + offset + i} of {where}, column {name!r}: not UTF-8 text: write the file as UTF-8"
                    ) from None
        offset += len(chunk)


def _check_messages(split: Dataset, name: str, start: int, where: str) -> None:
    """Every message of every row has a role: on Arrow when the column is a list of structs,
    else (messages of mixed shapes, which datasets stores as JSON) row by row."""
    column = split.data.table.column(name)
    kind = column.type
    if pa.types.is_null(kind):
        return
    struct = kind.value_type
    if pa.types.is_struct(struct) and struct.get_field_index("role") >= 0:
        offset = 0
        for chunk in column.chunks:
            flat = pc.list_flatten(chunk)
            missing = pc.fill_null(pc.or_(flat.is_null(), pc.struct_field(flat, "role").is_null()), True)
            if pc.any(missing).as_py():
                first = int(pc.index(missing, True).as_py())
                row = int(pc.list_parent_indices(chunk)[first].as_py())
                message = first - int(chunk.offsets[row].as_py()) + int(chunk.offsets[0].as_py())
                raise RecipeError(f"data.messages_column: row {start + offset + row} of {where}: message {message} has no 'role'")
            offset += len(chunk)
        return
    offset = 0
    for batch in split.select_columns([name]).iter(batch_size=10_000):
        for i, messages in enumerate(batch[name]):
            problem = None if is_null(messages) else messages_problem(messages)
            if problem is not None:
                raise RecipeError(f"data.messages_column: row {start + offset + i} of {where}: {problem}")
        offset += len(batch[name])


def _null_prompts(config: TransformConfig, ds: Dataset) -> np.ndarray:
    """True for the rows of ``ds`` whose prompt is null (they get an error and are not sent)."""
    table = ds.data.table
    mask = np.zeros(len(ds), dtype=bool)
    for name in config.prompt.prompt_columns():
        mask |= table.column(name).is_null().to_numpy(zero_copy_only=False)
    return mask


# --------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """Where a split's work lives and what of it is done."""

    work_dir: str
    split_dir: str
    gen_key: str  # what decides the text (TransformConfig.fingerprint)
    chunks: list[Chunk]
    done_before: set[int]  # chunks finished by an earlier run
    served_model: str | None = None  # what the servers said they serve (model.model unset)

    @property
    def cached(self) -> list[Chunk]:
        return [c for c in self.chunks if c.index in self.done_before]

    @property
    def todo(self) -> list[Chunk]:
        return [c for c in self.chunks if c.index not in self.done_before]

    @property
    def reused(self) -> int:
        return sum(c.rows for c in self.cached)


def _plan(recipe: Recipe, checked: CheckedRecipe, transform: VllmGenerate, work: str, folder: str) -> _Plan:
    for leftover in glob.glob(os.path.join(folder, "tmp*")):
        os.remove(leftover)  # a chunk that map was writing when an earlier run was killed

    served_model, unreachable = _served_model(transform, folder)
    size = recipe.processing.chunk_size
    gen_key = transform.config.fingerprint(served_model)
    chunks = plan_chunks(checked.split, folder, size, gen_key)
    columns = transform.new_columns.column_names
    plan = _Plan(work, folder, gen_key, chunks, {c.index for c in chunks if check_chunk(c, columns)}, served_model)
    if unreachable is not None and plan.todo:
        raise unreachable  # rows are left to send, and no server answers
    if plan.done_before:
        logger.info(
            "resuming: %d of %d chunks (%d rows) are done and will not be sent again", len(plan.done_before), len(chunks), plan.reused
        )
    split_stop = checked.split_start + len(checked.split)
    logger.info(
        "split %d of %d: rows %d to %d of %s, %d chunks of %d rows",
        checked.split_id, checked.num_splits, checked.split_start, split_stop, checked.where, len(chunks), size,
    )  # fmt: skip
    return plan


def _served_model(transform: VllmGenerate, folder: str) -> tuple[str | None, ServerUnavailableError | None]:
    """With ``model.model`` unset, the model the servers serve: it decides the text, so it is part
    of the chunk keys (a server now serving another model never resumes from the old one's chunks).

    It is saved in the split's folder, so that a run with nothing left to send (every chunk done,
    only the output or the Hub push to redo) works with no server up: then this returns the saved
    model and the error, which the caller raises if a chunk is left to send after all.
    """
    if transform.config.model.model is not None:
        return None, None
    saved = os.path.join(folder, "served_model.json")
    try:
        model = run_on_loop(transform.connect().resolve_model()).result()
    except ServerUnavailableError as err:
        if not os.path.exists(saved):
            raise
        return str(json.loads(Path(saved).read_text())["model"]), err
    write_json(saved, {"model": model})
    return model, None


# --------------------------------------------------------------------------- the map loop


def _generate(recipe: Recipe, checked: CheckedRecipe, plan: _Plan, transform: VllmGenerate, progress: bool) -> tuple[Dataset, int]:
    """Every chunk's rows with their new columns, and how many rows retry_failed sent again."""
    p = recipe.processing
    split, offset = checked.split, checked.split_start
    client = transform.connect()
    parts: list[Dataset] = []
    retried = 0
    with contextlib.ExitStack() as scope:
        scope.enter_context(datasets_bars_off())  # ours covers the whole split
        stop = scope.enter_context(_sticky_interrupt())
        scope.callback(_Progress(len(split), plan.reused, client.stats, progress).close)
        scope.callback(transform.close)
        lookahead = Lookahead(transform, stop)
        scope.callback(lookahead.close)
        function = lookahead if p.num_proc == 1 else transform.generated_table
        if recipe.retry.retry_failed:
            # Before the feeder starts: these maps would take the batches it sends ahead for
            # the unfinished chunks, and every row of those would be sent twice.
            for chunk in plan.cached:
                piece = split.select(range(chunk.start, chunk.stop))
                done = map_chunk(lookahead, transform, piece, chunk.path, chunk.key, p.batch_size, p.num_proc, offset + chunk.start)
                no_prompt = checked.no_prompt[chunk.start : chunk.stop]
                retried += retry_failed(lookahead, transform, chunk, piece, done, no_prompt, p.batch_size, offset + chunk.start)
        ranges = [(s, min(s + p.batch_size, c.stop)) for c in plan.todo for s in range(c.start, c.stop, p.batch_size)]
        servers = len(client.servers)
        max_ahead = _lookahead_batches(recipe, servers)
        if p.num_proc == 1 and ranges and max_ahead:
            lookahead.start(split, ranges, max_ahead, lambda: 2 * client.capacity)
        for chunk in plan.chunks:
            if stop.is_set():
                raise KeyboardInterrupt
            piece = split.select(range(chunk.start, chunk.stop))
            done = map_chunk(function, transform, piece, chunk.path, chunk.key, p.batch_size, p.num_proc, offset + chunk.start)
            parts.append(with_input(piece, done))
            if chunk.index not in plan.done_before:
                logger.info("chunk %d/%d done (%d rows)", chunk.index + 1, len(plan.chunks), chunk.rows)
    return (datasets.concatenate_datasets(parts) if parts else split), retried


def _lookahead_batches(recipe: Recipe, num_servers: int) -> int:
    """Batches the feeder may hold ahead of map: enough rows to keep every slot busy while the
    oldest batch waits for its slowest row (see the README's design notes), in whole batches."""
    p = recipe.processing
    per_server = fixed_concurrency(p.max_concurrency) or _NOMINAL_TARGET
    rows = p.lookahead if p.lookahead is not None else 128 * per_server * num_servers
    return -(-rows // p.batch_size)  # rounded up; 0 turns look-ahead off


class _Progress:
    """One progress bar for the split: rows/s, tokens/s, in flight, errors, ETA. A thread of its
    own reads the client's counters a few times a second: nothing is added per row."""

    def __init__(self, total: int, initial: int, stats: Stats, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.stats = stats
        self.bar = tqdm(total=total, initial=initial, unit="row", desc="generate", disable=not enabled, dynamic_ncols=True)
        self.start = time.monotonic()
        self._shown = stats.done  # rows of this client counted before the bar
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="vllm-generator-progress", daemon=True)
        if enabled:
            self._thread.start()

    def _tick(self) -> None:
        while not self._closed.wait(0.2):
            self._refresh()

    def _refresh(self) -> None:
        stats = self.stats
        done = stats.done
        self.bar.update(done - self._shown)
        self._shown = done
        tok_s = stats.completion_tokens / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{tok_s:,.0f} tok/s, {stats.in_flight} in flight ({stats.targets()}), {stats.failed} errors", refresh=False
        )

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        self._refresh()
        self.bar.close()


@contextlib.contextmanager
def _sticky_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual and also sets the event this yields, which the
    map function checks before each batch: datasets' fingerprinting catches every exception while
    it hashes (Ctrl-C included), and a swallowed Ctrl-C must still stop the run."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def interrupt(signum: int, frame: object) -> None:
        flag.set()
        raise KeyboardInterrupt

    def unraisable(info: Any) -> None:
        # A Ctrl-C that lands in a __del__ (tqdm's, say) is "ignored" with a traceback on stderr;
        # the flag stops the run anyway, so say nothing
        if not isinstance(info.exc_value, KeyboardInterrupt):
            previous_hook(info)

    previous = signal.signal(signal.SIGINT, interrupt)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


# --------------------------------------------------------------------------- summary and outputs


def _summarize(
    recipe: Recipe, checked: CheckedRecipe, plan: _Plan, result: Dataset, retried: int, stats: Stats, started: float, serving: float
) -> RunSummary:
    from . import __version__

    wall = time.monotonic() - started
    busy = time.monotonic() - serving
    columns = checked.config.columns
    table = result.data.table
    failed = len(result) - table.column(columns.error).null_count
    # rows, not requests: with num_proc > 1 the requests are counted in the workers, not here
    unsent = int(sum(checked.no_prompt[c.start : c.stop].sum() for c in plan.todo))
    generated = len(checked.split) - plan.reused - stats.reused + retried - unsent
    return RunSummary(
        rows=len(result),
        succeeded=len(result) - failed,
        failed=failed,
        failed_by_type=dict(stats.failed_by_type) | ({"no_prompt": unsent} if unsent else {}),
        reused_rows=plan.reused + stats.reused,
        generated_rows=generated,
        requests=stats.requests,
        retries=stats.retries,
        prompt_tokens=int(pc.sum(table.column(columns.prompt_tokens)).as_py() or 0),
        completion_tokens=int(pc.sum(table.column(columns.completion_tokens)).as_py() or 0),
        wall_time_s=round(wall, 3),
        rows_per_s=round(generated / busy, 2) if busy else 0.0,
        requests_per_s=round(stats.requests / busy, 2) if busy else 0.0,
        tokens_per_s=round(stats.completion_tokens / busy, 2) if busy else 0.0,
        latency_s=_percentiles(stats.latencies),
        servers=[control.summary() for control in stats.servers],
        split_id=checked.split_id,
        num_splits=checked.num_splits,
        work_dir=plan.work_dir,
        recipe_hash=recipe.hash(),
        version=__version__,
    )


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 4) for q in (50, 90, 99)} | {"max": round(float(arr.max()), 4)}


def _write_outputs(recipe: Recipe, checked: CheckedRecipe, plan: _Plan, result: Dataset, summary: RunSummary) -> None:
    """The Parquet output (staged in the work folder for a Hub-only recipe), its metrics, and the
    Hub push; then the chunk caches of earlier settings go."""
    output = recipe.data.output
    split_id, num_splits = checked.split_id, checked.num_splits
    metadata = {
        "split_id": split_id,
        "num_splits": num_splits,
        "rows": len(result),
        "split_start": checked.split_start,
        "input_rows": len(checked.ds),
        "recipe_hash": summary.recipe_hash,
        "generation_fingerprint": plan.gen_key,
        "error_column": checked.config.columns.error,
        "version": summary.version,
    }
    local = checked.out_path or os.path.join(plan.work_dir, f"split-{split_tag(split_id, num_splits)}.parquet")
    write_parquet(result, local, metadata)
    summary.output_path = checked.out_path
    summary.metrics_path = metrics_path(local)
    write_json(summary.metrics_path, summary.to_dict())
    remove_stale_chunks(plan.split_dir, {f for c in plan.chunks for f in c.files()})
    # every chunk is done, so the journal holds nothing they do not: it goes, and a finished run
    # keeps one copy of its answers (the chunks, for retry_failed and a rerun without a server)
    remove_journal(plan.split_dir)
    if output.hub_repo_id:
        # an earlier run with another number of splits (or a merge) left files that would
        # duplicate these rows in the Hub split
        push_to_hub(
            local,
            output.hub_repo_id,
            hub_path(output.hub_split, split_id, num_splits),
            output.private,
            delete_patterns=[hub_pattern(output.hub_split)],
            keep_patterns=[hub_pattern(output.hub_split, num_splits)],
            readme=lambda files: render_card(
                output.hub_repo_id or "",
                output.hub_split,
                files,
                {**summary.to_dict(), "served_model": recipe.model.model or plan.served_model},
                recipe,
            ),
        )
        summary.hub_repo_id = output.hub_repo_id
        write_json(summary.metrics_path, summary.to_dict())
