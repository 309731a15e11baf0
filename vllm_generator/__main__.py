"""The ``vllm-generator`` command (and ``python -m vllm_generator recipe.yaml``).

    vllm-generator run recipe.yaml [--generation.temperature=0.2] [--split-id 0 --num-splits 4]
    vllm-generator generate -i in.parquet -o out.parquet -m http://localhost:8000 [--temperature 0.7 ...]
    vllm-generator generate --config recipe.yaml [-i/-o/-m/--temperature ... override it]
    vllm-generator validate recipe.yaml [--check-server]
    vllm-generator list-models -m http://localhost:8000 [-m http://host2:8000]
    vllm-generator merge recipe.yaml | out.parquet [--hub-repo-id org/name]

Every command that takes a recipe also takes it as ``-c/--config RECIPE``; ``--model-url`` is
``-m/--base-url``.

Errors print one line and exit 1 (``--debug`` shows the traceback); Ctrl-C exits 130 and keeps
every finished chunk, so the same command resumes.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import json
import logging
import logging.handlers
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import fire
import yaml

from .errors import RecipeError, SlurmError, VllmGeneratorError
from .recipe import LoggingConfig, Recipe, load_recipe

if TYPE_CHECKING:  # run imports datasets, which takes a second: only commands that need it load it
    from .run import RunSummary

logger = logging.getLogger("vllm_generator")

_SECTIONS = ("data", "model", "generation", "processing", "retry", "logging")
# short flags that Fire cannot map unambiguously (-t it can, but then it would parse the template)
_SHORT = {"-i": "--input", "-o": "--output", "-m": "--base-url", "-t": "--template", "-c": "--config"}
# the founding document's name for -m/--base-url
_BASE_URL_FLAGS = ("base_url", "model_url")
# Flags whose value is text as typed: Fire would turn '{prompt}' into a set, '123' into an int.
_TEXT_FLAGS = {
    "config", "input", "output", "model", "prompt_column", "messages_column", "template", "system_prompt", "hub_repo_id",
    "hub_split", "output_schema", "image_column", "splits", "partition", "time", "mem", "sbatch_args", "setup",
}  # fmt: skip
# generate's errors name these flags, not the recipe fields they fill
_GENERATE_FLAGS = {
    "data.input.path": "-i/--input",
    "data.input": "-i/--input",
    "data.output.path": "-o/--output",
    "data.output": "-o/--output",
    "model.base_url": "-m/--base-url",
}
_USAGE = {
    "run": "vllm-generator run RECIPE [--split-id I] [--num-splits N] [--progress=false] [--section.key=value ...]",
    "validate": "vllm-generator validate RECIPE [--check-server] [--section.key=value ...]",
    "merge": "vllm-generator merge RECIPE|OUTPUT.parquet [--hub-repo-id ORG/NAME] [--hub-split SPLIT] [--private=false]",
    "list-models": "vllm-generator list-models -m URL [-m URL ...]",
    "generate": "vllm-generator generate -i INPUT -o OUTPUT.parquet -m URL [--model NAME] [--prompt-column C] [--temperature 0.7 ...]",
    "submit": "vllm-generator submit RECIPE --num-splits N [--splits 1,3] [--partition P] [--time 04:00:00] [--gpus-per-task G] "
    "[--cpus-per-task C] [--mem 64G] [--sbatch-args '--account=A ...'] [--setup 'source venv/bin/activate'] [--dry-run] "
    "[--section.key=value ...]",
    "status": "vllm-generator status RECIPE [--num-splits N] [--section.key=value ...]",
}
_SUBMIT_OPTIONS = [
    "config",
    "num_splits",
    "splits",
    "partition",
    "time",
    "gpus_per_task",
    "cpus_per_task",
    "mem",
    "sbatch_args",
    "setup",
    "dry_run",
]
_LISTED_LOGS = 10  # submit lists each split's log up to this many splits, else their pattern
# flags of generate that fill a recipe field (the others are generation settings)
_GENERATE_FIELDS = {
    "input": "data.input.path",
    "limit": "data.input.limit",
    "output": "data.output.path",
    "base_url": "model.base_url",
    "model": "model.model",
    "system_prompt": "data.system_prompt",
    "image_column": "data.image_column",
    "batch_size": "processing.batch_size",
    "max_concurrency": "processing.max_concurrency",
    "chunk_size": "processing.chunk_size",
    "split_id": "processing.split_id",
    "num_splits": "processing.num_splits",
}
_PROMPT_SOURCES = ("prompt_column", "messages_column", "template")


def configure_logging(cfg: LoggingConfig) -> None:
    """Log to stderr, and to a rotating file when the recipe names one."""
    root = logging.getLogger("vllm_generator")
    root.handlers.clear()
    root.setLevel(cfg.level)
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if cfg.file:
        from .storage import make_parent

        make_parent(cfg.file, "logging.file")
        try:
            handler = logging.handlers.RotatingFileHandler(cfg.file, maxBytes=cfg.max_bytes, backupCount=cfg.backup_count)
        except OSError as err:
            raise RecipeError(f"logging.file: cannot write {cfg.file} ({err.strerror or err})") from err
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)


def _log_to_file(level: int, text: str) -> None:
    """Put in the recipe's log file what the terminal already got (the console handler would show it twice)."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, text, (), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _print_summary(summary: RunSummary) -> None:
    rate = f"{summary.rows_per_s:,.0f} rows/s, {summary.tokens_per_s:,.0f} tok/s" if summary.generated_rows else "nothing sent"
    lines = [
        f"done: {summary.rows} rows ({summary.succeeded} ok, {summary.failed} failed) in {summary.wall_time_s:.1f}s, {rate}",
        f"  sent {summary.generated_rows} rows ({summary.retries} retries), reused {summary.reused_rows} from earlier runs",
        f"  tokens: {summary.prompt_tokens:,} prompt, {summary.completion_tokens:,} completion",
    ]
    if summary.failed_by_type:
        lines.append(f"  failures this run: {json.dumps(summary.failed_by_type)}")
    if summary.failed:
        lines.append("  rows with an error keep it in the error column; set retry.retry_failed: true and rerun to send them again")
    if summary.output_path:
        lines.append(f"  output: {summary.output_path}")
    if summary.hub_repo_id:
        lines.append(f"  hub: https://huggingface.co/datasets/{summary.hub_repo_id}")
    lines.append(f"  metrics: {summary.metrics_path}")
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    _log_to_file(logging.INFO, "; ".join(line.strip() for line in lines))


