"""SLURM: the job array that runs a recipe's splits, and what a task's environment says.

submit          writes ``split.sbatch`` (a job array, one split per task) and ``merge.sbatch`` (run
                once every task succeeded: ``--dependency=afterok``) into ``<work dir>/slurm/``,
                submits them and records the job ids in ``jobs.json`` there
queue_states    squeue's view of the submitted jobs, for ``vllm-generator status``
resolve_split   the split of an array task (``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``)
allocated_gpus  ``model.serve.gpus`` mapped onto the GPUs SLURM gave the job

The split runner (``run.run_split``) knows nothing of SLURM; another engine can run the same
splits. A task stops cleanly when SLURM warns it of the end of its time (``--signal=B:USR1@...``,
also sent on preemption where the cluster sends the user's signal): the run keeps its finished
chunks, and the script requeues the task, which resumes from them. Scripts never hold a secret:
the tasks get the submitter's environment (sbatch's default ``--export=ALL``), API keys included.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import RecipeError, SlurmError
from .recipe import ProcessingConfig, Recipe, ServeConfig
from .storage import atomic_path, work_dir, write_json

__all__ = [
    "SbatchOptions",
    "Submission",
    "submit",
    "merge_command",
    "array_spec",
    "submissions",
    "queue_states",
    "resolve_split",
    "allocated_gpus",
    "with_allocated_gpus",
]

WARN_BEFORE_S = 120  # the task's warning before its time limit: time to stop the run and its servers
_COMMAND_TIMEOUT_S = 60  # sbatch and squeue answer in well under a second on a healthy controller
# user:password@ in a URL: it would be written into a script that others can read
_URL_CREDENTIALS = re.compile(r"://[^/\s@]+@")


@dataclass(frozen=True)
class SbatchOptions:
    """What a cluster needs in the scripts; None leaves the cluster's default."""

    partition: str | None = None
    time: str | None = None  # the time limit of each task, in sbatch's format: "04:00:00", "1-00:00:00", "90"
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # "64G"
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH lines (both jobs); later lines win
    setup: str | None = None  # a shell line run first: "module load cuda; source ~/venv/bin/activate"


@dataclass
class Submission:
    """What ``submit`` wrote and, unless a dry run, submitted."""

    split_script: str
    merge_script: str
    splits: list[int]
    num_splits: int
    split_job: str | None = None  # the array's job id
    merge_job: str | None = None

    def split_log(self, split_id: int) -> str:
        return os.path.join(os.path.dirname(self.split_script), f"split-{self.split_job}_{split_id}.log")

    @property
    def merge_log(self) -> str:
        return os.path.join(os.path.dirname(self.merge_script), f"merge-{self.merge_job}.log")


# --------------------------------------------------------------------------- submitting


def submit(
    recipe_path: str,
    recipe: Recipe,
    overrides: Mapping[str, Any],
    num_splits: int,
    splits: Sequence[int] | None,
    options: SbatchOptions,
    *,
    dry_run: bool = False,
) -> Submission:
    """Write the array and merge scripts for ``splits`` (default: all) of ``num_splits`` and, unless
    ``dry_run``, submit them: the merge job waits for every task to succeed.

    ``overrides`` are the ``section.key`` overrides the recipe was loaded with; the tasks load it
    the same way.

    Raises:
        RecipeError: no output path, a split out of range, too few GPUs, credentials in an override.
        SlurmError: sbatch is missing or refused a script (``err.submitted`` names what got in).
    """
    if not recipe.data.output.path:
        raise RecipeError(f"{recipe_path}: data.output.path is not set: submit needs it for the split files that the merge job joins")
    chosen = sorted(set(splits)) if splits is not None else list(range(num_splits))
    if not chosen or not 0 <= chosen[0] <= chosen[-1] < num_splits:
        raise RecipeError(
            f"--splits {','.join(map(str, chosen))} is out of range for --num-splits {num_splits} (use 0 to {num_splits - 1})"
        )
    options = _with_serve_gpus(recipe, options)
    _refuse_credentials(overrides, options)
    folder = os.path.join(os.path.abspath(work_dir(recipe.data.output, recipe.processing.work_dir)), "slurm")
    submission = Submission(os.path.join(folder, "split.sbatch"), os.path.join(folder, "merge.sbatch"), chosen, num_splits)
    recipe_file = os.path.abspath(recipe_path)
    name = f"vllm-generator-{Path(recipe.data.output.path).stem}"
    _write(submission.split_script, split_script(recipe_file, recipe, overrides, num_splits, chosen, options, folder, name))
    _write(submission.merge_script, merge_script(recipe_file, overrides, options, folder, name))
    if dry_run:
        return submission
    submission.split_job = _sbatch(["sbatch", submission.split_script])
    try:
        submission.merge_job = _sbatch(merge_command(submission.split_job, submission.merge_script))
    except SlurmError as err:
        raise SlurmError(
            f"{err} (the split jobs {submission.split_job} are submitted: once they are done, run `vllm-generator merge {recipe_path}`)",
            command=err.command, returncode=err.returncode, stderr=err.stderr, submitted=(submission.split_job,),
        ) from err  # fmt: skip
    finally:
        _record(folder, submission, name)  # status follows the tasks even if the merge was refused
    return submission


