"""Running a recipe: load, split, chunk, generate with look-ahead, write, record metrics.

Resume is ``datasets``' own cache: each chunk of the split is mapped to its own cache file, whose
name hashes the input, the chunk's rows and what decides the generated text. ``map`` writes a
temp file and renames it when the chunk is done, so a killed run leaves only finished chunks, and
running it again loads them instead of sending their rows.

Throughput: ``map`` waits for a whole batch before it asks for the next one, and a chunk ends
before the next starts. A feeder thread builds the requests of the batches ``map`` will ask for
next and hands them to the client ahead of time, so the servers stay full across batch and chunk
boundaries. Each batch that ``map`` gives is checked against the one sent ahead, body by body.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset

from .client import Result
from .errors import HubError, MergeError, RecipeError, ServerUnavailableError
from .recipe import GenerateConfig, InputConfig, Recipe
from .transform import VllmGenerate

__all__ = ["RunSummary", "run_recipe", "load_input", "split_output_path", "merge_outputs", "write_parquet"]

logger = logging.getLogger(__name__)

_META_KEY = b"vllm_generator"


# --------------------------------------------------------------------------- input


@contextlib.contextmanager
def _datasets_bars_off() -> Iterator[None]:
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_input(cfg: InputConfig) -> Dataset:
    """Load the recipe's input as a file-backed ``Dataset`` (so that ``map`` can cache)."""
    with _datasets_bars_off():  # a bad input then fails with one line on stderr, nothing before it
        return _load_input(cfg)


def _load_input(cfg: InputConfig) -> Dataset:
    if cfg.hub_id:
        try:
            ds = datasets.load_dataset(cfg.hub_id, cfg.config, split=cfg.split)
        except Exception as err:  # datasets raises many types here; all mean "cannot load"
            raise RecipeError(f"data.input.hub_id: cannot load {cfg.hub_id!r} split {cfg.split!r}: {err}") from err
    else:
        assert cfg.path is not None
        path = cfg.path
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "state.json")) and not os.path.exists(os.path.join(path, "dataset_dict.json")):
                raise RecipeError(f"data.input.path: {path} is a folder but not a save_to_disk dataset (no state.json)")
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise RecipeError(f"data.input.path: {path} has splits {list(loaded)}, not {cfg.split!r} (set data.input.split)")
                loaded = loaded[cfg.split]
            ds = loaded
        else:
            files = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
            if not files:
                raise RecipeError(f"data.input.path: no file matches {path}")
            kinds = {_file_kind(f) for f in files}
            if len(kinds) != 1 or None in kinds:
                raise RecipeError(f"data.input.path: {path} must name .parquet, .jsonl/.json or .csv files (found {', '.join(files[:3])})")
            kind = kinds.pop()
            try:
                ds = datasets.load_dataset(kind, data_files=files, split="train")
            except Exception as err:  # a malformed file: name it, keep the cause
                if kind == "parquet" and _parquet_rows(files) == 0:  # datasets fails on these with a cryptic Arrow error
                    raise RecipeError(f"data.input: {path} has no rows") from None
                raise RecipeError(f"data.input.path: cannot read {path}: {_cause(err)}") from err
    if not isinstance(ds, Dataset):
        raise RecipeError(f"data.input: expected one split, got {type(ds).__name__}")
    if len(ds) == 0:
        raise RecipeError(f"data.input: {cfg.path or cfg.hub_id} has no rows")
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    return ds


def _cause(err: BaseException) -> str:
    """The innermost message of an exception chain: datasets wraps a parser's error in its own
    "An error occurred while generating the dataset", which says nothing about the file."""
    messages: list[str] = []
    current: BaseException | None = err
    while current is not None and len(messages) < 10:
        if str(current).strip():
            messages.append(f"{type(current).__name__}: {str(current).strip()}")
        current = current.__cause__ or current.__context__
    return messages[-1] if messages else type(err).__name__


def _parquet_rows(files: list[str]) -> int | None:
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (OSError, pa.ArrowException):
        return None  # not readable: datasets says why


def _file_kind(path: str) -> str | None:
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    for suffix, kind in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    return None


