"""SLURM: the scripts `submit` writes, and real jobs on a one-node cluster (tests/slurm_cluster.py)
against the fake server: splits run as array tasks, a merge after them, requeue and resume, status.

The cluster tests are marked slow (each waits for real jobs); the script tests need no SLURM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, received, write_recipe
from fake_server import FakeServer
from slurm_cluster import SlurmCluster

from vllm_generator.__main__ import _parse_argv
from vllm_generator.errors import RecipeError
from vllm_generator.recipe import ServeConfig
from vllm_generator.run import run_recipe
from vllm_generator.slurm import allocated_gpus, array_spec

FAKE_SERVER = Path(__file__).with_name("fake_server.py").resolve()
WAIT_S = 120  # for any job; a task here takes a few seconds
SUBMIT_USAGE = (
    "vllm-generator submit RECIPE --num-splits N [--splits 1,3] [--partition P] [--time 04:00:00] [--gpus-per-task G] "
    "[--cpus-per-task C] [--mem 64G] [--sbatch-args '--account=A ...'] [--setup 'source venv/bin/activate'] [--dry-run] "
    "[--section.key=value ...]"
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, left with no job and an idle node for the next test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def write_questions(path: Path, texts: list[str]) -> list[str]:
    pq.write_table(pa.table({"id": list(range(len(texts))), "question": texts}), path)
    return texts


def make_recipe(tmp_path: Path, url: str, texts: list[str], **sections: dict[str, Any]) -> Path:
    write_questions(tmp_path / "in.parquet", texts)
    return write_recipe(tmp_path, url, tmp_path / "in.parquet", tmp_path / "out" / "answers.parquet", **sections)


def reference(tmp_path: Path, recipe: Path, url: str) -> list[dict[str, Any]]:
    """The recipe's output from one process, against another server (the output does not depend on it)."""
    out = tmp_path / "reference.parquet"
    run_recipe(recipe, progress=False, model={"base_url": url}, data={"output": {"path": str(out)}})
    return pq.read_table(out).to_pylist()


def submit(cluster: SlurmCluster, recipe: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, str, str]:
    """``vllm-generator submit RECIPE ARGS`` on the cluster: (array job, merge job, stdout)."""
    result = cli("submit", str(recipe), *args, cwd=recipe.parent, env={**cluster.env, **(env or {})})
    assert result.returncode == 0, result.stderr
    split_job = re.search(r"^submitted job (\d+): splits ", result.stdout, re.MULTILINE)
    merge_job = re.search(r"^submitted job (\d+): the merge", result.stdout, re.MULTILINE)
    assert split_job and merge_job, result.stdout
    return split_job.group(1), merge_job.group(1), result.stdout


