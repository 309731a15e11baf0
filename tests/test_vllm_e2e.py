"""End to end against a real vLLM server: the CPU build and the tiny random model (DESIGN.md §6),
and SmolLM2-135M-Instruct, a real small model (DESIGN.md §8), for real answers.

One tiny-model server (with ``--reasoning-parser qwen3``), started once per session with the
project's own ``serve_models``, is shared by most tests here; the CLI runs as a subprocess against
it. The SmolLM2 tests share a second server, with the serve section of recipes/quickstart.yaml.
The model's weights are random, so the tests assert on counts, shapes, finish reasons, token counts
and same-seed reproducibility, never on the text (scripts/VLLM_NOTES.md has the measured facts).
Row alignment is checked through ``prompt_tokens``: each row's count must equal what the server's
``/tokenize`` says about that row's own prompt, and the prompts have different lengths.

    .venv/bin/python -m pytest -m vllm          # needs `bash scripts/setup.sh` once
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import yaml
from conformance import check_request, check_response
from datasets import Dataset
from fake_server import OPENER
from pydantic import BaseModel, Field

from vllm_generator import vllm_generate
from vllm_generator.recipe import ServeConfig, load_recipe
from vllm_generator.serve import LOG_DIR_ENV, serve_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"
MODEL_DIR = REPO / ".models" / "tiny-qwen3"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
STRUCTURED = REPO / "recipes" / "quickstart_structured.yaml"
SMOLLM_DIR = REPO / ".models" / "smollm2-135m-instruct"
QUESTIONS = REPO / "recipes" / "data" / "questions.jsonl"
MODEL_NAME = "tiny-qwen3"  # --served-model-name in tiny_serve()
MAX_MODEL_LEN = 512
# Never send requests to 127.0.0.1 through a proxy from the environment.


def require_real_vllm() -> None:
    """Skip (fail under CI) when the vLLM CPU build or the tiny model is not installed."""
    needed = (VLLM_PYTHON, MODEL_DIR / "config.json", SMOLLM_DIR / "vllm_generator_meta.json")
    missing = [str(p.relative_to(REPO)) for p in needed if not p.exists()]
    if not missing:
        return
    message = f"the real vLLM tests need {' and '.join(missing)}: run `bash scripts/setup.sh` to install them"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so these tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def think_end_id() -> int:
    """The ``</think>`` token id of the tiny model (1025), from the metadata its build script writes."""
    return int(json.loads((MODEL_DIR / "vllm_generator_meta.json").read_text())["think_end_token_id"])


def absolute_paths(items: list[str]) -> list[str]:
    """Repo-relative paths in a command line (``.vllm-venv/bin/python``) made absolute."""
    return [str(REPO / item) if item.startswith(".") and (REPO / item).exists() else item for item in items]


def tiny_serve() -> ServeConfig:
    """The tiny random Qwen3 with the reasoning parser (what the quickstart used before SmolLM2)."""
    return ServeConfig(
        model=str(MODEL_DIR),
        command=[str(VLLM_PYTHON), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", "{model}"],
        args=[
            *("--served-model-name", MODEL_NAME, "--dtype", "bfloat16", "--enforce-eager"),
            *("--max-model-len", str(MAX_MODEL_LEN), "--reasoning-parser", "qwen3"),
        ],
        port=0,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
        startup_timeout=300,
    )


def quickstart_serve() -> ServeConfig:
    """The serve section of recipes/quickstart.yaml (SmolLM2) with absolute paths: usable from any cwd."""
    serve = load_recipe(QUICKSTART).model.serve
    assert serve is not None, f"{QUICKSTART} has no model.serve section"
    return serve.model_copy(update={"model": absolute_paths([serve.model])[0], "command": absolute_paths(serve.command), "port": 0})


# --------------------------------------------------------------------------- processes


def _process_group(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[2])  # fields after "(comm)": state, ppid, pgrp


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (a vLLM server: API server, engine core, worker)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _process_group(pid) == pgid and not _is_zombie(pid)]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def server_group(url: str) -> int:
    """The process group of the vLLM API server listening on ``url``'s port."""
    port = str(urlsplit(url).port)
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("vllm.entrypoints" in a for a in argv) and ("--port", port) in itertools.pairwise(argv):
            group = _process_group(int(proc.name))
            if group is not None:
                return group
    raise AssertionError(f"no vLLM API server process with --port {port} found in /proc")