def check_input_columns(config: GenerateConfig, ds: Dataset, where: str | None) -> None:
    """Raise ``RecipeError`` naming the recipe field when the prompt reads a column ``ds`` lacks,
    or a prompt or messages column of the wrong type (checked on the schema: no row is read)."""
    prompt = config.prompt
    field = "template" if prompt.template else "messages_column" if prompt.messages_column else "prompt_column"
    missing = [c for c in prompt.required_columns() if c not in ds.column_names]
    if missing:
        raise RecipeError(f"data.{field}: column(s) {', '.join(map(repr, missing))} not in {where} (columns: {', '.join(ds.column_names)})")
    if prompt.template:
        return  # str.format takes any type
    kind = ds.data.schema.field(prompt.column).type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    messages = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind)
    if pa.types.is_null(kind) or (text if prompt.source == "prompt" else messages):
        return
    want = "text" if prompt.source == "prompt" else "lists of {role, content} messages"
    other = "use messages_column for chat messages" if messages else "use prompt_column for text" if text else None
    hint = other or "use a template such as '{" + prompt.column + "}' to format other types"
    raise RecipeError(f"data.{field}: column {prompt.column!r} of {where} holds {kind}, not {want} ({hint})")


def null_prompt_mask(config: GenerateConfig, ds: Dataset) -> np.ndarray:
    """True for the rows of ``ds`` whose prompt is null (they get an error and are not sent)."""
    table = ds.data.table
    mask = np.zeros(len(ds), dtype=bool)
    for name in config.prompt.required_columns():
        mask |= table.column(name).is_null().to_numpy(zero_copy_only=False)
    return mask



def split_bounds(num_rows: int, num_splits: int, split_id: int) -> tuple[int, int]:
    """Row range of ``Dataset.shard(num_splits, split_id, contiguous=True)``."""
    div, mod = divmod(num_rows, num_splits)
    start = div * split_id + min(split_id, mod)
    return start, start + div + (1 if split_id < mod else 0)


def split_output_path(path: str, num_splits: int, split_id: int) -> str:
    """``out.parquet`` for a single split; ``out.split-00001-of-00004.parquet`` for split 1 of 4."""
    if num_splits == 1:
        return path
    return f"{path.removesuffix('.parquet')}.split-{split_id:05d}-of-{num_splits:05d}.parquet"


# --------------------------------------------------------------------------- output