def status(cluster: SlurmCluster, recipe: Path) -> list[str]:
    result = cli("status", str(recipe), cwd=recipe.parent, env=cluster.env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S, seen: Callable[[], Any] = lambda: "") -> Any:
    """``condition()`` once it is true; ``seen()`` says what there was instead."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s: {seen()}"
        time.sleep(0.05)
    return value


def slurm_dir(tmp_path: Path) -> Path:
    return tmp_path / "out" / "answers.parquet.work" / "slurm"


def split_dir(tmp_path: Path, split_id: int, num_splits: int) -> Path:
    return tmp_path / "out" / "answers.parquet.work" / f"split-{split_id:05d}-of-{num_splits:05d}"


def chunk_indices(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("chunk-*.arrow"))


# --------------------------------------------------------------------------- the scripts (no SLURM needed)


def test_dry_run_writes_and_prints_the_scripts_and_submits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"sk-test-{uuid.uuid4().hex}"
    recipe = make_recipe(tmp_path, "http://127.0.0.1:9", [f"q {i}" for i in range(10)])
    overrides = ["--generation.stop=['a: b', '#c']", "--data.template='Q: {question}'", "--data.prompt_column=null"]
    result = cli(
        "submit", "recipe.yaml", "--num-splits", "4", "--splits", "1,3", "--partition", "gpu", "--time", "04:00:00", "--gpus-per-task", "2",
        "--cpus-per-task", "8", "--mem", "64G", "--sbatch-args", "--account=proj --qos=high", "--setup", "source /opt/venv/bin/activate",
        "--dry-run", *overrides, cwd=tmp_path, env={"VLLM_API_KEY": secret, "PATH": "/nonexistent"},  # no sbatch: nothing can be submitted
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = slurm_dir(tmp_path)
    split_script, merge_script = (folder / "split.sbatch").read_text(), (folder / "merge.sbatch").read_text()
    assert result.stdout == (
        f"# {folder / 'split.sbatch'} (submit: sbatch {folder / 'split.sbatch'})\n{split_script}"
        f"# {folder / 'merge.sbatch'} (submit: sbatch '--dependency=afterok:<split job>' --kill-on-invalid-dep=yes {folder / 'merge.sbatch'})\n"
        f"{merge_script}dry run: nothing submitted\n"
    )
    directives = [line.removeprefix("#SBATCH ") for line in split_script.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=vllm-generator-answers", "--array=1,3", f"--output={folder}/split-%A_%a.log", "--open-mode=append",
        f"--chdir={tmp_path}", "--ntasks=1", "--requeue", "--signal=B:USR1@120", "--partition=gpu", "--time=04:00:00",
        "--cpus-per-task=8", "--mem=64G", "--gpus-per-task=2", "--account=proj", "--qos=high",
    ]  # fmt: skip
    merge_directives = [line.removeprefix("#SBATCH ") for line in merge_script.splitlines() if line.startswith("#SBATCH ")]
    assert merge_directives == [
        "--job-name=vllm-generator-answers-merge", f"--output={folder}/merge-%j.log", f"--chdir={tmp_path}", "--ntasks=1",
        "--partition=gpu", "--time=04:00:00", "--account=proj", "--qos=high",
    ]  # fmt: skip
    assert "\nsource /opt/venv/bin/activate\n" in split_script and "\nsource /opt/venv/bin/activate\n" in merge_script
    assert secret not in split_script + merge_script and "VLLM_API_KEY" not in split_script + merge_script
    assert not (folder / "jobs.json").exists()

    # the task gets the overrides exactly as submit was given them
    command = next(line for line in split_script.splitlines() if "-m vllm_generator run" in line)
    words = shlex.split(command.replace('"$SLURM_ARRAY_TASK_ID"', "3").removesuffix(" &"))
    assert words[:3] == [sys.executable, "-m", "vllm_generator"]
    args, task_overrides, _ = _parse_argv(words[3:])
    assert args == ["run", str(recipe), "--num-splits", "4", "--progress=false", "--split-id", "3"]
    assert (
        task_overrides
        == _parse_argv(overrides)[1]
        == {"generation.stop": ["a: b", "#c"], "data.template": "Q: {question}", "data.prompt_column": None}
    )


@pytest.mark.parametrize(
    ("args", "sections", "message"),
    [
        (["--num-splits", "4", "--splits", "4"], {}, "--splits 4 is out of range for --num-splits 4 (use 0 to 3)"),
        (["--num-splits", "4", "--splits", "1-x"], {}, "--splits takes split ids such as 1, 0,3 or 2-5, not '1-x'"),
        (["--num-splits", "0"], {}, "--num-splits takes a whole number of at least 1, not 0"),
        (["--num-splits", "11"], {}, "processing.num_splits 11 is more than the 10 rows of {tmp}/in.parquet: use at most 10 splits"),
        (["--num-splits", "4", "--model.base_url=http://user:hunter2@127.0.0.1:9"], {},
         "--model.base_url holds a URL with a user or password, which would be written into the job script: put it in an environment "
         "variable that the recipe reads as ${NAME} (the tasks get your environment)"),
        (["--num-splits", "4", "--gpus-per-task", "1"], {"model": {"base_url": [], "serve": {"model": "m", "gpus": ["0,1", "2,3"]}}},
         "model.serve.gpus ['0,1', '2,3'] uses 4 GPUs per task, but --gpus-per-task is 1: give --gpus-per-task 4, or list fewer GPUs"),
        (["--num-splits", "4"], {"data": {"output": {"path": None, "hub_repo_id": "org/name"}}},
         "{tmp}/recipe.yaml: data.output.path is not set: submit needs it for the split files that the merge job joins"),
    ],
    ids=["split-out-of-range", "split-not-a-number", "no-splits", "more-splits-than-rows", "credentials-in-url", "too-few-gpus", "hub-only"],
)  # fmt: skip
def test_submit_refuses_bad_options_in_one_line(tmp_path: Path, args: list[str], sections: dict[str, Any], message: str) -> None:
    make_recipe(tmp_path, "http://127.0.0.1:9", [f"q {i}" for i in range(10)], **sections)
    result = cli("submit", str(tmp_path / "recipe.yaml"), *args, "--dry-run", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message.replace('{tmp}', str(tmp_path))}\n")
    assert not slurm_dir(tmp_path).exists()


def test_submit_without_sbatch_says_where_to_run_it(tmp_path: Path) -> None:
    make_recipe(tmp_path, "http://127.0.0.1:9", [f"q {i}" for i in range(10)])
    result = cli("submit", "recipe.yaml", "--num-splits", "2", cwd=tmp_path, env={"PATH": "/nonexistent"})
    assert (result.returncode, result.stderr) == (
        1,
        "error: sbatch is not installed here: submit from a SLURM login node (or see the scripts with --dry-run)\n",
    )


def test_array_spec_names_runs_of_splits() -> None:
    assert [array_spec(s) for s in ([0, 1, 2], [3], [0, 1, 2, 5, 7, 8])] == ["0-2", "3", "0-2,5,7-8"]


def test_the_recipe_s_gpus_become_the_task_s_gpus() -> None:
    job = {"SLURM_JOB_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert allocated_gpus(ServeConfig(model="m", gpus=["0", "1", "2", "3"]), job) == ["4", "5", "6", "7"]
    assert allocated_gpus(ServeConfig(model="m", gpus=["0,1", "2,3"]), job) == ["4,5", "6,7"]
    assert allocated_gpus(ServeConfig(model="m", gpus=["1"]), job) == ["5"]
    assert allocated_gpus(ServeConfig(model="m"), job) is None  # one server that sees every GPU of the job
    assert allocated_gpus(ServeConfig(model="m", gpus=["GPU-3f2a"]), job) is None  # devices named, not numbered
    assert allocated_gpus(ServeConfig(model="m", gpus=["0"]), {"CUDA_VISIBLE_DEVICES": "2"}) is None  # not SLURM's
    with pytest.raises(RecipeError) as info:
        allocated_gpus(ServeConfig(model="m", gpus=["0", "1"]), {"SLURM_STEP_GPUS": "3", "CUDA_VISIBLE_DEVICES": "3"})
    assert str(info.value) == (
        "model.serve.gpus ['0', '1'] numbers 2 GPUs, but SLURM gave this job 1 (CUDA_VISIBLE_DEVICES=3): "
        "submit with --gpus-per-task 2, or list fewer GPUs"
    )


# --------------------------------------------------------------------------- real jobs


@pytest.mark.slow
def test_dry_run_scripts_are_accepted_by_sbatch_test_only(tmp_path: Path, slurm: SlurmCluster) -> None:
    recipe = make_recipe(tmp_path, "http://127.0.0.1:9", [f"q {i}" for i in range(10)])
    before = slurm.states()
    result = cli(
        "submit", str(recipe), "--num-splits", "3", "--partition", "debug", "--time", "10", "--gpus-per-task", "1", "--cpus-per-task", "1",
        "--mem", "100M", "--sbatch-args", "--comment=vllm-generator", "--setup", "export VG_SETUP=1", "--dry-run", cwd=tmp_path,
        env=slurm.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for script in ("split.sbatch", "merge.sbatch"):
        checked = slurm.run("sbatch", "--test-only", str(slurm_dir(tmp_path) / script))
        assert checked.returncode == 0, checked.stderr
        assert re.search(r"sbatch: Job \d+ to start at .* on nodes \S+ in partition debug", checked.stderr), checked.stderr
    assert slurm.states() == before  # nothing was submitted


@pytest.mark.slow
def test_a_script_sbatch_refuses_is_one_line_and_nothing_is_recorded(tmp_path: Path, slurm: SlurmCluster) -> None:
    recipe = make_recipe(tmp_path, "http://127.0.0.1:9", [f"q {i}" for i in range(10)])
    result = cli("submit", str(recipe), "--num-splits", "2", "--partition", "nope", cwd=tmp_path, env=slurm.env)
    script = slurm_dir(tmp_path) / "split.sbatch"
    assert (result.returncode, result.stdout) == (1, "")
    assert (
        result.stderr
        == f"error: sbatch --parsable {script} failed: sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    )
    assert not (slurm_dir(tmp_path) / "jobs.json").exists()


@pytest.mark.slow
def test_submit_runs_each_split_as_a_task_and_merges_like_one_process(
    tmp_path: Path, slurm: SlurmCluster, start_fake_server: Callable[..., FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row sent once; the key reaches the tasks through the environment, never a script or log."""
    secret = f"sk-test-{uuid.uuid4().hex}"
    server = start_fake_server("--api-key", secret)
    texts = [f"question {i}" for i in range(90)]
    recipe = make_recipe(tmp_path, server.url, texts)
    monkeypatch.setenv("VLLM_API_KEY", secret)
    expected = reference(tmp_path, recipe, server.url)
    server.reset()

    split_job, merge_job, stdout = submit(slurm, recipe, "--num-splits", "3", env={"VLLM_API_KEY": secret})
    folder = slurm_dir(tmp_path)
    logs = [folder / f"split-{split_job}_{i}.log" for i in range(3)]
    assert stdout.splitlines() == [
        f"submitted job {split_job}: splits 0-2 of 3, one per array task",
        f"submitted job {merge_job}: the merge, once every split succeeded (SLURM cancels it if one fails)",
        *(f"  split {i} log: {log}" for i, log in enumerate(logs)),
        f"  merge log: {folder / f'merge-{merge_job}.log'}",
        f"  follow with: vllm-generator status {recipe}",
    ]
    assert slurm.wait_for(merge_job, timeout=WAIT_S) == "COMPLETED", (folder / f"merge-{merge_job}.log").read_text()

    assert pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist() == expected
    assert received(server) == Counter(texts)  # every row once, across the three tasks
    for i, log in enumerate(logs):
        assert f"split {i} of 3: rows {30 * i} to {30 * i + 30} of" in log.read_text()
    for path in [*folder.iterdir(), *(tmp_path / "out").rglob("*.json")]:
        assert secret not in path.read_text(errors="replace"), path

    out = tmp_path / "out"
    assert status(slurm, recipe) == [
        *(f"split {i}: done: 30 rows (0 with an error) -> {out}/answers.split-0000{i}-of-00003.parquet "
          f"[slurm {split_job}_{i} COMPLETED, log {logs[i]}]" for i in range(3)),
        f"merge: done -> {out}/answers.parquet [slurm {merge_job} COMPLETED, log {folder / f'merge-{merge_job}.log'}]",
        "3 splits: 3 done",
    ]  # fmt: skip


