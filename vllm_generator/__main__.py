"""The ``vllm-generator`` command (and ``python -m vllm_generator recipe.yaml``).

    vllm-generator run recipe.yaml [--generation.temperature=0.2] [--split-id 0 --num-splits 4]
    vllm-generator generate -i in.parquet -o out.parquet -m http://localhost:8000 [--temperature 0.7 ...]
    vllm-generator validate recipe.yaml [--check-server]
    vllm-generator list-models -m http://localhost:8000
    vllm-generator merge recipe.yaml | out.parquet [--hub-repo-id org/name]

Errors print one line and exit 1 (``--debug`` shows the traceback); Ctrl-C exits 130 and keeps
every finished chunk, so the same command resumes.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import fire
import yaml

from .errors import RecipeError, ServerUnavailableError, VllmGeneratorError
from .recipe import LoggingConfig, Recipe, load_recipe

if TYPE_CHECKING:  # run imports datasets, which costs ~1 s: only commands that need it load it
    from .run import RunSummary

logger = logging.getLogger("vllm_generator")

_SECTIONS = ("data", "model", "generation", "processing", "retry", "logging")
# short flags that Fire cannot map unambiguously
_SHORT = {"-i": "--input", "-o": "--output", "-m": "--base-url"}


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
        os.makedirs(os.path.dirname(os.path.abspath(cfg.file)), exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(cfg.file, maxBytes=cfg.max_bytes, backupCount=cfg.backup_count)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)


def _print_summary(summary: RunSummary) -> None:
    out = sys.stdout
    rate = f"{summary.rows_per_s:,.0f} rows/s, {summary.tokens_per_s:,.0f} tok/s" if summary.generated_rows else "nothing sent"
    out.write(
        f"done: {summary.rows} rows ({summary.succeeded} ok, {summary.failed} failed) in {summary.wall_time_s:.1f}s, {rate}\n"
        f"  sent {summary.generated_rows} rows ({summary.retries} retries), reused {summary.reused_rows} from earlier runs\n"
        f"  tokens: {summary.prompt_tokens:,} prompt, {summary.completion_tokens:,} completion\n"
    )
    if summary.failed_by_type:
        out.write(f"  failures this run: {json.dumps(summary.failed_by_type)}\n")
    if summary.failed:
        out.write("  rows with an error keep it in the error column; set retry.retry_failed: true and rerun to send them again\n")
    if summary.output_path:
        out.write(f"  output: {summary.output_path}\n")
    if summary.hub_repo_id:
        out.write(f"  hub: https://huggingface.co/datasets/{summary.hub_repo_id}\n")
    out.write(f"  metrics: {summary.metrics_path}\n")


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


def _run(recipe: Recipe, progress: bool) -> None:
    from .run import run_recipe

    configure_logging(recipe.logging)
    _print_summary(run_recipe(recipe, progress=_flag("progress", progress)))


class Commands:
    """Generate text for every row of a dataset with vLLM."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self._overrides = overrides

    def run(self, recipe: str, split_id: int | None = None, num_splits: int | None = None, progress: bool = True) -> None:
        """Run a recipe. Override any key with --section.key=value."""
        overrides = dict(self._overrides)
        if split_id is not None:
            overrides["processing.split_id"] = split_id
        if num_splits is not None:
            overrides["processing.num_splits"] = num_splits
        _run(load_recipe(recipe, overrides), progress)

    def generate(
        self,
        input: str,
        output: str,
        base_url: str | list[str],
        model: str | None = None,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        limit: int | None = None,
        batch_size: int | None = None,
        max_concurrency: int | None = None,
        chunk_size: int | None = None,
        split_id: int | None = None,
        num_splits: int | None = None,
        progress: bool = True,
        **generation: Any,
    ) -> None:
        """Run without a recipe: -i INPUT -o OUTPUT.parquet -m URL, plus generation flags (--temperature 0.7)."""
        data: dict[str, Any] = {"input": {"path": input, "limit": limit}, "output": {"path": output}}
        data |= {k: v for k, v in {"prompt_column": prompt_column, "messages_column": messages_column, "template": template, "system_prompt": system_prompt}.items() if v is not None}
        processing = {k: v for k, v in {"batch_size": batch_size, "max_concurrency": max_concurrency, "chunk_size": chunk_size, "split_id": split_id, "num_splits": num_splits}.items() if v is not None}
        raw = {"data": data, "model": {"base_url": base_url, "model": model}, "generation": generation, "processing": processing}
        from pydantic import ValidationError

        from .recipe import _set_dotted, format_validation_error

        for key, value in self._overrides.items():  # --retry.attempts=1 etc., as with a recipe
            _set_dotted(raw, key, value, "generate")

        try:
            recipe = Recipe.model_validate(raw)
        except ValidationError as err:
            text = format_validation_error(err, "generate")
            for section in ("data.input.", "data.output.", "data.", "model.", "generation.", "processing."):
                text = text.replace(f"generate: {section}", "generate: --")
            raise RecipeError(text) from None
        _run(recipe, progress)

    def validate(self, recipe: str, check_server: bool = False) -> None:
        """Check a recipe and its input (and with --check-server, that its servers serve the model)."""
        from .run import check_input_columns, load_input

        loaded = load_recipe(recipe, self._overrides)
        print(f"ok: {recipe} is a valid recipe")
        num_splits, split_id = loaded.processing.resolved_split()
        ds = load_input(loaded.data.input)
        config = loaded.generate_config()
        check_input_columns(config, ds, loaded.data.input.path or loaded.data.input.hub_id)
        from .transform import VllmGenerate

        bodies = VllmGenerate(config).build_bodies(ds[:1]) if len(ds) else []
        print(f"ok: input has {len(ds)} rows, columns {ds.column_names}; split {split_id} of {num_splits}")
        if bodies:
            print(f"ok: first request: {json.dumps(bodies[0])[:300]}")
        if _flag("check_server", check_server):
            if loaded.model.serve:
                print(f"skip: servers are started by the run (model.serve: {loaded.model.serve.model})")
            for url in loaded.model.base_url:
                models = _list_models(url, config.model.api_key())
                ids = [m["id"] for m in models]
                if loaded.model.model and loaded.model.model not in ids:
                    raise ServerUnavailableError(f"{url} does not serve model {loaded.model.model!r}; it serves: {', '.join(ids)}")
                if not loaded.model.model and len(ids) != 1:
                    raise ServerUnavailableError(f"{url} serves {len(ids)} models ({', '.join(ids)}): set model.model in {recipe}")
                print(f"ok: {url} serves {', '.join(ids)}")

    def list_models(self, base_url: str) -> None:
        """List the models a server serves, with their maximum context length."""
        from .recipe import ModelConfig

        cfg = ModelConfig(base_url=base_url)
        for m in _list_models(cfg.base_url[0], cfg.api_key()):
            print(f"{m['id']}\tmax_model_len={m.get('max_model_len', '?')}")

    def merge(self, target: str, hub_repo_id: str | None = None, hub_split: str | None = None, private: bool | None = None) -> None:
        """Join the split outputs of a recipe (or of an output .parquet path) into one file or Hub split."""
        from .run import merge_outputs

        path = target
        if target.endswith((".yaml", ".yml")):
            loaded = load_recipe(target, self._overrides)
            if not loaded.data.output.path:
                raise RecipeError(f"{target}: data.output.path is not set: merge needs the split files' path")
            path = loaded.data.output.path
            hub_repo_id = hub_repo_id or loaded.data.output.hub_repo_id
            hub_split = hub_split or loaded.data.output.hub_split
            private = loaded.data.output.private if private is None else _flag("private", private)
        summary = merge_outputs(path, hub_repo_id=hub_repo_id, hub_split=hub_split or "train", private=True if private is None else _flag("private", private))
        print(f"merged {summary['splits']} splits: {summary['rows']} rows ({summary['rows_with_error']} with an error) -> {path}")