def wait_group_gone(pgid: int, timeout: float = 10.0) -> list[int]:
    """Processes still in the group after ``timeout`` seconds (empty when it is gone)."""
    deadline = time.monotonic() + timeout
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# --------------------------------------------------------------------------- the shared server


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One real vLLM server for the whole session, started and stopped by ``serve_models``:
    its URL and its log file."""
    require_real_vllm()
    root = tmp_path_factory.mktemp("vllm-server")
    with contextlib.ExitStack() as stack:
        # serve_models reads the log folder and passes os.environ to the server when it starts it
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(LOG_DIR_ENV, str(root / "logs"))
            mp.setenv("VLLM_CACHE_ROOT", str(root / "vllm-cache"))  # keep ~/.cache/vllm untouched
            urls = stack.enter_context(serve_models(tiny_serve()))
        assert len(urls) == 1, urls
        (log,) = (root / "logs").glob("vllm-*.log")
        group = server_group(urls[0])
        yield urls[0], log
    left = wait_group_gone(group)
    assert not left, f"vLLM server processes {left} (group {group}) still run after serve_models exited"


@pytest.fixture
def vllm_url(shared_server: tuple[str, Path]) -> str:
    """The shared server's URL, checked to be alive: a test that crashed it names the log."""
    url, log = shared_server
    try:
        with OPENER.open(url + "/health", timeout=10) as response:
            alive = response.status == 200
    except OSError:
        alive = False
    if not alive:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        pytest.fail(f"the shared vLLM server at {url} is down (an earlier test crashed it?); log {log}:\n{tail}", pytrace=False)
    return url


# --------------------------------------------------------------------------- helpers


def post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with OPENER.open(request, timeout=30) as response:
        return json.loads(response.read())


def count_tokens(url: str, **body: Any) -> int:
    """Tokens vLLM counts for a raw ``prompt`` or for chat ``messages`` (with the chat template)."""
    return int(post(url, "/tokenize", {"model": MODEL_NAME, **body})["count"])


def chat_prompt_tokens(url: str, texts: list[str], system: str | None = None, thinking: bool | None = None) -> list[int]:
    counts = []
    for text in texts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        extra = {"chat_template_kwargs": {"enable_thinking": thinking}} if thinking is not None else {}
        counts.append(count_tokens(url, messages=messages, **extra))
    return counts


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def read_metrics(output: Path) -> dict[str, Any]:
    return dict(json.loads(output.with_name(output.name.removesuffix(".parquet") + ".metrics.json").read_text()))


def write_recipe(tmp_path: Path, url: str, name: str = "recipe", **sections: dict[str, Any]) -> Path:
    """A recipe over the first 12 questions; ``sections`` update the defaults key by key."""
    recipe: dict[str, Any] = {
        "data": {
            "input": {"path": str(QUESTIONS), "limit": 12},
            "template": "{question}",
            "output": {"path": str(tmp_path / name / "answers.parquet")},
        },
        "model": {"base_url": url},
        "generation": {"max_tokens": 16},
        # small chunks and batches: several of each even with a dozen rows
        "processing": {"chunk_size": 5, "batch_size": 4},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def output_of(recipe: Path) -> Path:
    return Path(yaml.safe_load(recipe.read_text())["data"]["output"]["path"])


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_generator", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_ok(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = cli(*args, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, (
        f"vllm-generator {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr (end):\n{proc.stderr[-4000:]}"
    )
    return proc


def assert_all_ok(rows: list[dict[str, Any]], max_tokens: int) -> None:
    """No row failed; every row has a finish reason and a plausible completion token count."""
    assert [r["error"] for r in rows if r["error"] is not None] == []
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(1 <= r["completion_tokens"] <= max_tokens for r in rows), [r["completion_tokens"] for r in rows]