@pytest.mark.slow
def test_tasks_killed_mid_run_then_requeued_resume_and_splits_resubmitted_alone_bring_a_merge(
    tmp_path: Path, slurm: SlurmCluster, start_fake_server: Callable[..., FakeServer]
) -> None:
    """Task 1 by `scancel --signal=KILL` (SLURM sends TERM first: the run stops cleanly), task 2's
    run by SIGKILL itself (an out-of-memory kill: no chance to stop); both requeued by hand."""
    server = start_fake_server("--latency", "0.1", "--slots", "4")
    texts = [f"question {i}" for i in range(180)]
    recipe = make_recipe(tmp_path, server.url, texts, processing={"max_concurrency": 2})
    expected = reference(tmp_path, recipe, start_fake_server().url)
    split_job, merge_job, _ = submit(slurm, recipe, "--num-splits", "3")
    finished: dict[int, list[int]] = {}
    for i in (1, 2):  # two CPUs: task 2 starts once task 0 or 1 is over
        work = split_dir(tmp_path, i, 3)
        wait_until(lambda work=work: chunk_indices(work), f"a finished chunk in split {i}")
        if i == 1:
            assert slurm.run("scancel", "--signal=KILL", f"{split_job}_1").returncode == 0
        else:
            os.kill(json.loads((work / "status.json").read_text())["pid"], signal.SIGKILL)
        assert slurm.wait_for(f"{split_job}_{i}", timeout=30) == ("CANCELLED" if i == 1 else "FAILED")
        finished[i] = chunk_indices(work)
        assert 1 <= len(finished[i]) < 6, finished  # killed mid-run
    # a task that can never succeed cancels the merge that waited for it (rather than leave it pending)
    assert slurm.wait_for(merge_job, {"CANCELLED"}, timeout=30) == "CANCELLED"
    lines = status(slurm, recipe)
    stopped_at = re.match(r"split 1: stopped at (\d+) of 60 rows \(interrupted\)", lines[1])
    assert stopped_at and int(stopped_at.group(1)) >= 10 * len(finished[1]), lines  # rows answered; whole chunks are kept
    assert lines[1].endswith(f"[slurm {split_job}_1 CANCELLED, log {slurm_dir(tmp_path)}/split-{split_job}_1.log]"), lines
    assert re.match(rf"split 2: lost: its run \({slurm.node}:\d+\) is gone or silent since [\d:]+, when \d+ of 60 rows", lines[2])
    assert f"[slurm {split_job}_2 FAILED (NonZeroExitCode), log" in lines[2], lines

    for i in (1, 2):
        task = f"{split_job}_{i}"
        assert slurm.run("scontrol", "requeue", task).returncode == 0
        assert slurm.wait_for(task, {"COMPLETED"}, timeout=WAIT_S) == "COMPLETED"
        log = (slurm_dir(tmp_path) / f"split-{task}.log").read_text()
        count = len(finished[i])
        assert f"resuming: {count} of 6 chunks ({10 * count} rows) are done and will not be sent again" in log
    counts = received(server)
    assert set(counts) == set(texts) and all(counts[t] == 1 for t in texts[:60])
    for i, chunks in finished.items():  # finished chunks were not sent again
        split_rows = texts[60 * i : 60 * i + 60]
        assert [counts[t] for c in chunks for t in split_rows[10 * c : 10 * c + 10]] == [1] * 10 * len(chunks)
    # each kill resent at most the chunk in progress and the rows sent ahead
    assert sum(counts.values()) - len(texts) <= 2 * (10 + 2 * 2)

    # the merge was cancelled: submitting the two splits alone brings a new one; their runs send nothing
    sent = len(server.log())
    _, merge_again, stdout = submit(slurm, recipe, "--num-splits", "3", "--splits", "1,2")
    assert "splits 1-2 of 3, one per array task" in stdout
    assert slurm.wait_for(merge_again, timeout=WAIT_S) == "COMPLETED"
    assert len(server.log()) == sent
    assert pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist() == expected