def _write_batches(path: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch], metadata: dict[str, Any]) -> None:
    """Stream record batches to a Parquet file atomically (temp file, fsync, rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    schema = schema.with_metadata({**(schema.metadata or {}), _META_KEY: json.dumps(metadata).encode()})
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_parquet(ds: Dataset, path: str, metadata: dict[str, Any]) -> None:
    """Write ``ds`` to ``path`` atomically with our metadata (split, rows, settings' hash)."""
    table = ds.data.table
    _write_batches(path, table.schema, table.to_batches(max_chunksize=10_000), metadata)


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_output_metadata(path: str) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    if _META_KEY not in meta:
        raise MergeError(f"{path} was not written by vllm-generator (no metadata): rerun its split")
    return dict(json.loads(meta[_META_KEY]))


def push_to_hub(
    local_path: str, repo_id: str, path_in_repo: str, private: bool, api: Any = None,
    delete_patterns: list[str] | None = None, keep_patterns: list[str] | None = None,
) -> None:  # fmt: skip
    """Upload one Parquet file to a Hub dataset repo, creating the repo if needed, in one commit
    that also deletes the files matching ``delete_patterns`` but not ``keep_patterns``.

    Each split uploads its own file name (``data/<split>-<i>-of-<n>.parquet``), so splits pushing
    to one repo never delete each other's files, which ``Dataset.push_to_hub`` would do.
    The token comes from ``HF_TOKEN`` or the saved login (huggingface_hub reads them).

    Raises:
        HubError: the Hub refused or could not be reached; ``local_path`` is kept.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    try:
        api = api or HfApi()
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        operations: list[Any] = [CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=local_path)]
        if delete_patterns:
            existing = api.list_repo_files(repo_id, repo_type="dataset")
            operations += [
                CommitOperationDelete(path_in_repo=f)
                for f in existing
                # the whole path must match: Path.match would also take "old/data/train-0.parquet"
                if f != path_in_repo
                and any(fnmatch.fnmatchcase(f, p) for p in delete_patterns)
                and not any(fnmatch.fnmatchcase(f, p) for p in keep_patterns or [])
            ]
        api.create_commit(repo_id, operations=operations, repo_type="dataset", commit_message=f"vllm-generator: upload {path_in_repo}")
    except Exception as err:  # huggingface_hub and its HTTP client raise many types; all mean "not pushed"
        raise HubError(
            f"pushing {local_path} to the Hub dataset {repo_id} failed ({type(err).__name__}: {err}); the file is "
            "kept: check HF_TOKEN (or `hf auth login`) and the network, then run the same command again to push it"
        ) from err
    logger.info("pushed %s to https://huggingface.co/datasets/%s (%s)", local_path, repo_id, path_in_repo)


# --------------------------------------------------------------------------- the run


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


@dataclass
class _Chunk:
    index: int
    start: int  # rows of the split
    stop: int
    path: str
    key: str  # hash of the input, these rows and the generation settings (also map's fingerprint)

    def files(self) -> list[str]:
        """The chunk's finished cache files: ``path``, or with ``num_proc`` N the N files
        ``<path>_0000i_of_0000N.arrow`` that map writes instead; [] while it is not done."""
        if os.path.exists(self.path):
            return [self.path]
        stem = self.path.removesuffix(".arrow")
        shards: dict[int, list[str]] = {}
        for f in glob.glob(f"{glob.escape(stem)}_*_of_*.arrow"):
            parts = f[len(stem) + 1 : -len(".arrow")].split("_of_")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                shards.setdefault(int(parts[1]), []).append(f)
        complete = [sorted(fs) for n, fs in shards.items() if len(fs) == n]
        return complete[0] if complete else []

    @property
    def cached(self) -> bool:
        return bool(self.files())


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 4) for q in (50, 90, 99)} | {"max": round(float(arr.max()), 4)}


class _Feeder(threading.Thread):
    """Builds and submits the batches ``map`` will ask for next, at most ``max_ahead`` of them."""

    def __init__(
        self, transform: VllmGenerate, source: Dataset, ranges: list[tuple[int, int]], max_ahead: int, max_unfinished: int | None = None
    ) -> None:
        super().__init__(name="vllm-generator-feeder", daemon=True)
        self.transform = transform
        self.source = source.select_columns(transform.config.prompt.required_columns())
        self.ranges = ranges
        self.max_ahead = max_ahead
        self.max_unfinished = max_unfinished  # see VllmGenerate.submit_ahead
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        # before the thread runs: map's first batch must wait for it, not send the batch itself
        self.transform.feeding(True)
        super().start()

    def run(self) -> None:
        try:
            for start, stop in self.ranges:
                batch = self.source[start:stop]
                if not self.transform.submit_ahead(batch, self.max_ahead, self.stopped, self.max_unfinished):
                    return
        except BaseException as err:  # reported by map itself when it builds the same batch
            self.error = err
        finally:
            # everything is queued (or the feeder failed): map takes what is left, then sends itself
            self.transform.feeding(False)

    def stop(self) -> None:
        self.stopped.set()
        self.transform.feeding(False)
        self.transform.cancel_ahead()
        self.join(timeout=10)


class _Progress:
    """One progress bar for the split: rows/s, tokens/s, in flight, errors, ETA."""

    def __init__(self, total: int, initial: int, transform: VllmGenerate, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.client = transform.client
        self.bar = tqdm(total=total, initial=initial, unit="row", desc="generate", disable=not enabled, dynamic_ncols=True)
        self.start = time.monotonic()
        self.last = self.start
        self.pending = 0  # rows done since the bar was last updated

    def __call__(self, result: Result) -> None:
        # On the loop thread, once per row: count, and touch the bar a few times a second only
        # (a tqdm update per row costs the hot path several microseconds).
        self.pending += 1
        now = time.monotonic()
        if now - self.last > 0.2:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        self.last = now
        self.bar.update(self.pending)
        self.pending = 0
        stats = self.client.stats
        tok_s = stats.completion_tokens / max(now - self.start, 1e-9)
        self.bar.set_postfix_str(f"{tok_s:,.0f} tok/s, {stats.in_flight} in flight, {stats.failed} errors", refresh=False)

    def close(self) -> None:
        self._refresh(time.monotonic())
        self.bar.close()


def _map_chunk(
    transform: VllmGenerate, ds: Dataset, path: str, fingerprint: str, batch_size: int, num_proc: int, offset: int
) -> Dataset:
    """The new columns for the rows of ``ds``, generated or read from the cache file ``path``.

    Only the new columns: map then neither re-encodes the input columns of every batch nor copies
    them into its cache file (``_with_input`` joins them back). Measured on the pipeline benchmark,
    the main thread's writes took 6 ms of CPU per 1,024-row batch with the input merged back in.
    """
    done = ds.map(
        transform.generated_table,
        input_columns=transform.prompt_columns,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        fn_kwargs={"offset": offset},
        cache_file_name=path,
        new_fingerprint=fingerprint,
        num_proc=num_proc if num_proc > 1 else None,
        load_from_cache_file=True,
        desc="generate",
    )
    # a cache written before caches held only the new columns: keep those (the input is joined back)
    new = transform.new_column_names
    return done if done.column_names == new else done.select_columns(new)


def _with_input(piece: Dataset, generated: Dataset) -> Dataset:
    """The rows of ``piece`` with the generated columns (which replace input columns of the same name)."""
    clash = [c for c in generated.column_names if c in piece.column_names]
    return datasets.concatenate_datasets([piece.remove_columns(clash) if clash else piece, generated], axis=1)


def _retry_failed(
    transform: VllmGenerate, chunk: _Chunk, piece: Dataset, done: Dataset, no_prompt: np.ndarray, batch_size: int, offset: int
) -> int:
    """Send again the rows of a finished chunk (input ``piece``, new columns ``done``) whose
    ``error`` is set and rewrite the chunk's cache; returns how many rows were sent."""
    errors = done.data.table.column(transform.config.columns.error)
    # rows with no prompt (``no_prompt``) stay as they are: sending them again cannot help
    retry = errors.is_valid().to_numpy(zero_copy_only=False) & ~no_prompt
    failed = np.flatnonzero(retry)
    if failed.size == 0:
        return 0
    logger.info("chunk %d: sending %d failed rows again (retry_failed)", chunk.index, failed.size)
    key = hashlib.sha256(failed.tobytes()).hexdigest()[:12]
    retry_path = chunk.path.removesuffix(".arrow") + f".retry-{key}.arrow"
    retried = _map_chunk(transform, piece.select(failed), retry_path, f"retry-{key}", batch_size, 1, offset)
    ok = np.flatnonzero(~retry)
    table = done.data.table
    combined = pa.concat_tables([table.take(ok), retried.data.table.select(table.column_names).cast(table.schema)])
    order = np.empty(len(done), dtype=np.int64)
    order[ok] = np.arange(ok.size)
    order[failed] = ok.size + np.arange(failed.size)
    merged = combined.take(order)
    shards = [f for f in chunk.files() if f != chunk.path]  # written by map with num_proc > 1
    # replace the chunk's cache atomically: the next run sees only rows that still fail
    tmp = chunk.path + f".tmp-{os.getpid()}"
    with datasets.arrow_writer.ArrowWriter(path=tmp) as writer:
        writer.write_table(merged)
        writer.finalize()
    os.replace(tmp, chunk.path)
    for shard in shards:  # map would prefer them to the new file when num_proc matches
        os.remove(shard)
    with contextlib.suppress(FileNotFoundError):
        os.remove(retry_path)
    return int(failed.size)


@contextlib.contextmanager
def _sticky_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual and also sets the event this yields, which the
    transform checks before each batch: datasets' fingerprinting catches every exception while
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


def _lookahead_batches(recipe: Recipe, num_servers: int) -> int:
    p = recipe.processing
    # Enough rows ahead to keep every slot busy while the oldest batch waits for its slowest row:
    # with heavy-tailed latencies (a reasoning trace can take 100x the mean) that is the rows the
    # servers finish meanwhile, ~ (slowest / mean latency) x slots. Measured with lognormal
    # latencies (benchmarks/bench_throughput.py, 32,768 rows): 16 x slots took 2.1x as long as
    # a client that never waits for map, 128 x slots the same time. The feeder only goes that far
    # ahead while map waits for a slow row; otherwise it stops once the client holds 2 x slots
    # unfinished rows (_Feeder.max_unfinished), which keeps memory low.
    rows = p.lookahead if p.lookahead is not None else 128 * p.max_concurrency * num_servers
    return -(-rows // p.batch_size)  # whole batches, rounded up; 0 turns look-ahead off


def run_recipe(recipe: Recipe, *, progress: bool = True, base_url: list[str] | None = None) -> RunSummary:
    """Run a recipe's split end to end; returns what it did (also written as the metrics file).

    Everything that can be checked without a server (input, columns, split, output path) is
    checked before managed servers start or any request is sent. ``base_url`` replaces the
    recipe's servers.

    Raises:
        RecipeError: bad input (before any request). ServerUnavailableError, GenerationError:
        the run stopped; finished chunks are kept and the next run resumes from them.
    """
    started = time.monotonic()
    checked = check_recipe(recipe)
    if checked.nulls:
        logger.warning("%s: they get an error and are not sent", checked.nulls_text())
    if recipe.model.serve is not None and base_url is None:
        from .serve import serve_models

        with serve_models(recipe.model.serve) as urls:
            return _run_split(recipe, checked, urls, progress, started)
    return _run_split(recipe, checked, base_url, progress, started)


@dataclass
class CheckedRecipe:
    """What ``check_recipe`` found: the input, this run's split and where its output goes."""

    ds: Dataset
    config: GenerateConfig
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


def check_recipe(recipe: Recipe) -> CheckedRecipe:
    """Every check that needs no server: the split, the input and its prompt columns, the output
    path, and null prompts (an error with ``on_error: raise``). Used by run and validate alike.

    Raises:
        RecipeError: naming the field and what to do.
    """
    num_splits, split_id = recipe.processing.resolved_split()
    data = recipe.data
    ds = load_input(data.input)
    where = str(data.input.path or data.input.hub_id)
    config = recipe.generate_config()
    check_input_columns(config, ds, where)
    if num_splits > len(ds):  # an empty split would crash in shard() and could never be merged
        raise RecipeError(f"processing.num_splits {num_splits} is more than the {len(ds)} rows of {where}: use at most {len(ds)} splits")
    out_path = None
    if data.output.path:
        out_path = split_output_path(data.output.path, num_splits, split_id)
        _check_output_path(out_path, data.output.path, data.input)
    start, stop = split_bounds(len(ds), num_splits, split_id)
    split = ds.shard(num_splits, split_id, contiguous=True)
    assert len(split) == stop - start
    checked = CheckedRecipe(ds, config, where, num_splits, split_id, split, start, out_path, null_prompt_mask(config, split))
    if checked.nulls and recipe.retry.on_error == "raise":
        raise RecipeError(f"{checked.nulls_text()} and retry.on_error is raise: fill or filter those rows, or set on_error: record")
    return checked


def _check_output_path(path: str, output: str, cfg: InputConfig) -> None:
    """Refuse an output that would overwrite the input or be read as input by the next run (the
    Parquet file or the metrics JSON beside it), and a folder that cannot be made."""
    if cfg.path:
        source = os.path.abspath(cfg.path)
        written = {os.path.abspath(p) for p in (output, path)}
        written |= {p.removesuffix(".parquet") + ".metrics.json" for p in written}
        for candidate in sorted(written):
            inside = os.path.isdir(source) and candidate.startswith(source + os.sep)  # a save_to_disk folder
            if candidate == source or inside or _glob_matches(candidate, source):
                raise RecipeError(
                    f"data.output.path {output} writes {candidate}, which data.input.path {cfg.path} reads: write the output somewhere else"
                )
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise RecipeError(f"data.output.path: cannot create the folder {folder} ({err.strerror or err})") from err


def _glob_matches(path: str, pattern: str) -> bool:
    """Whether ``glob.glob(pattern)`` would list ``path`` (its ``*`` stops at a ``/``)."""
    names, parts = path.split(os.sep), pattern.split(os.sep)
    return glob.has_magic(pattern) and len(names) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts))