def _refuse_extras(command: str, rest: tuple[Any, ...], unknown: dict[str, Any], options: Sequence[str]) -> None:
    """Refuse what Fire collected in ``*rest``/``**unknown``, before the command does any work.

    Fire itself complains about unused arguments only once the method has returned: after the run.
    """
    if rest:
        raise RecipeError(f"unexpected argument {rest[0]!r} for {command} (usage: {_USAGE[command]})")
    for name, value in unknown.items():
        flag = "--" + name.replace("_", "-")
        section = next((s for s, f in Recipe.model_fields.items() if name in getattr(f.annotation, "model_fields", {})), None)
        close = difflib.get_close_matches(name, options, n=1)
        if close:
            hint = f": did you mean --{close[0].replace('_', '-')}?"
        elif section and command != "list-models":
            shown = shlex.quote(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "VALUE"
            hint = f": {section} settings go as --{section}.{name}={shown}"
        else:
            hint = ""
        raise RecipeError(f"unknown option {flag} for {command}{hint} (usage: {_USAGE[command]})")


def _number(name: str, value: Any) -> Any:
    """An integer flag: Fire passes a flag given without its value as True, which pydantic would take as 1."""
    if isinstance(value, bool):
        raise RecipeError(f"--{name.replace('_', '-')} needs a number, e.g. --{name.replace('_', '-')} 2")
    return value


def _flag_names(text: str) -> str:
    """Name in generate's errors the flags the user typed (-i/--input, --max-tokens), not the recipe fields they fill."""
    lines = []
    for line in text.splitlines():
        prefix = "generate: " if line.startswith("generate: ") else ""
        loc, sep, msg = line.removeprefix(prefix).partition(": ")
        if loc in _GENERATE_FLAGS:
            line = f"{prefix}{_GENERATE_FLAGS[loc]}{sep}{msg}"
        elif sep and " " not in loc and "." in loc and loc.split(".")[0] in _SECTIONS:
            section = next(
                (s for s in ("data.input.", "data.output.", "data.", "model.", "generation.", "processing.") if loc.startswith(s)), ""
            )
            name, dot, key = loc.removeprefix(section).partition(".")
            line = f"{prefix}--{name.replace('_', '-')}{dot}{key}{sep}{msg}"
        lines.append(line)
    return "\n".join(lines)


def _count(name: str, value: Any) -> int:
    """A flag that is a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"--{name.replace('_', '-')} takes a whole number of at least 1, not {value!r}")
    return value


def _split_ids(value: Any) -> list[int] | None:
    """``--splits``: "1", "0,3" or "2-5"."""
    if value is None:
        return None
    ids: list[int] = []
    for item in str(value).split(","):
        first, dash, last = item.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise RecipeError(f"--splits takes split ids such as 1, 0,3 or 2-5, not {value!r}")
        ids += range(int(first), int(last) + 1) if dash else [int(first)]
    return ids


def _flag(name: str, value: Any) -> bool:
    """A boolean flag: Fire passes ``--progress=false`` as the (true) string "false"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise RecipeError(f"--{name.replace('_', '-')} takes true or false, not {value!r}")


@contextlib.contextmanager
def _tune_gc() -> Iterator[None]:
    """The command owns its process: spare the HTTP loop the garbage collector's pauses, which
    hold the GIL while they walk every object the imports made (README, design notes).

    Freeze what the imports made and collect gen 0 every 10,000 allocations (not rarer: cyclic
    garbage would wait for ever rarer full collections). Library use (``ds.map(vllm_generate(...))``
    in a notebook) leaves the user's process alone; the settings are put back when the run ends.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    if threshold[0]:  # 0: the user turned collection off
        gc.set_threshold(max(threshold[0], 10_000), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _run(recipe: Recipe, progress: bool) -> None:
    from .run import run_recipe

    configure_logging(recipe.logging)
    with _tune_gc():
        summary = run_recipe(recipe, progress=_flag("progress", progress))
    _print_summary(summary)


def _recipe_path(command: str, recipe: Any, config: Any) -> str:
    """The recipe a command was given, as ``RECIPE`` or ``-c/--config RECIPE``."""
    if recipe is not None and config is not None:
        raise RecipeError(f"{command}: give the recipe once, as RECIPE or as --config RECIPE (usage: {_USAGE[command]})")
    if recipe is None and config is None:
        raise RecipeError(f"{command} needs a recipe (usage: {_USAGE[command]}; or --config RECIPE)")
    return str(recipe if recipe is not None else config)


def _generate_overrides(fields: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """generate's flags as ``section.key`` overrides (given flags only)."""
    overrides: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name in _PROMPT_SOURCES:  # one prompt source replaces the recipe's
            overrides |= {f"data.{other}": None for other in _PROMPT_SOURCES} | {f"data.{name}": value}
        elif name in ("limit", "batch_size", "max_concurrency", "chunk_size", "split_id", "num_splits"):
            overrides[_GENERATE_FIELDS[name]] = _number(name, value)
        else:
            overrides[_GENERATE_FIELDS[name]] = value
    if "model.base_url" in overrides:
        overrides["model.serve"] = None  # -m names running servers: the recipe's managed ones are not started
    return overrides | {f"generation.{k}": v for k, v in generation.items()}


class Commands:
    """Generate text for every row of a dataset with vLLM."""

    # Options are keyword-only and every method takes *rest and **unknown: Fire would otherwise bind
    # a stray word to an option (`run r.yaml extra` as split_id) and refuse unknown flags only after
    # the method has run. _refuse_extras refuses both before any work.

    def __init__(self, overrides: dict[str, Any]) -> None:
        self._overrides = overrides

    def run(
        self,
        recipe: str | None = None,
        *rest: Any,
        config: str | None = None,
        split_id: int | None = None,
        num_splits: int | None = None,
        progress: bool = True,
        **unknown: Any,
    ) -> None:
        """Run a recipe. Override any key with --section.key=value."""
        _refuse_extras("run", rest, unknown, ["config", "split_id", "num_splits", "progress"])
        path = _recipe_path("run", recipe, config)
        overrides = dict(self._overrides)
        if split_id is not None:
            overrides["processing.split_id"] = _number("split_id", split_id)
        if num_splits is not None:
            overrides["processing.num_splits"] = _number("num_splits", num_splits)
        _run(load_recipe(path, overrides), progress)

    def generate(
        self,
        *rest: Any,
        config: str | None = None,
        input: str | None = None,
        output: str | None = None,
        base_url: str | list[str] | None = None,
        model: str | None = None,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        image_column: str | None = None,
        limit: int | None = None,
        batch_size: int | None = None,
        max_concurrency: int | str | None = None,
        chunk_size: int | None = None,
        split_id: int | None = None,
        num_splits: int | None = None,
        progress: bool = True,
        **generation: Any,
    ) -> None:
        """Run without a recipe: -i INPUT -o OUTPUT.parquet -m URL, plus generation flags (--temperature 0.7);
        or run a recipe given as -c/--config RECIPE, which these flags then override."""
        _refuse_extras("generate", rest, {}, [])  # unknown flags are generation settings, which the Recipe checks
        fields = {
            "input": input,
            "limit": limit,
            "output": output,
            "base_url": base_url,
            "model": model,
            "prompt_column": prompt_column,
            "messages_column": messages_column,
            "template": template,
            "system_prompt": system_prompt,
            "image_column": image_column,
            "batch_size": batch_size,
            "max_concurrency": max_concurrency,
            "chunk_size": chunk_size,
            "split_id": split_id,
            "num_splits": num_splits,
        }
        overrides = _generate_overrides(fields, generation) | self._overrides  # --retry.attempts=1 etc., as with a recipe
        if config is not None:  # errors then name the recipe's fields, as for run
            _run(load_recipe(str(config), overrides), progress)
            return
        missing = [flag for flag, value in (("-i INPUT", input), ("-o OUTPUT.parquet", output), ("-m URL", base_url)) if value is None]
        if missing:
            raise RecipeError(f"generate needs {', '.join(missing)}, or a recipe as --config RECIPE (usage: {_USAGE['generate']})")
        from pydantic import ValidationError

        from .recipe import _set_dotted, format_validation_error

        raw: dict[str, Any] = {}
        for key, value in overrides.items():
            _set_dotted(raw, key, value, "generate")
        try:
            loaded = Recipe.model_validate(raw)
        except ValidationError as err:
            raise RecipeError(_flag_names(format_validation_error(err, "generate"))) from None
        try:
            _run(loaded, progress)
        except RecipeError as err:  # the input checks name data.input.path, which is -i here
            raise RecipeError(_flag_names(str(err))) from err

    def validate(
        self, recipe: str | None = None, *rest: Any, config: str | None = None, check_server: bool = False, **unknown: Any
    ) -> None:
        """Check a recipe and its input (and with --check-server, that its servers serve the model)."""
        _refuse_extras("validate", rest, unknown, ["config", "check_server"])
        path = _recipe_path("validate", recipe, config)
        from .client import choose_model
        from .run import check_recipe
        from .slurm import resolve_split
        from .wire import WireFormat, redact_url

        loaded = load_recipe(path, self._overrides)
        print(f"ok: {path} is a valid recipe")
        num_splits, split_id = resolve_split(loaded.processing)
        checked = check_recipe(loaded, split_id, num_splits)  # what run checks before it starts servers or sends anything
        ds, transform = checked.ds, checked.config
        print(f"ok: input has {len(ds)} rows, columns {ds.column_names}; split {checked.split_id} of {checked.num_splits}")
        if checked.nulls:
            print(f"warning: {checked.nulls_text()}: they will get an error and not be sent")
        bodies = [b for b in WireFormat.from_config(transform).bodies(ds[:100]) if b is not None]
        if bodies:
            print(f"ok: first request: {json.dumps(bodies[0])[:300]}")
        if _flag("check_server", check_server):
            if loaded.model.serve:
                print(f"skip: servers are started by the run (model.serve: {loaded.model.serve.model})")
            for url in loaded.model.base_url:
                ids = [m["id"] for m in _list_models(url, transform.model.api_key())]
                choose_model(redact_url(url), ids, loaded.model.model, hint=f"set model.model in {path}")
                print(f"ok: {redact_url(url)} serves {', '.join(ids)}")

    def list_models(self, base_url: str | list[str] | None = None, *rest: Any, **unknown: Any) -> None:
        """List the models a server serves, with their maximum context length (-m URL, or --model-url URL)."""
        _refuse_extras("list-models", rest, unknown, ["base_url"])
        if base_url is None:
            raise RecipeError(f"list-models needs a server (usage: {_USAGE['list-models']})")
        if self._overrides:
            raise RecipeError(
                f"list-models takes no recipe overrides such as --{next(iter(self._overrides))} (usage: {_USAGE['list-models']})"
            )
        from pydantic import ValidationError

        from .recipe import ModelConfig, format_validation_error

        try:
            cfg = ModelConfig(base_url=base_url)
        except ValidationError as err:
            raise RecipeError(
                format_validation_error(err, "list-models").replace("list-models: base_url", "list-models: -m/--base-url")
            ) from None
        from .wire import redact_url

        for url in cfg.base_url:
            if len(cfg.base_url) > 1:
                print(f"{redact_url(url)}:")
            for m in _list_models(url, cfg.api_key()):
                print(f"{m['id']}\tmax_model_len={m.get('max_model_len', '?')}")

    def merge(
        self,
        target: str | None = None,
        *rest: Any,
        config: str | None = None,
        hub_repo_id: str | None = None,
        hub_split: str | None = None,
        private: bool | None = None,
        **unknown: Any,
    ) -> None:
        """Join the split outputs of a recipe (or of an output .parquet path) into one file or Hub split."""
        _refuse_extras("merge", rest, unknown, ["config", "hub_repo_id", "hub_split", "private"])
        target = _recipe_path("merge", target, config)
        from .merge import merge_outputs

        path = target
        if target.endswith((".yaml", ".yml")):
            loaded = load_recipe(target, self._overrides)
            if not loaded.data.output.path:
                raise RecipeError(f"{target}: data.output.path is not set: merge needs the split files' path")
            path = loaded.data.output.path
            hub_repo_id = hub_repo_id or loaded.data.output.hub_repo_id
            hub_split = hub_split or loaded.data.output.hub_split
            private = loaded.data.output.private if private is None else _flag("private", private)
        elif self._overrides:
            raise RecipeError(
                f"merge {target}: --{next(iter(self._overrides))} overrides a recipe key, but {target} is not a recipe; pass the recipe instead"
            )
        summary = merge_outputs(
            path, hub_repo_id=hub_repo_id, hub_split=hub_split or "train", private=True if private is None else _flag("private", private)
        )
        print(f"merged {summary['splits']} splits: {summary['rows']} rows ({summary['rows_with_error']} with an error) -> {path}")

    def submit(
        self,
        recipe: str | None = None,
        *rest: Any,
        config: str | None = None,
        num_splits: int | None = None,
        splits: str | None = None,
        partition: str | None = None,
        time: str | None = None,
        gpus_per_task: int | None = None,
        cpus_per_task: int | None = None,
        mem: str | None = None,
        sbatch_args: str | None = None,
        setup: str | None = None,
        dry_run: bool = False,
        **unknown: Any,
    ) -> None:
        """Submit a recipe's splits to SLURM, one per task of a job array, and a job that merges them once all succeeded."""
        _refuse_extras("submit", rest, unknown, _SUBMIT_OPTIONS)
        from .run import check_recipe
        from .slurm import SbatchOptions, array_spec, merge_command, submit

        path = _recipe_path("submit", recipe, config)
        loaded = load_recipe(path, self._overrides)
        count = _count("num_splits", num_splits) if num_splits is not None else loaded.processing.num_splits
        if count is None:
            raise RecipeError(f"submit needs --num-splits N, or processing.num_splits in {path} (usage: {_USAGE['submit']})")
        check_recipe(loaded, 0, count)  # the input, its columns, the output path: refused here, not in every task
        options = SbatchOptions(
            partition=partition,
            time=time,
            gpus_per_task=None if gpus_per_task is None else _count("gpus_per_task", gpus_per_task),
            cpus_per_task=None if cpus_per_task is None else _count("cpus_per_task", cpus_per_task),
            mem=mem,
            sbatch_args=shlex.split(sbatch_args) if sbatch_args else [],
            setup=setup,
        )
        done = submit(path, loaded, self._overrides, count, _split_ids(splits), options, dry_run=_flag("dry_run", dry_run))
        if done.split_job is None:
            for script, command in (
                (done.split_script, ["sbatch", done.split_script]),
                (done.merge_script, merge_command("<split job>", done.merge_script)),
            ):
                print(f"# {script} (submit: {shlex.join(command)})")
                sys.stdout.write(Path(script).read_text())
            print("dry run: nothing submitted")
            return
        print(f"submitted job {done.split_job}: splits {array_spec(done.splits)} of {count}, one per array task")
        print(f"submitted job {done.merge_job}: the merge, once every split succeeded (SLURM cancels it if one fails)")
        if len(done.splits) <= _LISTED_LOGS:
            for i in done.splits:
                print(f"  split {i} log: {done.split_log(i)}")
        else:
            print(f"  split logs: {done.split_log(0).replace('_0.log', '_<split>.log')}")
        print(f"  merge log: {done.merge_log}")
        print(f"  follow with: vllm-generator status {path}")

    def status(
        self, recipe: str | None = None, *rest: Any, config: str | None = None, num_splits: int | None = None, **unknown: Any
    ) -> None:
        """Each split's state (done, running with rows/s and ETA, not started, failed with its error), and SLURM's view."""
        _refuse_extras("status", rest, unknown, ["config", "num_splits"])
        from .slurm import queue_states, submissions
        from .status import num_splits_on_disk, read_split_states

        path = _recipe_path("status", recipe, config)
        loaded = load_recipe(path, self._overrides)
        count = _count("num_splits", num_splits) if num_splits is not None else loaded.processing.num_splits
        if count is None:
            jobs, on_disk = submissions(loaded), num_splits_on_disk(loaded)
            if len(on_disk) > 1 and not jobs:
                raise RecipeError(f"status: runs of {path} used {', '.join(map(str, on_disk))} splits: give --num-splits N")
            count = int(jobs[-1]["num_splits"]) if jobs else on_disk[0] if on_disk else 1
        states = read_split_states(loaded, count)
        try:
            queue = queue_states(loaded, count)
        except SlurmError as err:  # the work folder still says what each split did
            print(f"slurm: {err}")
            queue = None
        tasks, merge = queue if queue is not None else ({}, None)
        for state in states:
            seen = f" [{tasks[state.split_id].describe()}]" if state.split_id in tasks else ""
            print(f"split {state.split_id}: {state.describe()}{seen}")
        output = loaded.data.output.path
        if count > 1 and output:
            merged = "done" if os.path.exists(output) and _merged(output) else "not yet"
            print(f"merge: {merged}" + (f" -> {output}" if merged == "done" else "") + (f" [{merge.describe()}]" if merge else ""))
        tally: dict[str, int] = {}
        for state in states:
            tally[state.state] = tally.get(state.state, 0) + 1
        print(f"{count} splits: " + ", ".join(f"{n} {name}" for name, n in tally.items()))


def _merged(path: str) -> bool:
    """Whether ``path`` is a merge's output (not a single split's)."""
    from .errors import MergeError
    from .storage import read_output_metadata

    try:
        return "merged_from" in read_output_metadata(path)
    except (MergeError, OSError, ValueError):  # not a Parquet file of ours
        return False


def _list_models(url: str, api_key: str | None) -> list[dict[str, Any]]:
    from .client import Client, run_on_loop

    client = Client([url], api_key=api_key, timeout=30)
    try:
        return run_on_loop(client.list_models()).result()
    finally:
        client.close()


def _parse_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, Any], bool]:
    """Split ``--section.key=value`` overrides and ``--debug`` from Fire's arguments.

    Text flags reach Fire as ``--name='value'`` so that its literal parsing gives back the exact
    text, and repeated ``-m``/``--base-url`` become one list.
    """
    args: list[str] = []
    overrides: dict[str, Any] = {}
    base_urls: list[str] = []
    debug = False
    i = 0
    while i < len(argv):
        arg = _SHORT.get(argv[i], argv[i])
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        key = name.replace("-", "_")
        if arg == "--debug":
            debug = True
        elif "." in name and name.split(".", 1)[0] in _SECTIONS:
            value, i = _value(argv, i, f"e.g. {argv[i]}=0.2")
            try:
                overrides[name] = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError as err:
                problem = getattr(err, "problem", None) or "not valid YAML"
                raise RecipeError(
                    f"--{name}: cannot parse {value!r} ({problem}): values parse as YAML; quote it to pass text, e.g. --{name}=\"'{value}'\""
                ) from err
        elif key in _BASE_URL_FLAGS:
            value, i = _value(argv, i, "e.g. -m http://localhost:8000")
            base_urls.append(value)
        elif key in _TEXT_FLAGS:
            value, i = _value(argv, i, f"e.g. {argv[i]} TEXT")
            args.append(f"--{key}={value!r}")
        else:
            args.append(arg)
        i += 1
    if base_urls:
        args.append(f"--base_url={(base_urls[0] if len(base_urls) == 1 else base_urls)!r}")
    # python -m vllm_generator recipe.yaml: a bare recipe path means "run"
    if args and args[0].endswith((".yaml", ".yml")):
        args.insert(0, "run")
    if "--help" in args or "-h" in args:  # Fire shows help only for `COMMAND -- --help`; methods taking **unknown would get help=True
        args = [*args[:1], "--", "--help"] if args[0] not in ("--help", "-h", "--") else ["--", "--help"]
    return args, overrides, debug