@pytest.mark.slow
def test_slurm_s_warning_stops_the_task_which_requeues_itself_and_resumes(
    tmp_path: Path, slurm: SlurmCluster, start_fake_server: Callable[..., FakeServer]
) -> None:
    """What a time limit or a preemption does (`--signal=B:USR1@120`), sent now: the merge still follows."""
    server = start_fake_server("--latency", "0.1", "--slots", "4")
    texts = [f"question {i}" for i in range(180)]
    recipe = make_recipe(tmp_path, server.url, texts, processing={"max_concurrency": 2})
    expected = reference(tmp_path, recipe, start_fake_server().url)
    split_job, merge_job, _ = submit(slurm, recipe, "--num-splits", "3")
    task = f"{split_job}_1"
    work = split_dir(tmp_path, 1, 3)
    wait_until(lambda: chunk_indices(work), "finished chunk in split 1")
    assert slurm.run("scancel", "--batch", "--signal=USR1", task).returncode == 0
    stopped = wait_until(
        lambda: next((line for line in status(slurm, recipe) if line.startswith("split 1: stopped") and " PENDING" in line), None),
        "stopped split 1, requeued",
    )
    assert f"finished chunks are kept and the next run resumes from them [slurm {task} PENDING" in stopped, stopped
    finished = chunk_indices(work)

    assert slurm.wait_for(merge_job, timeout=WAIT_S) == "COMPLETED"
    assert pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist() == expected
    log = (slurm_dir(tmp_path) / f"split-{task}.log").read_text()
    assert "vllm-generator: SLURM warned this task of its end: stopping the run, then requeueing the task" in log
    assert "interrupted: finished chunks are saved; run the same command again to resume" in log
    assert f"resuming: {len(finished)} of 6 chunks" in log
    assert "Restarts=1 " in slurm.run("scontrol", "show", "job", task).stdout
    counts = received(server)
    for i in finished:
        assert [counts[t] for t in texts[60 + 10 * i : 70 + 10 * i]] == [1] * 10
    assert set(counts) == set(texts) and sum(counts.values()) - len(texts) <= 10 + 2 * 2