OUTPUT_COLUMNS = ("response", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def outputs(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(r[c] for c in OUTPUT_COLUMNS) for r in rows]


# --------------------------------------------------------------------------- tests


def test_chat_recipe(vllm_url: str, tmp_path: Path) -> None:
    """recipes/chat.yaml as shipped, pointed at the server with command-line overrides."""
    output = tmp_path / "chat" / "answers.parquet"
    proc = cli_ok(
        "run",
        "recipes/chat.yaml",
        f"--model.base_url={vllm_url}",
        "--data.input.limit=12",
        f"--data.output.path={output}",
        f"--logging.file={tmp_path / 'chat' / 'run.log'}",
        "--generation.max_tokens=24",
        "--processing.chunk_size=5",
        "--processing.batch_size=4",
        "--progress=false",
        cwd=REPO,
    )
    assert "done: 12 rows (12 ok, 0 failed)" in proc.stdout
    rows = read_rows(output)
    questions = read_jsonl(QUESTIONS)[:12]
    assert [r["id"] for r in rows] == [q["id"] for q in questions]
    assert_all_ok(rows, max_tokens=24)
    # chat.yaml: system prompt, "{question} Answer in at most two sentences.", thinking: false
    recipe = load_recipe(REPO / "recipes" / "chat.yaml")
    assert recipe.data.template is not None and recipe.generation.thinking is False
    texts = [recipe.data.template.format(**q) for q in questions]
    expected = chat_prompt_tokens(vllm_url, texts, system=recipe.data.system_prompt, thinking=False)
    assert [r["prompt_tokens"] for r in rows] == expected
    assert all(r["reasoning"] is None for r in rows)
    assert all(isinstance(r["response"], str) for r in rows)
    metrics = read_metrics(output)
    assert (metrics["rows"], metrics["succeeded"], metrics["failed"], metrics["generated_rows"]) == (12, 12, 0, 12), proc.stderr
    assert metrics["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert metrics["prompt_tokens"] == sum(expected)


def test_completion_recipe(vllm_url: str, tmp_path: Path) -> None:
    """recipes/completion.yaml: the raw prompt goes to /v1/completions, without a chat template."""
    output = tmp_path / "completion" / "answers.parquet"
    cli_ok(
        "run",
        "recipes/completion.yaml",
        f"--model.base_url={vllm_url}",
        "--data.input.limit=12",
        f"--data.output.path={output}",
        "--generation.max_tokens=16",
        "--progress=false",
        cwd=REPO,
    )
    rows = read_rows(output)
    assert len(rows) == 12
    assert_all_ok(rows, max_tokens=16)
    recipe = load_recipe(REPO / "recipes" / "completion.yaml")
    assert recipe.data.template is not None
    prompts = [recipe.data.template.format(**q) for q in read_jsonl(QUESTIONS)[:12]]
    # the token count of the bare prompt: no chat template was applied
    assert [r["prompt_tokens"] for r in rows] == [count_tokens(vllm_url, prompt=p) for p in prompts]
    assert all(r["reasoning"] is None for r in rows)


def test_n_choices_and_seed_reproducibility(vllm_url: str, tmp_path: Path) -> None:
    # vLLM samples choice i with seed + i: seeds n apart share no samples (VLLM_NOTES.md, Seeds)
    n, max_tokens = 4, 12
    generation = {"n": n, "temperature": 1.0, "max_tokens": max_tokens, "thinking": False}
    # vLLM 0.32's CPU build kills its engine ("CPU Generator does not use offset") when a seeded
    # n>1 request's prefill is split across steps, that is once more than 2048 prompt tokens
    # (max_num_batched_tokens) are in flight: 4 rows x 4 choices x ~47 tokens stay below that.
    processing = {"max_concurrency": 4}
    first = write_recipe(tmp_path, vllm_url, "seed42-a", generation={**generation, "seed": 42}, processing=processing)
    again = write_recipe(tmp_path, vllm_url, "seed42-b", generation={**generation, "seed": 42}, processing=processing)
    other = write_recipe(tmp_path, vllm_url, "seed46", generation={**generation, "seed": 42 + n}, processing=processing)
    for recipe in (first, again, other):
        cli_ok(str(recipe), "--progress=false", cwd=tmp_path)
    a, b, c = (read_rows(output_of(r)) for r in (first, again, other))
    # the second run generated everything itself (another output path, so no chunk was reused)
    assert read_metrics(output_of(again))["generated_rows"] == 12
    for row in a:
        assert len(row["response"]) == n and len(row["finish_reason"]) == n and len(row["reasoning"]) == n
        assert set(row["finish_reason"]) <= {"stop", "length"}
        assert row["error"] is None
        assert n <= row["completion_tokens"] <= n * max_tokens  # usage adds up all n choices
        assert len(set(row["response"])) > 1, "the n choices of one request should differ"
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert outputs(a) == outputs(b)
    differing = sum(x["response"] != y["response"] for x, y in zip(a, c, strict=True))
    assert differing > len(a) // 2, f"seed 42 and seed {42 + n} gave the same choices on {len(a) - differing} of {len(a)} rows"


def test_thinking_splits_reasoning_from_response(vllm_url: str, tmp_path: Path) -> None:
    """--reasoning-parser qwen3 plus a logit_bias on </think>: both columns fill (VLLM_NOTES.md)."""
    recipe = write_recipe(
        tmp_path,
        vllm_url,
        generation={"thinking": True, "logit_bias": {think_end_id(): 5}, "seed": 11, "max_tokens": 24},
    )
    cli_ok(str(recipe), "--progress=false", cwd=tmp_path)
    rows = read_rows(output_of(recipe))
    assert len(rows) == 12
    assert_all_ok(rows, max_tokens=24)
    both = [r for r in rows if r["reasoning"] and r["response"]]
    assert len(both) >= 1, [(r["reasoning"], r["response"]) for r in rows]
    # the parser drops the </think> that ends reasoning; none leaks into either column
    assert not any("</think>" in (r["response"] or "") + (r["reasoning"] or "") for r in rows)
    questions = [q["question"] for q in read_jsonl(QUESTIONS)[:12]]
    assert [r["prompt_tokens"] for r in rows] == chat_prompt_tokens(vllm_url, questions, thinking=True)


@pytest.mark.parametrize("think_end_bias", [None, 5.0], ids=["plain", "model-writes-think-end"])
def test_thinking_off_gives_no_reasoning(vllm_url: str, tmp_path: Path, think_end_bias: float | None) -> None:
    """thinking: false sets enable_thinking false: the template closes the think block in the prompt,
    so everything generated is the response, even a stray </think> the model writes."""
    generation: dict[str, Any] = {"thinking": False, "seed": 11, "max_tokens": 24}
    if think_end_bias is not None:
        generation["logit_bias"] = {think_end_id(): think_end_bias}
    recipe = write_recipe(tmp_path, vllm_url, generation=generation)
    cli_ok(str(recipe), "--progress=false", cwd=tmp_path)
    rows = read_rows(output_of(recipe))
    assert_all_ok(rows, max_tokens=24)
    questions = [q["question"] for q in read_jsonl(QUESTIONS)[:12]]
    # the empty think block in the prompt proves chat_template_kwargs reached the server
    assert [r["prompt_tokens"] for r in rows] == chat_prompt_tokens(vllm_url, questions, thinking=False)
    reasoning = [r["reasoning"] for r in rows]
    assert reasoning == [None] * 12, (
        f"thinking is off, yet {sum(r is not None for r in reasoning)} of 12 rows have reasoning: "
        f"{[(r['reasoning'], r['response']) for r in rows[:2]]}"
    )
    assert all(r["response"] for r in rows)


@pytest.mark.parametrize(
    ("structured_outputs", "check"),
    [
        ({"choice": ["yes", "no", "maybe"]}, lambda text: text in {"yes", "no", "maybe"}),
        ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch("[0-9]{3}-[a-z]{2}", text) is not None),
    ],
    ids=["choice", "regex"],
)
def test_structured_outputs(vllm_url: str, tmp_path: Path, structured_outputs: dict[str, Any], check: Any) -> None:
    # with a reasoning parser the constraint starts after reasoning ends: turn thinking off
    recipe = write_recipe(
        tmp_path,
        vllm_url,
        generation={"thinking": False, "temperature": 1.0, "seed": 3, "max_tokens": 16, "structured_outputs": structured_outputs},
    )
    cli_ok(str(recipe), "--progress=false", cwd=tmp_path)
    rows = read_rows(output_of(recipe))
    assert len(rows) == 12
    assert_all_ok(rows, max_tokens=16)
    assert [r["response"] for r in rows if not check(r["response"])] == []
    assert {r["finish_reason"] for r in rows} == {"stop"}


def test_prompt_longer_than_context_fails_only_its_row(vllm_url: str, tmp_path: Path) -> None:
    texts = ["Name a colour.", "Name a river.", "word " * (MAX_MODEL_LEN + 100), "Name a bird.", "Name a tree."]
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    recipe = write_recipe(
        tmp_path,
        vllm_url,
        data={"input": {"path": str(data)}, "template": None, "prompt_column": "text"},
        generation={"max_tokens": 8, "seed": 0, "thinking": False},
        processing={"chunk_size": 10, "batch_size": 10},
    )
    proc = cli_ok(str(recipe), "--progress=false", cwd=tmp_path)
    assert "done: 5 rows (4 ok, 1 failed)" in proc.stdout
    rows = read_rows(output_of(recipe))
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    failed = rows[2]
    assert failed["error"] is not None and failed["error"].startswith("400 from "), failed["error"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in failed["error"]
    assert (failed["response"], failed["finish_reason"], failed["completion_tokens"]) == (None, None, 0)
    assert_all_ok(rows[:2] + rows[3:], max_tokens=8)
    metrics = read_metrics(output_of(recipe))
    assert metrics["failed_by_type"] == {"http_400": 1}
    # a 400 is final: one request per row, no retry
    assert (metrics["requests"], metrics["retries"]) == (5, 0)


def test_split_run_then_merge(vllm_url: str, tmp_path: Path) -> None:
    generation = {"temperature": 0, "max_tokens": 12, "thinking": False}
    recipe = write_recipe(tmp_path, vllm_url, data={"input": {"path": str(QUESTIONS), "limit": 15}}, generation=generation)
    whole = write_recipe(tmp_path, vllm_url, "whole", data={"input": {"path": str(QUESTIONS), "limit": 15}}, generation=generation)
    for split_id in (1, 0):  # any order
        cli_ok(str(recipe), "--split-id", str(split_id), "--num-splits", "2", "--progress=false", cwd=tmp_path)
    output = output_of(recipe)
    split_files = [output.with_name(f"answers.split-{i:05d}-of-00002.parquet") for i in (0, 1)]
    splits = [read_rows(f) for f in split_files]
    assert [len(s) for s in splits] == [8, 7]
    assert not output.exists()
    proc = cli_ok("merge", str(recipe), cwd=tmp_path)
    assert "merged 2 splits: 15 rows (0 with an error)" in proc.stdout
    merged = read_rows(output)
    assert merged == splits[0] + splits[1]
    questions = read_jsonl(QUESTIONS)[:15]
    assert [r["id"] for r in merged] == [q["id"] for q in questions]
    assert_all_ok(merged, max_tokens=12)
    expected = chat_prompt_tokens(vllm_url, [q["question"] for q in questions], thinking=False)
    assert [r["prompt_tokens"] for r in merged] == expected
    # greedy decoding: the same rows without splitting give the same output
    cli_ok(str(whole), "--progress=false", cwd=tmp_path)
    assert outputs(merged) == outputs(read_rows(output_of(whole)))


def test_run_killed_midway_resumes_to_the_same_output(vllm_url: str, tmp_path: Path) -> None:
    # 60 prompts of different lengths, 12 chunks of 5; one request at a time makes the run take a
    # few seconds, so it can be killed between chunks. Greedy decoding makes the output repeatable.
    data = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"id": i, "question": f"Question {i}: " + "why " * (i % 7) + "is the sky blue?"} for i in range(60)],
    )
    sections: dict[str, Any] = {
        "generation": {"temperature": 0, "max_tokens": 32, "thinking": False},
        "processing": {"chunk_size": 5, "batch_size": 5, "max_concurrency": 1, "lookahead": 0},
    }
    data_section = {"input": {"path": str(data)}}
    reference = write_recipe(tmp_path, vllm_url, "reference", data=data_section, **sections)
    resumed = write_recipe(tmp_path, vllm_url, "resumed", data=data_section, **sections)
    cli_ok(str(reference), "--progress=false", cwd=tmp_path)

    chunk_dir = Path(f"{output_of(resumed)}.work") / "split-00000-of-00001"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_generator", str(resumed), "--progress=false"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(chunk_dir.glob("chunk-*.arrow"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed: make it longer"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_chunks = len(list(chunk_dir.glob("chunk-*.arrow")))
    assert 3 <= done_chunks < 12, f"{done_chunks} of 12 chunks were done when the run was killed"
    assert not output_of(resumed).exists()

    cli_ok(str(resumed), "--progress=false", cwd=tmp_path)
    metrics = read_metrics(output_of(resumed))
    assert metrics["rows"] == 60 and metrics["reused_rows"] >= 5 * done_chunks
    assert metrics["generated_rows"] == 60 - metrics["reused_rows"]
    rows = read_rows(output_of(resumed))
    assert [r["id"] for r in rows] == list(range(60))
    assert_all_ok(rows, max_tokens=32)
    assert rows == read_rows(output_of(reference))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_tokens": 8, "temperature": 0}, id="chat"),
        pytest.param({"max_tokens": 8, "n": 2, "seed": 1, "logprobs": True, "top_logprobs": 2}, id="chat-n-logprobs"),
        pytest.param({"max_tokens": 8, "thinking": True}, id="chat-thinking"),
        pytest.param({"mode": "completion", "max_tokens": 8, "logprobs": True}, id="completion"),
    ],
)
def test_vllm_takes_our_bodies_and_answers_in_the_openai_types(vllm_url: str, kwargs: dict[str, Any]) -> None:
    transform = vllm_generate(vllm_url, model=MODEL_NAME, **kwargs)
    (body,) = transform.wire.bodies({"prompt": ["What is 2+2?"]})
    assert body is not None
    request = {"model": MODEL_NAME, **body}
    check_request(transform.wire.path, request)
    response = post(vllm_url, transform.wire.path, request)
    parsed = check_response(transform.wire.path, response)
    assert len(parsed.choices) == kwargs.get("n", 1)  # type: ignore[attr-defined]
    assert transform.wire.parse(response).error is None


