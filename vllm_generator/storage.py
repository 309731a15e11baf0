"""Everything that touches files and the Hub: loading the input, where a split's files go, one
atomic write for every file, Parquet outputs with their metadata, and Hub uploads.

Split ``i`` of ``n`` has the tag ``0000i-of-0000n`` in every name it writes: its output
(``out.split-<tag>.parquet``), its work folder (``split-<tag>/``) and its Hub file
(``data/<hub_split>-<tag>.parquet``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import gzip
import hashlib
import importlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import tenacity
from datasets import Dataset

from .errors import HubError, MergeError, RecipeError
from .recipe import InputConfig, OutputConfig

__all__ = [
    "atomic_path",
    "check_output_path",
    "datasets_bars_off",
    "hold_lock",
    "hub_path",
    "hub_pattern",
    "load_input",
    "make_parent",
    "metrics_path",
    "no_space",
    "push_to_hub",
    "read_output_metadata",
    "split_bounds",
    "split_dir",
    "split_output_path",
    "split_outputs",
    "split_tag",
    "work_dir",
    "write_batches",
    "write_json",
    "write_parquet",
]

logger = logging.getLogger(__name__)

_META_KEY = b"vllm_generator"

# --------------------------------------------------------------------------- input


@contextlib.contextmanager
def datasets_bars_off() -> Iterator[None]:
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_input(cfg: InputConfig) -> Dataset:
    """Load the recipe's input as a file-backed ``Dataset`` (so that ``map`` can cache)."""
    # a bad input then fails with one line on stderr (ours, naming the file), nothing before it
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with datasets_bars_off():
            return _load_input(cfg)
    finally:
        quiet.setLevel(level)


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
                bad_line = _bad_json_line(files) if kind == "json" else None
                if bad_line is not None:
                    raise RecipeError(f"data.input.path: cannot read {bad_line}") from err
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


def _bad_json_line(files: list[str]) -> str | None:
    """Where the first line of JSON Lines files that is not one JSON value is, if any (a file
    holding one JSON document, an array say, is left to datasets' own message)."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if number == 1 and line.lstrip().startswith("["):
                    break
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as err:
                    return f"{path}: line {number} is not one JSON value ({err}): each line of a .jsonl file is one row"
    return None


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


def check_output_path(path: str, output: str, cfg: InputConfig) -> None:
    """Refuse an output that would overwrite the input or be read as input by the next run (the
    Parquet file or the metrics JSON beside it), and a folder that cannot be made."""
    if cfg.path:
        source = os.path.abspath(cfg.path)
        written = {os.path.abspath(p) for p in (output, path)}
        written |= {metrics_path(p) for p in written}
        for candidate in sorted(written):
            inside = os.path.isdir(source) and candidate.startswith(source + os.sep)  # a save_to_disk folder
            if candidate == source or inside or _glob_matches(candidate, source):
                raise RecipeError(
                    f"data.output.path {output} writes {candidate}, which data.input.path {cfg.path} reads: write the output somewhere else"
                )
    if os.path.isdir(path):
        raise RecipeError(f"data.output.path: {path} is a folder: name a .parquet file to write (it is replaced as a whole)")
    make_parent(path, "data.output.path")


def make_parent(path: str, field: str) -> None:
    """Create the folder ``path`` goes in; ``RecipeError`` naming the recipe ``field`` if it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise RecipeError(f"{field}: cannot create the folder {folder} ({err.strerror or err})") from err


def _glob_matches(path: str, pattern: str) -> bool:
    """Whether ``glob.glob(pattern)`` would list ``path`` (its ``*`` stops at a ``/``)."""
    names, parts = path.split(os.sep), pattern.split(os.sep)
    return glob.has_magic(pattern) and len(names) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts))


# --------------------------------------------------------------------------- where a split's rows and files are


def split_bounds(num_rows: int, num_splits: int, split_id: int) -> tuple[int, int]:
    """Row range of ``Dataset.shard(num_splits, split_id, contiguous=True)``."""
    div, mod = divmod(num_rows, num_splits)
    start = div * split_id + min(split_id, mod)
    return start, start + div + (1 if split_id < mod else 0)