@pytest.mark.slow
def test_status_reports_each_split_s_state_and_the_queue_s(tmp_path: Path, slurm: SlurmCluster, fake_server: FakeServer) -> None:
    """One task at a time (each takes every CPU): split 0 done, 1 failed, 2 running, 3 waiting."""
    texts = [f"question {i}" for i in range(10)] + ["forbidden [[403]]"] * 10
    texts += [f"slow {i} [[sleep:1]]" for i in range(10)] + [f"later {i}" for i in range(10)]
    recipe = make_recipe(tmp_path, fake_server.url, texts, processing={"max_concurrency": 1, "batch_size": 1, "chunk_size": 2})
    split_job, merge_job, _ = submit(slurm, recipe, "--num-splits", "4", "--cpus-per-task", str(os.cpu_count()))
    lines = wait_until(
        lambda: "ETA" in (lines := status(slurm, recipe))[2] and lines,
        "running split with an ETA",
        seen=lambda: "\n".join(status(slurm, recipe)),
    )
    folder, out = slurm_dir(tmp_path), tmp_path / "out"
    assert lines[0] == (
        f"split 0: done: 10 rows (0 with an error) -> {out}/answers.split-00000-of-00004.parquet "
        f"[slurm {split_job}_0 COMPLETED, log {folder}/split-{split_job}_0.log]"
    )
    assert re.fullmatch(
        rf"split 1: failed: AuthenticationError: .+ \[slurm {split_job}_1 FAILED \(NonZeroExitCode\), log {folder}/split-{split_job}_1.log\]",
        lines[1],
    )
    assert re.fullmatch(
        rf"split 2: running: [1-9] of 10 rows, [\d.]+ rows/s, ETA 0:00:\d\d \({slurm.node}:\d+\) "
        rf"\[slurm {split_job}_2 RUNNING on {slurm.node}, log {folder}/split-{split_job}_2.log\]",
        lines[2],
    ), lines[2]
    assert re.fullmatch(rf"split 3: not started \[slurm {split_job}_3 PENDING \(\w+\), log {folder}/split-{split_job}_3.log\]", lines[3])
    # SLURM decides about an array dependency once every task is over
    assert lines[4] == f"merge: not yet [slurm {merge_job} PENDING (Dependency), log {folder}/merge-{merge_job}.log]"
    assert lines[5] == "4 splits: 1 done, 1 failed, 1 running, 1 not started"
    assert slurm.run("scancel", split_job).returncode == 0
    assert slurm.wait_for(merge_job, timeout=30) == "CANCELLED"  # it can never run now