def _run_split(recipe: Recipe, checked: CheckedRecipe, base_url: list[str] | None, progress: bool, started: float) -> RunSummary:
    from . import __version__

    serving = time.monotonic()  # rates leave out the servers' start-up
    data = recipe.data
    where, num_splits, split_id, out_path = checked.where, checked.num_splits, checked.split_id, checked.out_path
    split, split_start = checked.split, checked.split_start
    split_stop = split_start + len(split)
    config = recipe.generate_config(base_url) if base_url is not None else checked.config
    transform = VllmGenerate(config)

    if recipe.processing.work_dir:
        # several recipes may share a work_dir: each output gets its own folder in it
        owner = os.path.abspath(data.output.path) if data.output.path else f"hub:{data.output.hub_repo_id}:{data.output.hub_split}"
        tag = hashlib.sha256(owner.encode()).hexdigest()[:8]
        work_dir = os.path.join(recipe.processing.work_dir, f"{Path(data.output.path or 'hub').stem}-{tag}")
    elif data.output.path:
        work_dir = f"{data.output.path}.work"
    else:  # Hub only: one folder per repo and split, or recipes run from one folder delete each other's caches
        assert data.output.hub_repo_id is not None
        work_dir = os.path.join(".vllm_generator_work", data.output.hub_repo_id.replace("/", "--"), data.output.hub_split)
    split_dir = os.path.join(work_dir, f"split-{split_id:05d}-of-{num_splits:05d}")
    try:
        os.makedirs(split_dir, exist_ok=True)
    except OSError as err:
        raise RecipeError(f"processing.work_dir: cannot create {split_dir} ({err.strerror or err})") from err
    for leftover in glob.glob(os.path.join(split_dir, "tmp*")):
        os.remove(leftover)  # a chunk that map was writing when an earlier run was killed

    served_model, unreachable = _served_model(transform, split_dir)
    size = recipe.processing.chunk_size
    gen_key = config.fingerprint(served_model)
    chunks = _chunks(split, split_dir, size, gen_key)
    cached = [c for c in chunks if c.cached]  # a glob of the split's folder per chunk: once
    done_before = {c.index for c in cached}
    if unreachable is not None and len(cached) < len(chunks):
        raise unreachable  # rows are left to send, and no server answers
    reused = sum(c.stop - c.start for c in cached)
    if cached:
        logger.info("resuming: %d of %d chunks (%d rows) are done and will not be sent again", len(cached), len(chunks), reused)
    logger.info(
        "split %d of %d: rows %d to %d of %s, %d chunks of %d rows",
        split_id, num_splits, split_start, split_stop, where, len(chunks), size,
    )

    batch_size = recipe.processing.batch_size
    num_proc = recipe.processing.num_proc
    todo = [c for c in chunks if c.index not in done_before]
    ranges = [(s, min(s + batch_size, c.stop)) for c in todo for s in range(c.start, c.stop, batch_size)]
    bar = _Progress(len(split), reused, transform, progress)
    transform.client.on_result = bar
    feeder = None
    parts: list[Dataset] = []
    retried = 0  # rows of finished chunks sent again (retry_failed)
    scope = contextlib.ExitStack()
    scope.enter_context(_datasets_bars_off())  # ours covers the whole split
    transform.interrupted = scope.enter_context(_sticky_interrupt())
    try:
        if recipe.retry.retry_failed:
            # Before the feeder starts: these maps would take the batches it sends ahead for
            # the unfinished chunks, and every row of those would be sent twice.
            for chunk in cached:
                piece = split.select(range(chunk.start, chunk.stop))
                done = _map_chunk(transform, piece, chunk.path, chunk.key, batch_size, num_proc, split_start + chunk.start)
                no_prompt = checked.no_prompt[chunk.start : chunk.stop]
                retried += _retry_failed(transform, chunk, piece, done, no_prompt, batch_size, split_start + chunk.start)
        max_ahead = _lookahead_batches(recipe, len(config.model.base_url))
        if num_proc == 1 and ranges and max_ahead:
            feeder = _Feeder(transform, split, ranges, max_ahead, 2 * recipe.processing.max_concurrency * len(config.model.base_url))
            feeder.start()
        for chunk in chunks:
            if transform.interrupted.is_set():
                raise KeyboardInterrupt
            piece = split.select(range(chunk.start, chunk.stop))
            done = _map_chunk(transform, piece, chunk.path, chunk.key, batch_size, num_proc, split_start + chunk.start)
            parts.append(_with_input(piece, done))
            if chunk.index not in done_before:
                logger.info("chunk %d/%d done (%d rows)", chunk.index + 1, len(chunks), chunk.stop - chunk.start)
    finally:
        scope.close()
        if feeder is not None:
            feeder.stop()
        transform.client.on_result = None
        transform.close()
        bar.close()

    result = datasets.concatenate_datasets(parts) if parts else split
    wall = time.monotonic() - started
    busy = time.monotonic() - serving
    stats = transform.client.stats
    table = result.data.table
    failed = len(result) - table.column(config.columns.error).null_count
    # rows, not requests: with num_proc > 1 the requests are counted in the workers, not here
    unsent = int(sum(checked.no_prompt[c.start : c.stop].sum() for c in todo))
    generated = len(split) - reused + retried - unsent
    summary = RunSummary(
        rows=len(result),
        succeeded=len(result) - failed,
        failed=failed,
        failed_by_type=dict(stats.failed_by_type) | ({"no_prompt": unsent} if unsent else {}),
        reused_rows=reused,
        generated_rows=generated,
        requests=stats.requests,
        retries=stats.retries,
        prompt_tokens=int(pc.sum(table.column(config.columns.prompt_tokens)).as_py() or 0),
        completion_tokens=int(pc.sum(table.column(config.columns.completion_tokens)).as_py() or 0),
        wall_time_s=round(wall, 3),
        rows_per_s=round(generated / busy, 2) if busy else 0.0,
        requests_per_s=round(stats.requests / busy, 2) if busy else 0.0,
        tokens_per_s=round(stats.completion_tokens / busy, 2) if busy else 0.0,
        latency_s=_percentiles(stats.latencies),
        split_id=split_id,
        num_splits=num_splits,
        work_dir=work_dir,
        recipe_hash=recipe.hash(),
        version=__version__,
    )
    metadata = {
        "split_id": split_id,
        "num_splits": num_splits,
        "rows": len(result),
        "split_start": split_start,
        "input_rows": len(checked.ds),
        "recipe_hash": summary.recipe_hash,
        "generation_fingerprint": gen_key,
        "error_column": config.columns.error,
        "version": __version__,
    }
    local = out_path
    if local is None:  # Hub only: stage the file in the work dir
        local = os.path.join(work_dir, f"split-{split_id:05d}-of-{num_splits:05d}.parquet")
    write_parquet(result, local, metadata)
    summary.output_path = out_path
    summary.metrics_path = local.removesuffix(".parquet") + ".metrics.json"
    _write_json(summary.metrics_path, summary.to_dict())
    _remove_stale_chunks(split_dir, {f for c in chunks for f in c.files()})
    if data.output.hub_repo_id:
        path_in_repo = f"data/{data.output.hub_split}-{split_id:05d}-of-{num_splits:05d}.parquet"
        # an earlier run with another number of splits (or a merge) left files that would
        # duplicate these rows in the Hub split
        push_to_hub(
            local, data.output.hub_repo_id, path_in_repo, data.output.private,
            delete_patterns=[_hub_file(data.output.hub_split)],
            keep_patterns=[_hub_file(data.output.hub_split, num_splits)],
        )  # fmt: skip
        summary.hub_repo_id = data.output.hub_repo_id
        _write_json(summary.metrics_path, summary.to_dict())
    return summary