def split_tag(split_id: int, num_splits: int) -> str:
    return f"{split_id:05d}-of-{num_splits:05d}"


def split_output_path(path: str, num_splits: int, split_id: int) -> str:
    """``out.parquet`` for a single split; ``out.split-00001-of-00004.parquet`` for split 1 of 4."""
    if num_splits == 1:
        return path
    return f"{path.removesuffix('.parquet')}.split-{split_tag(split_id, num_splits)}.parquet"


def split_outputs(path: str) -> Iterator[tuple[int, int, str]]:
    """``(split_id, num_splits, file)`` of each split output of ``path`` on disk."""
    stem = path.removesuffix(".parquet")
    for f in sorted(glob.glob(f"{glob.escape(stem)}.split-*-of-*.parquet")):
        parts = f[len(stem) + len(".split-") : -len(".parquet")].split("-of-")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            yield int(parts[0]), int(parts[1]), f


def metrics_path(parquet_path: str) -> str:
    """The metrics JSON beside a Parquet output."""
    return parquet_path.removesuffix(".parquet") + ".metrics.json"


def split_dir(work: str, split_id: int, num_splits: int) -> str:
    """A split's folder in the work folder: its chunk caches and status file."""
    return os.path.join(work, f"split-{split_tag(split_id, num_splits)}")


def work_dir(output: OutputConfig, shared: str | None) -> str:
    """The folder of an output's chunk caches: ``<output path>.work``, or a folder of its own in a
    ``processing.work_dir`` that several recipes may share."""
    if shared:
        owner = os.path.abspath(output.path) if output.path else f"hub:{output.hub_repo_id}:{output.hub_split}"
        tag = hashlib.sha256(owner.encode()).hexdigest()[:8]
        return os.path.join(shared, f"{Path(output.path or 'hub').stem}-{tag}")
    if output.path:
        return f"{output.path}.work"
    # Hub only: one folder per repo and split, or recipes run from one folder delete each other's caches
    assert output.hub_repo_id is not None
    return os.path.join(".vllm_generator_work", output.hub_repo_id.replace("/", "--"), output.hub_split)


def hub_path(hub_split: str, split_id: int, num_splits: int) -> str:
    """A split's file in a Hub dataset repo."""
    return f"data/{hub_split}-{split_tag(split_id, num_splits)}.parquet"


def hub_pattern(hub_split: str, num_splits: int | None = None) -> str:
    """The pattern of a Hub split's data files, of any number of splits or of ``num_splits``
    (exact digits: "train" must not take "train-v2-00000-of-00001.parquet")."""
    five = "[0-9]" * 5
    return f"data/{hub_split}-{five}-of-{five if num_splits is None else f'{num_splits:05d}'}.parquet"


# --------------------------------------------------------------------------- one run per split