def merge_command(split_job: str, merge_script: str) -> list[str]:
    """The sbatch command of the merge job: after every task succeeded; cancelled (not left
    pending forever) when one fails, so that a resubmission of the failed splits brings its own."""
    return ["sbatch", f"--dependency=afterok:{split_job}", "--kill-on-invalid-dep=yes", merge_script]


def split_script(
    recipe_file: str,
    recipe: Recipe,
    overrides: Mapping[str, Any],
    num_splits: int,
    splits: Sequence[int],
    options: SbatchOptions,
    folder: str,
    name: str,
) -> str:
    """The job array's script: task ``i`` runs split ``i`` of ``num_splits``."""
    task_overrides = dict(overrides)
    if recipe.model.serve is not None:
        # tasks that share a node must not share ports
        task_overrides["model.serve.port"] = 0
    run = [sys.executable, "-m", "vllm_generator", "run", recipe_file, "--num-splits", str(num_splits), "--progress=false"]
    command = f'{shlex.join(run)} --split-id "$SLURM_ARRAY_TASK_ID"{_override_flags(task_overrides)}'
    directives = [
        f"--job-name={name}",
        f"--array={array_spec(splits)}",
        f"--output={os.path.join(folder, 'split-%A_%a.log')}",
        "--open-mode=append",  # a requeued task adds to its log
        f"--chdir={os.getcwd()}",
        "--ntasks=1",
        "--requeue",
        f"--signal=B:USR1@{WARN_BEFORE_S}",
        *_resources(options, gpus=True),
    ]
    return f"""#!/bin/bash
# Written by `vllm-generator submit`: task i of this array runs split i of {num_splits} of
# {recipe_file}, resuming from the split's finished chunks.
{_directives(directives)}
{_setup(options)}
# SLURM sends USR1 to this script {WARN_BEFORE_S} s before the time limit (and on preemption where the
# cluster sends the user's signal): stop the run, which keeps its finished chunks, then requeue the
# task, which resumes from them. scancel sends TERM to every process: let the run finish stopping.
requeue() {{
  echo "vllm-generator: SLURM warned this task of its end: stopping the run, then requeueing the task" >&2
  kill -TERM "$run" 2>/dev/null
  wait "$run"
  scontrol requeue "$SLURM_JOB_ID" || exit 1
  exit 0
}}
stop() {{
  wait "$run"
  exit 143
}}
{command} &
run=$!
trap requeue USR1
trap stop TERM
wait "$run"
"""


def merge_script(recipe_file: str, overrides: Mapping[str, Any], options: SbatchOptions, folder: str, name: str) -> str:
    """The merge job's script (its dependency is given on sbatch's command line: ``merge_command``)."""
    merge = shlex.join([sys.executable, "-m", "vllm_generator", "merge", recipe_file])
    directives = [
        f"--job-name={name}-merge",
        f"--output={os.path.join(folder, 'merge-%j.log')}",
        f"--chdir={os.getcwd()}",
        "--ntasks=1",
        *_resources(options, gpus=False),
    ]
    return f"""#!/bin/bash
# Written by `vllm-generator submit`: joins the splits of {recipe_file} once every task succeeded.
{_directives(directives)}
{_setup(options)}
exec {merge}{_override_flags(overrides)}
"""


def _resources(options: SbatchOptions, *, gpus: bool) -> list[str]:
    """Partition, time limit, the user's extra arguments, and for the tasks CPUs, memory and GPUs."""
    lines = [f"--partition={options.partition}"] if options.partition else []
    lines += [f"--time={options.time}"] if options.time else []
    if gpus:
        lines += [f"--cpus-per-task={options.cpus_per_task}"] if options.cpus_per_task else []
        lines += [f"--mem={options.mem}"] if options.mem else []
        lines += [f"--gpus-per-task={options.gpus_per_task}"] if options.gpus_per_task else []
    return lines + list(options.sbatch_args)