def _chunks(split: Dataset, split_dir: str, size: int, gen_key: str) -> list[_Chunk]:
    chunks = []
    for index, start in enumerate(range(0, len(split), size)):
        stop = min(start + size, len(split))
        key = hashlib.sha256(f"{split._fingerprint}|{start}|{stop}|{gen_key}".encode()).hexdigest()[:16]
        chunks.append(_Chunk(index, start, stop, os.path.join(split_dir, f"chunk-{index:06d}-{key}.arrow"), key))
    return chunks


def _served_model(transform: VllmGenerate, split_dir: str) -> tuple[str | None, ServerUnavailableError | None]:
    """With ``model.model`` unset, the model the servers serve: it decides the text, so it is part
    of the chunk keys (a server now serving another model never resumes from the old one's chunks).

    It is saved in the split's folder, so that a run with nothing left to send (every chunk done,
    only the output or the Hub push to redo) works with no server up: then this returns the saved
    model and the error, which the caller raises if a chunk is left to send after all.
    """
    if transform.config.model.model is not None:
        return None, None
    from .client import run_on_loop

    saved = os.path.join(split_dir, "served_model.json")
    try:
        model = run_on_loop(transform.client.resolve_model()).result()
    except ServerUnavailableError as err:
        if not os.path.exists(saved):
            raise
        return str(json.loads(Path(saved).read_text())["model"]), err
    _write_json(saved, {"model": model})
    return model, None