LAUNCHER = textwrap.dedent(
    """
    import argparse, json, os, sys

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--host", "--port"):
        parser.add_argument(flag)
    args, _ = parser.parse_known_args()
    record = {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "job_gpus": os.environ.get("SLURM_JOB_GPUS"), "port": args.port}
    with open(os.path.join(os.environ["RECORD_DIR"], os.environ["SLURM_ARRAY_TASK_ID"] + ".json"), "w") as f:
        json.dump(record, f)
    os.execv(sys.executable, [sys.executable, FAKE_SERVER, "--port", args.port, "--model", args.model or sys.argv[1]])
    """
)


@pytest.mark.slow
def test_each_task_serves_its_model_on_the_gpus_slurm_gave_it(tmp_path: Path, slurm: SlurmCluster) -> None:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(f"FAKE_SERVER = {str(FAKE_SERVER)!r}\n" + LAUNCHER)
    records = tmp_path / "records"
    records.mkdir()
    serve = {"model": "m1", "command": [sys.executable, str(launcher)], "gpus": ["0"], "port": 8000, "env": {"RECORD_DIR": str(records)}}
    texts = [f"question {i}" for i in range(8)]
    recipe = make_recipe(tmp_path, "unused", texts, model={"base_url": [], "serve": serve})
    _, merge_job, _ = submit(slurm, recipe, "--num-splits", "2")  # --gpus-per-task 1, from serve.gpus
    assert slurm.wait_for(merge_job, timeout=WAIT_S) == "COMPLETED"
    assert pq.read_table(tmp_path / "out" / "answers.parquet").column("response").to_pylist() == [f"echo: {t}" for t in texts]
    seen = [json.loads((records / f"{i}.json").read_text()) for i in range(2)]
    # both tasks ran at once, each on the GPU SLURM gave it (the recipe's "0" is the job's first GPU)
    assert sorted(r["job_gpus"] for r in seen) == ["0", "1"] and all(r["cuda"] == r["job_gpus"] for r in seen), seen
    assert all(r["port"] != "8000" for r in seen)  # tasks sharing a node pick free ports