def _value(argv: Sequence[str], i: int, example: str) -> tuple[str, int]:
    """The value of the option at ``argv[i]``, as ``--name=value`` or ``--name value``, and the index of its last word."""
    if argv[i].startswith("--") and "=" in argv[i]:
        return argv[i].split("=", 1)[1], i
    if i + 1 < len(argv):
        return argv[i + 1], i + 1
    raise RecipeError(f"{argv[i]} needs a value, {example}")


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # scancel and `kill` send SIGTERM: unwind exactly like Ctrl-C, so managed servers are stopped,
    # through the current Ctrl-C handler (the run's also sets a flag that datasets cannot swallow).
    # Not raise_signal(SIGINT): a job started with `cmd &` from a script ignores SIGINT.
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    debug = "--debug" in argv
    try:
        args, overrides, debug = _parse_argv(argv)
        fire.Fire(Commands(overrides), command=args, name="vllm-generator")
        return 0
    except KeyboardInterrupt:
        message = "interrupted: finished chunks are saved; run the same command again to resume"
        sys.stderr.write(message + "\n")
        _log_to_file(logging.WARNING, message)
        return 130
    except fire.core.FireExit as err:  # usage errors, --help
        return int(err.code or 0)
    except Exception as err:  # the one place that turns any failure into one line
        if debug:
            raise
        kind = "error" if isinstance(err, VllmGeneratorError) else f"error ({type(err).__name__})"
        sys.stderr.write(f"{kind}: {err}\n")
        _log_to_file(logging.ERROR, f"{kind}: {err}")
        if not isinstance(err, VllmGeneratorError):
            sys.stderr.write("  this looks like a bug or an unexpected environment problem: rerun with --debug for the traceback\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