def test_list_models(vllm_url: str, tmp_path: Path) -> None:
    proc = cli_ok("list-models", "-m", vllm_url, cwd=tmp_path)
    assert proc.stdout.splitlines() == [f"{MODEL_NAME}\tmax_model_len={MAX_MODEL_LEN}"]


def test_validate_check_server(vllm_url: str, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, vllm_url)
    proc = cli_ok("validate", str(recipe), "--check-server", cwd=tmp_path)
    assert f"ok: {vllm_url} serves {MODEL_NAME}" in proc.stdout
    wrong = cli("validate", str(recipe), "--check-server", "--model.model=nope", cwd=tmp_path)
    assert wrong.returncode == 1
    assert f"does not serve model 'nope'; it serves: {MODEL_NAME}" in wrong.stderr


# --------------------------------------------------------------------------- SmolLM2: real answers

SMOLLM_NAME = "smollm2"  # --served-model-name in recipes/quickstart.yaml


@pytest.fixture(scope="module")
def smollm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SmolLM2 server for this module's SmolLM2 tests, stopped after them."""
    require_real_vllm()
    root = tmp_path_factory.mktemp("smollm-server")
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(LOG_DIR_ENV, str(root / "logs"))
            mp.setenv("VLLM_CACHE_ROOT", str(root / "vllm-cache"))
            (url,) = stack.enter_context(serve_models(quickstart_serve()))
        group = server_group(url)
        yield url
    assert wait_group_gone(group) == []