def _list_models(url: str, api_key: str | None) -> list[dict[str, Any]]:
    from .client import Client, run_on_loop

    client = Client([url], api_key=api_key, timeout=30)
    try:
        return run_on_loop(client.list_models()).result()
    finally:
        client.close()


def _parse_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, Any], bool]:
    """Split ``--section.key=value`` overrides and ``--debug`` from Fire's arguments."""
    args: list[str] = []
    overrides: dict[str, Any] = {}
    debug = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if arg == "--debug":
            debug = True
        elif "." in name and name.split(".", 1)[0] in _SECTIONS:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise RecipeError(f"{arg} needs a value, e.g. {arg}=0.2")
            overrides[name] = yaml.safe_load(value) if value != "" else ""
        else:
            args.append(_SHORT.get(arg, arg))
        i += 1
    # python -m vllm_generator recipe.yaml: a bare recipe path means "run"
    if args and args[0].endswith((".yaml", ".yml")):
        args.insert(0, "run")
    return args, overrides, debug


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    # scancel and `kill` send SIGTERM: unwind exactly like Ctrl-C so managed servers are stopped
    signal.raise_signal(signal.SIGINT)


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
        sys.stderr.write("interrupted: finished chunks are saved; run the same command again to resume\n")
        return 130
    except fire.core.FireExit as err:  # usage errors, --help
        return int(err.code or 0)
    except Exception as err:  # the one place that turns any failure into one line
        if debug:
            raise
        kind = "error" if isinstance(err, VllmGeneratorError) else f"error ({type(err).__name__})"
        sys.stderr.write(f"{kind}: {err}\n")
        if not isinstance(err, VllmGeneratorError):
            sys.stderr.write("  this looks like a bug or an unexpected environment problem: rerun with --debug for the traceback\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