def _directives(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {option}" for option in options)


def _setup(options: SbatchOptions) -> str:
    return f"\n{options.setup}\n" if options.setup else ""


def _override_flags(overrides: Mapping[str, Any]) -> str:
    # JSON is YAML, which is how the command parses an override's value: the task gets the same value
    return "".join(f" {shlex.quote(f'--{key}={json.dumps(value)}')}" for key, value in overrides.items())


def array_spec(splits: Sequence[int]) -> str:
    """sbatch's --array for these split ids: "0-3", or "1,4-5"."""
    ranges: list[list[int]] = []
    for i in splits:
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _with_serve_gpus(recipe: Recipe, options: SbatchOptions) -> SbatchOptions:
    """Ask for the GPUs that ``model.serve.gpus`` uses, unless told; refuse too few."""
    needed = _gpus_needed(recipe.model.serve)
    if needed is None:
        return options
    if options.gpus_per_task is None:
        return replace(options, gpus_per_task=needed)
    if options.gpus_per_task < needed:
        assert recipe.model.serve is not None and recipe.model.serve.gpus is not None
        raise RecipeError(
            f"model.serve.gpus {recipe.model.serve.gpus} uses {needed} GPUs per task, but --gpus-per-task is "
            f"{options.gpus_per_task}: give --gpus-per-task {needed}, or list fewer GPUs"
        )
    return options


def _gpus_needed(serve: ServeConfig | None) -> int | None:
    """How many GPUs ``serve.gpus`` numbers (its entries count the task's GPUs from 0), if it numbers them."""
    if serve is None or not serve.gpus:
        return None
    numbers = [part.strip() for entry in serve.gpus for part in entry.split(",")]
    return max(int(n) for n in numbers) + 1 if all(n.isdigit() for n in numbers) else None


def _refuse_credentials(overrides: Mapping[str, Any], options: SbatchOptions) -> None:
    texts = {f"--{key}": json.dumps(value) for key, value in overrides.items()}
    texts |= {"--setup": options.setup or "", "--sbatch-args": " ".join(options.sbatch_args)}
    for flag, text in texts.items():
        if _URL_CREDENTIALS.search(text):
            raise RecipeError(
                f"{flag} holds a URL with a user or password, which would be written into the job script: "
                "put it in an environment variable that the recipe reads as ${NAME} (the tasks get your environment)"
            )


def _write(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _sbatch(command: list[str]) -> str:
    """Run an ``sbatch ...`` command; the job id (``--parsable`` prints ``id`` or ``id;cluster``)."""
    out = _slurm([command[0], "--parsable", *command[1:]])
    return out.strip().split(";")[0]


def _slurm(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(
            f"{command[0]} is not installed here: submit from a SLURM login node (or see the scripts with --dry-run)",
            command=command, returncode=None,
        ) from None  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"{shlex.join(command)} did not answer in {_COMMAND_TIMEOUT_S} s: is slurmctld up? (try `sinfo`)",
            command=command,
            returncode=None,
        ) from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise SlurmError(f"{shlex.join(command)} failed: {said}", command=command, returncode=done.returncode, stderr=done.stderr)
    return done.stdout


def _record(folder: str, submission: Submission, name: str) -> None:
    """Add the submission to ``jobs.json``, which ``status`` reads."""
    path = os.path.join(folder, "jobs.json")
    jobs = submissions_in(path)
    jobs.append(
        {
            "split_job": submission.split_job,
            "merge_job": submission.merge_job,
            "splits": submission.splits,
            "num_splits": submission.num_splits,
            "name": name,
            "submitted": time.time(),
        }
    )
    write_json(path, {"submissions": jobs})


def submissions(recipe: Recipe) -> list[dict[str, Any]]:
    """What ``submit`` submitted for this recipe's output, oldest first."""
    folder = os.path.join(work_dir(recipe.data.output, recipe.processing.work_dir), "slurm")
    return submissions_in(os.path.join(folder, "jobs.json"))


def submissions_in(path: str) -> list[dict[str, Any]]:
    try:
        return list(json.loads(Path(path).read_text())["submissions"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


# --------------------------------------------------------------------------- the queue's view


@dataclass
class QueueState:
    job: str  # "12_1", or "13"
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    reason: str  # why pending: Dependency, Resources, BeginTime, ...
    node: str
    log: str

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason and self.reason != "None" else ""
        where = f" on {self.node}" if self.node and self.state == "RUNNING" else ""
        return f"slurm {self.job} {self.state}{why}{where}, log {self.log}"


def queue_states(recipe: Recipe, num_splits: int) -> tuple[dict[int, QueueState], QueueState | None] | None:
    """squeue's view of each split's latest task and of the latest merge job, or None when this
    recipe was never submitted with ``num_splits`` splits or squeue is not installed. Jobs that
    SLURM has forgotten (finished a while ago) are left out."""
    jobs = [s for s in submissions(recipe) if s.get("num_splits") == num_splits]
    if not jobs or shutil.which("squeue") is None:
        return None
    folder = os.path.join(work_dir(recipe.data.output, recipe.processing.work_dir), "slurm")
    latest = {i: str(s["split_job"]) for s in jobs for i in s["splits"]}  # later submissions win
    merge_job = str(jobs[-1]["merge_job"])
    # by name, not --jobs: squeue refuses a list that holds a job it has forgotten
    names = sorted({str(s["name"]) for s in jobs} | {f"{s['name']}-merge" for s in jobs})
    out = _slurm(["squeue", "--noheader", "--array", "--states=all", f"--name={','.join(names)}", "--format=%i|%T|%r|%N"])
    rows = {fields[0]: fields for fields in (line.split("|") for line in out.splitlines()) if len(fields) == 4}

    def state(job: str, log: str) -> QueueState | None:
        if job not in rows:
            return None
        _, slurm_state, reason, node = rows[job]
        return QueueState(job, slurm_state, reason, node, os.path.join(folder, log))

    splits = {i: state(f"{job}_{i}", f"split-{job}_{i}.log") for i, job in latest.items()}
    return {i: s for i, s in splits.items() if s is not None}, state(merge_job, f"merge-{merge_job}.log")


# --------------------------------------------------------------------------- inside a task


def resolve_split(processing: ProcessingConfig) -> tuple[int, int]:
    """``(num_splits, split_id)``: the recipe's, or where it leaves them unset, the SLURM array's
    (``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN``), else one split.

    Raises:
        RecipeError: the split is out of range, or a SLURM variable is not a number.
    """
    num_splits, split_id = processing.num_splits, processing.split_id
    from_slurm = []
    if num_splits is None and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        num_splits = _env_int("SLURM_ARRAY_TASK_COUNT")
        from_slurm.append("num_splits from SLURM_ARRAY_TASK_COUNT")
    if split_id is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        split_id = _env_int("SLURM_ARRAY_TASK_ID") - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        from_slurm.append("split_id from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN")
    num_splits, split_id = num_splits or 1, split_id or 0
    if not 0 <= split_id < num_splits:
        source = f"; {' and '.join(from_slurm)}" if from_slurm else ""
        raise RecipeError(f"processing.split_id {split_id} is out of range for num_splits {num_splits} (use 0 to {num_splits - 1}){source}")
    return num_splits, split_id


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value or "")
    except ValueError:
        raise RecipeError(f"${name} is {value!r}, not a whole number: set processing.split_id and num_splits instead") from None


def allocated_gpus(serve: ServeConfig, env: Mapping[str, str]) -> list[str] | None:
    """``serve.gpus`` on the GPUs SLURM gave this job, or None outside a job with GPUs (or when
    the entries name devices rather than number them).

    In a job, ``serve.gpus`` numbers the job's own GPUs from 0: with SLURM's
    ``CUDA_VISIBLE_DEVICES=4,5,6,7``, ``["0", "1"]`` runs servers on GPUs 4 and 5, and
    ``["0,1", "2,3"]`` two servers on two GPUs each. Tasks sharing a node then never share a GPU.

    Raises:
        RecipeError: ``serve.gpus`` numbers more GPUs than the job has.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if not serve.gpus or not visible or not (env.get("SLURM_JOB_GPUS") or env.get("SLURM_STEP_GPUS")):
        return None
    needed = _gpus_needed(serve)
    if needed is None:
        return None
    devices = visible.split(",")
    if needed > len(devices):
        raise RecipeError(
            f"model.serve.gpus {serve.gpus} numbers {needed} GPUs, but SLURM gave this job {len(devices)} "
            f"(CUDA_VISIBLE_DEVICES={visible}): submit with --gpus-per-task {needed}, or list fewer GPUs"
        )
    return [",".join(devices[int(n)] for n in entry.split(",")) for entry in serve.gpus]


def with_allocated_gpus(recipe: Recipe, env: Mapping[str, str]) -> Recipe:
    """The recipe with ``model.serve.gpus`` on the job's GPUs (see ``allocated_gpus``)."""
    serve = recipe.model.serve
    gpus = allocated_gpus(serve, env) if serve is not None else None
    if serve is None or gpus is None or gpus == serve.gpus:
        return recipe
    model = recipe.model.model_copy(update={"serve": serve.model_copy(update={"gpus": gpus})})
    return recipe.model_copy(update={"model": model})