class Country(BaseModel):
    # bounded strings and lists: a 135M model otherwise runs on until max_tokens cuts the JSON
    name: str = Field(max_length=30)
    capital: str = Field(max_length=30)
    continent: Literal["Europe", "Asia", "Africa", "Americas", "Oceania"]
    landlocked: bool
    # no number field: a small model writes digits until max_tokens (a schema cannot bound them)
    languages: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    note: str | None = Field(None, max_length=40)


def test_smollm2_answers_for_real(smollm_url: str) -> None:
    ds = Dataset.from_dict({"prompt": ["What is the capital of France?", "What is the capital of Italy?"]})
    out = ds.map(vllm_generate(smollm_url, temperature=0, max_tokens=32), batched=True)
    assert out["error"] == [None, None]
    assert "Paris" in out[0]["response"] and "Rome" in out[1]["response"], out["response"]


def test_structured_outputs_every_row_parses_into_its_schema(smollm_url: str) -> None:
    countries = ["France", "Japan", "Kenya", "Brazil", "Canada", "Egypt", "India", "Norway"]
    ds = Dataset.from_dict({"country": countries})
    generate = vllm_generate(
        smollm_url, template="Give facts about {country} as JSON.", output_schema=Country, temperature=0, max_tokens=200
    )
    out = ds.map(generate, batched=True, batch_size=4)
    assert out["error"] == [None] * len(countries), out["error"]
    assert set(out["finish_reason"]) == {"stop"}
    models = [Country.model_validate(p) for p in out["parsed"]]  # the README's one-liner
    assert all(len(m.languages) <= 3 for m in models)
    assert out.data.table.schema.field("parsed").type.field("continent").type == "string"
    assert out.data.table.schema.field("parsed").type.field("landlocked").type == "bool"
    assert models[0].capital == "Paris"
    # the raw answer is the JSON the parsed value came from
    assert [Country.model_validate_json(r) for r in out["response"]] == models