def _hub_file(hub_split: str, num_splits: int | None = None) -> str:
    """The pattern of a Hub split's data files, of any number of splits or of ``num_splits``
    (exact digits: "train" must not take "train-v2-00000-of-00001.parquet")."""
    five = "[0-9]" * 5
    return f"data/{hub_split}-{five}-of-{five if num_splits is None else f'{num_splits:05d}'}.parquet"


def _remove_stale_chunks(split_dir: str, keep: set[str]) -> None:
    """Delete chunk caches of earlier configurations (another generation fingerprint)."""
    for path in glob.glob(os.path.join(split_dir, "chunk-*.arrow")):  # also finished .retry- maps
        if path not in keep:
            logger.debug("removing stale chunk cache %s", path)
            os.remove(path)


# --------------------------------------------------------------------------- merge


def _split_files(path: str) -> Iterator[tuple[int, int, str]]:
    stem = path.removesuffix(".parquet")
    for f in sorted(glob.glob(f"{glob.escape(stem)}.split-*-of-*.parquet")):
        parts = f[len(stem) + len(".split-") : -len(".parquet")].split("-of-")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            yield int(parts[0]), int(parts[1]), f


def merge_outputs(path: str, *, hub_repo_id: str | None = None, hub_split: str = "train", private: bool = True, api: Any = None) -> dict[str, Any]:
    """Join ``<path stem>.split-*-of-N.parquet`` into ``path`` (and optionally one Hub split).

    Raises:
        MergeError: a split is missing, from another recipe, or has the wrong number of rows.
    """
    found = list(_split_files(path))
    if not found:
        raise MergeError(f"no split outputs next to {path} (expected files like {split_output_path(path, 2, 0)})")
    counts = {n for _, n, _ in found}
    if len(counts) != 1:
        listed = "; ".join(f"{n} splits: {', '.join(f for _, c, f in found if c == n)}" for n in sorted(counts))
        raise MergeError(f"split outputs of {path} disagree on the number of splits ({listed}): remove the stale ones")
    num_splits = counts.pop()
    by_id = {i: f for i, _, f in found}
    missing = [i for i in range(num_splits) if i not in by_id]
    if missing:
        raise MergeError(
            f"cannot merge {path}: split(s) {', '.join(map(str, missing))} of {num_splits} have no output yet; "
            f"run them with --split-id I --num-splits {num_splits} (finished splits are kept)"
        )
    metas = [read_output_metadata(by_id[i]) for i in range(num_splits)]
    groups: dict[str, list[str]] = {}
    for i, m in enumerate(metas):
        groups.setdefault(m["generation_fingerprint"], []).append(str(i))
    if len(groups) != 1:
        listed = " vs ".join(f"split(s) {', '.join(ids)}" for ids in groups.values())
        raise MergeError(f"cannot merge {path}: the splits were generated with different settings ({listed}); rerun the odd ones")
    sizes = [m["input_rows"] for m in metas]
    if len(set(sizes)) != 1:
        # checked first: measured against split 0, a good split would be blamed for an odd split 0
        listed = ", ".join(f"split {i}: {n}" for i, n in enumerate(sizes))
        raise MergeError(
            f"cannot merge {path}: the splits were cut from inputs of different sizes ({listed} rows); "
            "rerun the odd ones with the same data.input"
        )
    input_rows = sizes[0]
    for i, m in enumerate(metas):
        expected = split_bounds(input_rows, num_splits, i)
        actual = pq.ParquetFile(by_id[i]).metadata.num_rows
        if m["input_rows"] != input_rows or actual != expected[1] - expected[0] or m["rows"] != actual:
            raise MergeError(
                f"cannot merge {path}: split {i} ({by_id[i]}) is incomplete: {actual} rows, expected {expected[1] - expected[0]}; rerun it"
            )
    files = [by_id[i] for i in range(num_splits)]
    schema = pq.read_schema(files[0])
    for i, f in enumerate(files[1:], 1):
        if not pq.read_schema(f).remove_metadata().equals(schema.remove_metadata()):
            raise MergeError(f"cannot merge {path}: split {i} ({f}) has other columns than split 0; rerun it")

    def batches() -> Iterator[pa.RecordBatch]:
        # streamed split by split: memory stays flat whatever the dataset's size
        for f in files:
            yield from pq.ParquetFile(f).iter_batches(batch_size=10_000)

    _write_batches(path, schema.remove_metadata().with_metadata({k: v for k, v in (schema.metadata or {}).items() if k != _META_KEY}),
                   batches(), {**metas[0], "split_id": None, "num_splits": 1, "rows": input_rows, "merged_from": num_splits})
    error_column = metas[0].get("error_column", "error")
    errors = sum(
        int(pq.read_table(f, columns=[error_column]).column(0).is_valid().to_numpy(zero_copy_only=False).sum())
        for f in files
        if error_column in schema.names
    )
    metrics = []
    for f in files:
        metrics_file = f.removesuffix(".parquet") + ".metrics.json"
        if os.path.exists(metrics_file):
            metrics.append(json.loads(Path(metrics_file).read_text()))
    totals = ("rows", "succeeded", "failed", "requests", "retries", "prompt_tokens", "completion_tokens", "generated_rows", "reused_rows")
    summed = {f"total_{k}": sum(m.get(k, 0) for m in metrics) for k in totals}
    summary = {"output_path": path, "rows": input_rows, "splits": num_splits, "rows_with_error": errors, **summed}
    _write_json(path.removesuffix(".parquet") + ".metrics.json", summary)
    if hub_repo_id:
        push_to_hub(path, hub_repo_id, f"data/{hub_split}-00000-of-00001.parquet", private, api=api, delete_patterns=[_hub_file(hub_split)])
        summary["hub_repo_id"] = hub_repo_id
    return summary