@contextlib.contextmanager
def hold_lock(folder: str, what: str, wait: bool) -> Iterator[None]:
    """Hold ``folder``'s lock (``.lock``: an flock, released by the kernel if the holder dies, so
    a lock is never stale) while a run writes there; another run refuses at once, naming the
    holder (host, pid, start time), or with ``wait`` waits for it.

    Raises:
        RecipeError: another run holds the lock (and ``wait`` is false).
    """
    path = os.path.join(folder, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another run"
            if not wait:
                raise RecipeError(
                    f"{what} is being written by {holder}: wait for it to finish or stop it (set processing.wait_for_lock: true to wait)"
                ) from None
            logger.info("waiting for %s, which writes %s", holder, what)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:  # a file system without locks (some NFS mounts)
            logger.warning("cannot lock %s (%s): two runs on it at once would both send every row", path, err.strerror or err)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def no_space(err: BaseException) -> OSError | None:
    """The "no space left" (or over quota) error somewhere in ``err``'s chain, if any."""
    current: BaseException | None = err
    for _ in range(10):
        if current is None:
            return None
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        current = current.__cause__ or current.__context__
    return None


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name to write ``path`` under; on success it is synced and renamed into place,
    so readers see the old file or the whole new one, never half. On failure it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_batches(path: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch], metadata: dict[str, Any]) -> None:
    """Stream record batches to a Parquet file atomically, with our metadata in its schema."""
    schema = schema.with_metadata({**(schema.metadata or {}), _META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def write_parquet(ds: Dataset, path: str, metadata: dict[str, Any]) -> None:
    """Write ``ds`` to ``path`` atomically with our metadata (split, rows, settings' hash)."""
    table = ds.data.table
    write_batches(path, table.schema, table.to_batches(max_chunksize=10_000), metadata)


def write_json(path: str, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_output_metadata(path: str) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    if _META_KEY not in meta:
        raise MergeError(f"{path} was not written by vllm-generator (no metadata): rerun its split")
    return dict(json.loads(meta[_META_KEY]))


def without_our_metadata(schema: pa.Schema) -> pa.Schema:
    return schema.remove_metadata().with_metadata({k: v for k, v in (schema.metadata or {}).items() if k != _META_KEY})


# --------------------------------------------------------------------------- the Hub


def push_to_hub(
    local_path: str,
    repo_id: str,
    path_in_repo: str,
    private: bool,
    api: Any = None,
    delete_patterns: list[str] | None = None,
    keep_patterns: list[str] | None = None,
    readme: Callable[[list[str]], str] | None = None,
) -> None:
    """Upload one Parquet file to a Hub dataset repo, creating the repo if needed, in one commit
    that also deletes the files matching ``delete_patterns`` but not ``keep_patterns``.

    Each split uploads its own file name (``hub_path``), so splits pushing to one repo never
    delete each other's files, which ``Dataset.push_to_hub`` would do. The token comes from
    ``HF_TOKEN`` or the saved login (huggingface_hub reads them). ``readme`` gives the dataset
    card (README.md, in the same commit) from the files the repo holds after it.

    Raises:
        HubError: the Hub refused or could not be reached; ``local_path`` is kept.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    # a push comes after hours of generation: a passing 5xx or reset connection is retried
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(_HUB_ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=_HUB_WAIT, max=30),
        retry=tenacity.retry_if_exception(_transient),
        before_sleep=tenacity.before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )
    try:
        retrying(_push_once, api, local_path, repo_id, path_in_repo, private, delete_patterns, keep_patterns, readme)
    except (HfHubHTTPError, OSError, _http_error()) as err:  # refused, or not reached: not a bug
        raise HubError(
            f"pushing {local_path} to the Hub dataset {repo_id} failed ({type(err).__name__}: {err}); the file is "
            "kept: check HF_TOKEN (or `hf auth login`) and the network, then run the same command again to push it",
            repo_id=repo_id,
            local_path=local_path,
        ) from err
    logger.info("pushed %s to https://huggingface.co/datasets/%s (%s)", local_path, repo_id, path_in_repo)


_HUB_ATTEMPTS = 3
_HUB_WAIT = 1.0  # seconds before the second attempt, doubling


def _push_once(
    api: Any,
    local_path: str,
    repo_id: str,
    path_in_repo: str,
    private: bool,
    delete_patterns: list[str] | None,
    keep_patterns: list[str] | None,
    readme: Callable[[list[str]], str] | None,
) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    operations: list[Any] = [CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=local_path)]
    existing = api.list_repo_files(repo_id, repo_type="dataset") if delete_patterns or readme else []
    if delete_patterns:
        operations += [
            CommitOperationDelete(path_in_repo=f)
            for f in existing
            # the whole path must match: Path.match would also take "old/data/train-0.parquet"
            if f != path_in_repo
            and any(fnmatch.fnmatchcase(f, p) for p in delete_patterns)
            and not any(fnmatch.fnmatchcase(f, p) for p in keep_patterns or [])
        ]
    if readme is not None:
        deleted = {op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)}
        after = sorted({f for f in existing if f not in deleted} | {path_in_repo})
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme(after).encode()))
    api.create_commit(repo_id, operations=operations, repo_type="dataset", commit_message=f"vllm-generator: upload {path_in_repo}")


def _transient(err: BaseException) -> bool:
    """A Hub failure worth another try: a 5xx or 429, or a connection that failed; never a 4xx."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(err, (OSError, _http_error()))


def _http_error() -> type[Exception]:
    """The error type of huggingface_hub's HTTP client (httpx2 in huggingface_hub 2.x, httpx before)."""
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            error: type[Exception] = importlib.import_module(name).HTTPError
            return error
    return OSError