def test_the_structured_quickstart_recipe(smollm_url: str, tmp_path: Path) -> None:
    """recipes/quickstart_structured.yaml (its schema from recipes/schemas/topic.json), pointed at the shared server."""
    output = tmp_path / "structured.parquet"
    cli_ok(
        str(STRUCTURED),
        "--model.serve=null",
        f"--model.base_url={smollm_url}",
        f"--data.output.path={output}",
        "--progress=false",
        cwd=REPO,
    )
    table = pq.read_table(output)
    assert table.num_rows == 12
    assert table.column("error").to_pylist() == [None] * 12
    schema = json.loads((REPO / "recipes" / "schemas" / "topic.json").read_text())
    for row in table.column("parsed").to_pylist():
        assert set(row) == set(schema["properties"]) and row["category"] in schema["properties"]["category"]["enum"]
        assert len(row["related"]) <= 3 and row["name"]


def test_quickstart_recipe_serves_its_own_model(tmp_path: Path) -> None:
    """`python -m vllm_generator` on a copy of recipes/quickstart.yaml: the CLI starts a SmolLM2
    server through model.serve, generates real answers, and stops it."""
    require_real_vllm()
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["data"]["input"] = {"path": str(REPO / raw["data"]["input"]["path"]), "limit": 6}
    raw["data"]["output"]["path"] = str(tmp_path / "quickstart" / "answers.parquet")
    serve = raw["model"]["serve"]
    serve["model"], serve["command"] = absolute_paths([serve["model"]])[0], absolute_paths(serve["command"])
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {LOG_DIR_ENV: str(tmp_path / "logs"), "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    proc = cli_ok(str(recipe), "--progress=false", cwd=tmp_path, env=env, timeout=280)
    assert "done: 6 rows (6 ok, 0 failed)" in proc.stdout
    rows = read_rows(tmp_path / "quickstart" / "answers.parquet")
    assert [r["id"] for r in rows] == list(range(6))
    assert_all_ok(rows, max_tokens=raw["generation"]["max_tokens"])
    # a real model: most answers speak of their own topic ("the moon", "tea", ...)
    on_topic = [r["topic"].split()[-1].rstrip("s").lower() in (r["response"] or "").lower() for r in rows]
    assert sum(on_topic) >= 4, [(r["topic"], r["response"]) for r in rows]
    assert all(r["reasoning"] is None for r in rows)  # not a reasoning model
    stopped = re.findall(r"stopped vLLM server pid (\d+)", proc.stderr)
    assert len(stopped) == 1, proc.stderr[-3000:]
    assert wait_group_gone(int(stopped[0]), timeout=5) == []
    assert len(list((tmp_path / "logs").glob("vllm-*.log"))) == 1


def test_a_run_survives_its_vllm_server_restarting(tmp_path: Path) -> None:
    """The only server is stopped mid-run (vLLM answers 500s while its engine shuts down, then
    refuses connections) and started again on the same port, which takes it ~30 s to load: with
    default retry settings the run waits, resumes, and every row gets its answer."""
    require_real_vllm()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = tiny_serve().model_copy(update={"port": port})
    url = f"http://127.0.0.1:{port}"
    rows = 1500
    questions = [{"question": f"Count to {i}."} for i in range(rows)]
    recipe = write_recipe(
        tmp_path, url, data={"input": {"path": str(write_jsonl(tmp_path / "q.jsonl", questions))}},
        processing={"chunk_size": 250, "batch_size": 50, "max_concurrency": 32},
    )  # fmt: skip
    output = output_of(recipe)
    command = [sys.executable, "-m", "vllm_generator", "run", str(recipe), "--progress=false"]
    first = contextlib.ExitStack()
    first.enter_context(serve_models(serve))
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        work = Path(f"{output}.work")
        while not list(work.rglob("chunk-*.arrow")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        first.close()  # the server stops mid-run; the run goes on
        with serve_models(serve):
            _, stderr = proc.communicate(timeout=300)
    finally:
        first.close()
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr
    answered = read_rows(output)
    assert len(answered) == rows and all(r["error"] is None for r in answered), stderr
    assert any(" is down (" in line and "without spending attempts" in line for line in stderr.splitlines()), stderr
    assert any("answers again after" in line for line in stderr.splitlines()), stderr
    assert read_metrics(output)["failed"] == 0
