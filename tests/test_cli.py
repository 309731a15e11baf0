"""The command line as users type it: real subprocesses against the fake server."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, write_recipe
from fake_server import FakeServer

from vllm_generator.recipe import load_recipe
from vllm_generator.run import run_recipe

CONSOLE_SCRIPT = Path(sys.executable).parent / "vllm-generator"


def write_input(path: Path, n: int, column: str = "question") -> list[str]:
    texts = [f"question {i}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(n)), column: texts}), path)
    return texts


def dead_url() -> str:
    """A URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def contents(log: list[dict[str, Any]]) -> list[str]:
    return [entry["body"]["messages"][-1]["content"] for entry in log]


# --------------------------------------------------------------------------- running


def test_python_m_runs_a_recipe(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = write_input(tmp_path / "in.parquet", 20)
    write_recipe(tmp_path, fake_server.url)
    result = cli("recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("done: 20 rows (20 ok, 0 failed) in ")
    assert lines[1:] == [
        "  sent 20 rows (0 retries), reused 0 from earlier runs",
        "  tokens: 40 prompt, 60 completion",
        "  output: out/answers.parquet",
        "  metrics: out/answers.metrics.json",
    ]
    rows = pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist()
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts]
    assert "Traceback" not in result.stderr


def test_console_script_run_with_overrides(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = write_input(tmp_path / "in.parquet", 10)
    write_recipe(tmp_path, fake_server.url)
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "run", "recipe.yaml", "--generation.temperature=0.3", "--generation.max_tokens", "2", "--progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "generate:" not in result.stderr  # --progress=false turns the bar off
    bodies = [entry["body"] for entry in fake_server.log()]
    assert len(bodies) == 10 and all(b["temperature"] == 0.3 and b["max_tokens"] == 2 for b in bodies)
    rows = pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist()
    assert [(r["response"], r["finish_reason"]) for r in rows] == [(f"echo: {t.split()[0]}", "length") for t in texts]


def test_generate_without_a_recipe(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = write_input(tmp_path / "in.parquet", 6, column="prompt")
    result = cli(
        "generate", "-i", "in.parquet", "-o", "out.parquet", "-m", fake_server.url, "--temperature", "0.2", "--max-tokens", "8",
        "--generation.seed=7",  # recipe-style overrides work here too
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bodies = sorted((entry["body"] for entry in fake_server.log()), key=lambda b: int(b["messages"][0]["content"].split()[1]))
    assert bodies == [
        {"model": "fake-model", "messages": [{"role": "user", "content": t}], "temperature": 0.2, "max_tokens": 8, "seed": 7} for t in texts
    ]
    assert pq.read_table(tmp_path / "out.parquet").column("response").to_pylist() == [f"echo: {t}" for t in texts]


# --------------------------------------------------------------------------- the founding document's command lines


def test_generate_runs_a_recipe_given_as_config(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = write_input(tmp_path / "in.parquet", 12)
    write_recipe(tmp_path, fake_server.url, generation={"temperature": 0.5})
    result = cli("generate", "--config", "recipe.yaml", "--progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: 12 rows (12 ok, 0 failed) in ")
    assert pq.read_table(tmp_path / "out" / "answers.parquet").column("response").to_pylist() == [f"echo: {t}" for t in texts]
    assert {entry["body"]["temperature"] for entry in fake_server.log()} == {0.5}


def test_generate_config_with_a_split_runs_that_split_only(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = write_input(tmp_path / "in.parquet", 20)
    write_recipe(tmp_path, fake_server.url)
    result = cli("generate", "-c", "recipe.yaml", "--split-id", "1", "--num-splits", "4", "--progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(contents(fake_server.log())) == sorted(texts[5:10])
    split = pq.read_table(tmp_path / "out" / "answers.split-00001-of-00004.parquet")
    assert split.column("question").to_pylist() == texts[5:10]
    assert not (tmp_path / "out" / "answers.parquet").exists()


def test_generate_flags_override_the_recipe(tmp_path: Path, start_fake_server: Any) -> None:
    """-i/-o/-m, a prompt source and generation flags replace the recipe's; -m also replaces its managed servers."""
    server = start_fake_server()
    pq.write_table(pa.table({"question": ["unused"] * 3, "text": ["a", "b", "c"]}), tmp_path / "other.parquet")
    write_recipe(
        tmp_path, "unused", data={"template": "Q: {question}", "prompt_column": None},
        model={"base_url": [], "serve": {"model": "m", "command": ["/nonexistent/vllm"]}}, generation={"temperature": 0.9, "seed": 3},
    )  # fmt: skip
    result = cli(
        "generate", "-c", "recipe.yaml", "-i", "other.parquet", "-o", "mine.parquet", "--model-url", server.url,
        "--prompt-column", "text", "--temperature", "0.1", "--progress=false", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bodies = sorted((entry["body"] for entry in server.log()), key=lambda b: b["messages"][0]["content"])
    assert bodies == [{"model": "fake-model", "messages": [{"role": "user", "content": t}], "temperature": 0.1, "seed": 3} for t in "abc"]
    assert pq.read_table(tmp_path / "mine.parquet").column("response").to_pylist() == ["echo: a", "echo: b", "echo: c"]
    assert not (tmp_path / "out").exists()


def test_generate_config_errors_name_the_recipe_s_fields(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 3)
    write_recipe(tmp_path, fake_server.url)
    result = cli("generate", "-c", "recipe.yaml", "-o", "out.csv", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, "error: recipe.yaml: data.output: output.path 'out.csv' must end with .parquet\n")
    assert fake_server.log() == []


def test_generate_without_config_needs_input_output_and_server(tmp_path: Path) -> None:
    result = cli("generate", "-i", "in.parquet", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "error: generate needs -o OUTPUT.parquet, -m URL, or a recipe as --config RECIPE (usage: vllm-generator generate -i INPUT "
        "-o OUTPUT.parquet -m URL [--model NAME] [--prompt-column C] [--temperature 0.7 ...])\n"
    )


@pytest.mark.parametrize("flag", ["--config", "-c"])
def test_validate_takes_the_recipe_as_config(tmp_path: Path, fake_server: FakeServer, flag: str) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url, name="config.yaml")
    result = cli("validate", flag, "config.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        "ok: config.yaml is a valid recipe",
        "ok: input has 5 rows, columns ['id', 'question']; split 0 of 1",
    ]


def test_run_and_merge_take_the_recipe_as_config(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 6)
    write_recipe(tmp_path, fake_server.url, processing={"num_splits": 2})
    for split_id in ("0", "1"):
        assert cli("run", "--config", "recipe.yaml", "--split-id", split_id, "--progress=false", cwd=tmp_path).returncode == 0
    merged = cli("merge", "-c", "recipe.yaml", cwd=tmp_path)
    assert (merged.returncode, merged.stdout) == (0, "merged 2 splits: 6 rows (0 with an error) -> out/answers.parquet\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "recipe.yaml", "--config", "recipe.yaml"],
         "validate: give the recipe once, as RECIPE or as --config RECIPE (usage: vllm-generator validate RECIPE [--check-server] [--section.key=value ...])"),
        (["validate"], "validate needs a recipe (usage: vllm-generator validate RECIPE [--check-server] [--section.key=value ...]; or --config RECIPE)"),
        (["list-models"], "list-models needs a server (usage: vllm-generator list-models -m URL [-m URL ...])"),
    ],
    ids=["twice", "none", "no-server"],
)  # fmt: skip
def test_a_recipe_or_server_missing_or_given_twice_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    write_recipe(tmp_path, "http://127.0.0.1:9")
    result = cli(*args, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n")


def test_list_models_takes_model_url(tmp_path: Path, fake_server: FakeServer) -> None:
    result = cli("list-models", "--model-url", fake_server.url, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "fake-model\tmax_model_len=512\n"), result.stderr


def test_generate_flag_errors_name_the_flag(tmp_path: Path) -> None:
    write_input(tmp_path / "in.parquet", 2, column="prompt")
    result = cli("generate", "-i", "in.parquet", "-o", "out.csv", "-m", dead_url(), "--temprature", "0.2", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: generate: -o/--output: output.path 'out.csv' must end with .parquet",
        "generate: --temprature: unknown field (check the spelling; see the README's recipe reference)",
    ]


def test_generate_text_flags_arrive_as_typed(tmp_path: Path, start_fake_server: Any) -> None:
    """Fire would read '[terse]' as a list, '123' and '1' as ints; repeated -m kept only the last server."""
    servers = [start_fake_server("--model", "123", "--latency", "0.05") for _ in range(2)]
    texts = write_input(tmp_path / "in.parquet", 8, column="1")
    result = cli(
        "generate", "-i", "in.parquet", "-o", "out.parquet", "-m", servers[0].url, "--base-url", servers[1].url,
        "--model", "123", "--prompt-column", "1", "--system_prompt=[terse]", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logs = [server.log() for server in servers]
    assert all(logs), "each -m server gets rows"
    bodies = sorted((entry["body"] for log in logs for entry in log), key=lambda b: int(b["messages"][1]["content"].split()[1]))
    assert bodies == [
        {"model": "123", "messages": [{"role": "system", "content": "[terse]"}, {"role": "user", "content": t}]} for t in texts
    ]


@pytest.mark.parametrize(
    "template", [["--template", "{question}"], ["--template={question}"], ["-t", "{question}"]], ids=["space", "equals", "short"]
)
def test_generate_template_is_text(tmp_path: Path, fake_server: FakeServer, template: list[str]) -> None:
    texts = write_input(tmp_path / "in.parquet", 3)
    result = cli("generate", "-i", "in.parquet", "-o", "out.parquet", "-m", fake_server.url, *template, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(contents(fake_server.log())) == texts


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-i", "123", "-o", "out.parquet"], "-i/--input: no file matches 123"),
        (["-i", "", "-o", "out.parquet"], "generate: -i/--input: set exactly one of path (file, glob or folder) or hub_id"),
        (["-i", "in.parquet", "-o", "1"], "generate: -o/--output: output.path '1' must end with .parquet"),
        (
            ["-i", "in.parquet", "-o", "out.parquet", "--template", "{topic}"],
            "--template: column(s) 'topic' not in in.parquet (columns: id, prompt)",
        ),
        (["-i", "in.parquet", "-o", "out.parquet", "--limit"], "--limit needs a number, e.g. --limit 2"),
        (["-i", "in.parquet", "-o", "out.parquet", "--model"], "--model needs a value, e.g. --model TEXT"),
    ],
    ids=["input-number", "input-empty", "output-number", "template-column", "limit-without-value", "model-without-value"],
)
def test_generate_errors_name_the_flag_typed(tmp_path: Path, fake_server: FakeServer, flags: list[str], message: str) -> None:
    write_input(tmp_path / "in.parquet", 2, column="prompt")
    result = cli("generate", "-m", fake_server.url, *flags, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, f"error: {message}\n")
    assert fake_server.log() == []


def test_api_key_never_reaches_a_file_or_the_terminal(tmp_path: Path, start_fake_server: Any) -> None:
    secret = f"sk-test-{uuid.uuid4().hex}"
    server = start_fake_server("--api-key", secret)
    write_input(tmp_path / "in.parquet", 12)
    write_recipe(tmp_path, server.url, logging={"level": "DEBUG", "file": "out/run.log"})
    result = cli("run", "recipe.yaml", cwd=tmp_path, env={"VLLM_API_KEY": secret})
    assert result.returncode == 0, result.stderr
    log = server.log()
    assert len(log) == 12 and all(entry["headers"]["has_auth"] for entry in log)  # the key was used
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"answers.parquet", "answers.metrics.json", "run.log"}
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr


def test_a_password_in_the_server_url_never_reaches_a_file_or_the_terminal(tmp_path: Path, start_fake_server: Any) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    server = start_fake_server()
    url = server.url.replace("http://", f"http://user:{secret}@")
    pq.write_table(
        pa.table({"question": ["fine", "retried [[500:1]]", "too long [[400]]", "moved [[redirect:307]]"]}), tmp_path / "in.parquet"
    )
    write_recipe(tmp_path, url, logging={"level": "DEBUG", "file": "out/run.log"})
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(server.log()) == 5  # it worked: the 500 was retried once
    rows = pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist()
    shown = server.url.replace("http://", "http://user:***@")
    assert rows[2]["error"].startswith(f"400 from {shown}/v1/chat/completions: ")
    assert rows[3]["error"].startswith(f"307 from {shown}/v1/chat/completions: redirected to ")
    assert f"retrying in 0.0s [2/2]: 500 from {shown}/v1/chat/completions" in result.stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".arrow" for p in written) and any(p.name == "run.log" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr

    # with an API key as well: one clear error before anything is sent
    server.reset()
    both = cli("run", "recipe.yaml", cwd=tmp_path, env={"VLLM_API_KEY": "sk-x"})
    assert (both.returncode, both.stderr.splitlines()[-1]) == (
        1,
        f"error: model.base_url {shown} carries a user and password, and an API key is set too: both would be the "
        "Authorization header; drop the password from the URL or unset the key (VLLM_API_KEY, OPENAI_API_KEY or model.api_key_env)",
    )
    assert secret not in both.stderr and server.log() == []


def run_through_an_outage(tmp_path: Path, server: FakeServer, down: float) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """``vllm-generator run`` with default retry settings, while its only server goes away for
    ``down`` seconds in the middle of the run (killed with requests in flight, then refusing)."""
    texts = write_input(tmp_path / "in.parquet", 400)
    path = write_recipe(tmp_path, server.url, processing={"chunk_size": 100, "batch_size": 50, "max_concurrency": 8})
    raw = load_recipe(path).model_dump(mode="json", exclude_defaults=True)
    raw.pop("retry", None)  # the defaults: 5 attempts, a 600 s outage limit
    path.write_text(json.dumps(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_generator", "run", "recipe.yaml", "--progress=false"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def mid_run() -> None:
            deadline = time.monotonic() + 60
            while server.stats()["requests"] < 150 and time.monotonic() < deadline:
                time.sleep(0.01)

        server.restart(down=down, before_kill=mid_run)
        stdout, stderr = proc.communicate(timeout=down + 120)
    finally:
        proc.kill()
        proc.wait()
    rows = pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist() if proc.returncode == 0 else []
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts], stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), rows


@pytest.mark.parametrize("down", [pytest.param(5.0, id="5s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)])
def test_an_outage_of_the_only_server_with_default_settings_loses_nothing(tmp_path: Path, start_fake_server: Any, down: float) -> None:
    server = start_fake_server("--latency", "0.05", "--slots", "8")
    result, rows = run_through_an_outage(tmp_path, server, down)
    assert result.returncode == 0, result.stderr
    assert all(r["error"] is None for r in rows)
    # the restarted server got only rows the first one had not answered, each once
    after = [e["body"]["messages"][-1]["content"] for e in server.log()]
    assert after and len(after) == len(set(after)) < 400
    # a handful of lines: the first refusal, down, back (and a retry for a row cut mid-answer)
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) <= 12, warnings
    assert any(" is down (" in w and "without spending attempts" in w for w in warnings), warnings
    assert any("answers again after" in w for w in warnings), warnings
    metrics = json.loads((tmp_path / "out" / "answers.metrics.json").read_text())
    assert metrics["failed"] == 0 and metrics["retries"] <= 8


def interrupt_when(proc: subprocess.Popen[str], ready: Callable[[], bool], signum: int) -> None:
    """Send ``signum`` once ``ready()`` holds, and check the run stopped as interrupted (exit 130)."""
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert stderr.splitlines()[-1] == "interrupted: finished chunks are saved; run the same command again to resume"
    assert "Traceback" not in stderr


def _ignore_sigint() -> None:
    """What `cmd &` in a script does to the job: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("signum", "preexec_fn"),
    [(signal.SIGINT, None), (signal.SIGTERM, None), (signal.SIGTERM, _ignore_sigint)],
    ids=["ctrl-c", "sigterm", "sigterm-sigint-ignored"],
)
def test_ctrl_c_keeps_finished_chunks(tmp_path: Path, start_fake_server: Any, signum: int, preexec_fn: Any) -> None:
    """SIGTERM (scancel, kill) unwinds like Ctrl-C, also in a background job that ignores SIGINT."""
    server = start_fake_server("--latency", "0.05", "--slots", "4")
    write_input(tmp_path / "in.parquet", 200)
    write_recipe(tmp_path, server.url, processing={"chunk_size": 20, "batch_size": 10, "max_concurrency": 4})
    work = tmp_path / "out" / "answers.parquet.work" / "split-00000-of-00001"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_generator", "recipe.yaml", "--progress=false"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
    )  # fmt: skip
    interrupt_when(proc, lambda: bool(list(work.glob("chunk-*.arrow"))), signum)
    assert list(work.glob("chunk-*.arrow")) and not (tmp_path / "out" / "answers.parquet").exists()


def test_sigterm_stops_a_background_job_while_its_server_starts(tmp_path: Path) -> None:
    """Outside the map nothing else catches SIGINT: with SIGINT ignored SIGTERM used to do nothing."""
    write_input(tmp_path / "in.parquet", 5)
    never_ready = [sys.executable, "-c", "import os, time; open('server.pid', 'w').write(str(os.getpid())); time.sleep(120)"]
    write_recipe(
        tmp_path, "unused", model={"base_url": [], "serve": {"model": "m", "command": never_ready, "port": 0, "startup_timeout": 120}}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_generator", "recipe.yaml", "--progress=false"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint,
        env={**os.environ, "VLLM_GENERATOR_SERVER_LOG_DIR": str(tmp_path / "logs")},
    )  # fmt: skip
    pid_file = tmp_path / "server.pid"
    interrupt_when(proc, lambda: pid_file.exists() and bool(pid_file.read_text()), signal.SIGTERM)
    with pytest.raises(ProcessLookupError):  # the managed server was stopped too
        os.kill(int((tmp_path / "server.pid").read_text()), 0)


# --------------------------------------------------------------------------- errors: one line, or a traceback with --debug


def test_missing_column_is_one_line_and_sends_nothing(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url, data={"prompt_column": None, "template": "Q: {question} ({topic})"})
    result = cli("recipe.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "error: data.template: column(s) 'topic' not in in.parquet (columns: id, question)\n"
    assert result.stdout == ""

    debug = cli("recipe.yaml", "--debug", cwd=tmp_path)
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.splitlines()[-1] == (
        "vllm_generator.errors.RecipeError: data.template: column(s) 'topic' not in in.parquet (columns: id, question)"
    )
    assert fake_server.log() == []
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = cli("run", "nope.yaml", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "error: cannot read recipe nope.yaml: No such file or directory\n")


def test_mistyped_command_sends_nothing(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url)
    result = cli("rnu", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "rnu" in result.stderr and "run" in result.stderr  # Fire names the bad word and the commands
    assert fake_server.log() == []
    assert not (tmp_path / "out").exists()


def test_bad_flag_value_is_refused(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url)
    result = cli("run", "recipe.yaml", "--progress=maybe", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, "error: --progress takes true or false, not 'maybe'\n")
    assert fake_server.log() == []


RUN_USAGE = "vllm-generator run RECIPE [--split-id I] [--num-splits N] [--progress=false] [--section.key=value ...]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recipe.yaml", "--temperature=0.9"],
         f"unknown option --temperature for run: generation settings go as --generation.temperature=0.9 (usage: {RUN_USAGE})"),
        (["recipe.yaml", "--split-id", "0", "--num-split", "4"], f"unknown option --num-split for run: did you mean --num-splits? (usage: {RUN_USAGE})"),
        (["run", "recipe.yaml", "extra"], f"unexpected argument 'extra' for run (usage: {RUN_USAGE})"),
        (["run", "recipe.yaml", "--split-id", "--num-splits", "2"], "--split-id needs a number, e.g. --split-id 2"),
        (["validate", "recipe.yaml", "--check-servr"],
         "unknown option --check-servr for validate: did you mean --check-server? "
         "(usage: vllm-generator validate RECIPE [--check-server] [--section.key=value ...])"),
        (["merge", "recipe.yaml", "out/answers.parquet"],
         "unexpected argument 'out/answers.parquet' for merge "
         "(usage: vllm-generator merge RECIPE|OUTPUT.parquet [--hub-repo-id ORG/NAME] [--hub-split SPLIT] [--private=false])"),
        (["merge", "out/answers.parquet", "--generation.n=2"],
         "merge out/answers.parquet: --generation.n overrides a recipe key, but out/answers.parquet is not a recipe; pass the recipe instead"),
        (["list-models", "-m", "URL", "extra"], "unexpected argument 'extra' for list-models (usage: vllm-generator list-models -m URL [-m URL ...])"),
        (["generate", "-i", "in.parquet", "-o", "out/answers.parquet", "-m", "URL", "--prompt-column", "question", "extra"],
         "unexpected argument 'extra' for generate (usage: vllm-generator generate -i INPUT -o OUTPUT.parquet -m URL "
         "[--model NAME] [--prompt-column C] [--temperature 0.7 ...])"),
    ],
    ids=["run-generation-flag", "run-typo", "run-extra-word", "run-flag-without-value", "validate-typo", "merge-extra-word",
         "merge-override-without-recipe", "list-models-extra-word", "generate-extra-word"],
)  # fmt: skip
def test_unknown_option_is_refused_before_anything_runs(tmp_path: Path, fake_server: FakeServer, args: list[str], message: str) -> None:
    """Fire complained about unused arguments only after the method ran: after the whole run."""
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url)
    result = cli(*[fake_server.url if a == "URL" else a for a in args], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n")
    assert fake_server.log() == []
    assert not (tmp_path / "out").exists()


def test_override_that_is_not_yaml_names_the_flag(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url)
    result = cli("recipe.yaml", "--generation.stop=[a", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "error: --generation.stop: cannot parse '[a' (expected ',' or ']', but got '<stream end>'): "
        """values parse as YAML; quote it to pass text, e.g. --generation.stop="'[a'"\n"""
    )
    assert fake_server.log() == []


def test_log_file_gets_the_summary_and_the_error(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url, logging={"file": "run.log"})
    ok = cli("recipe.yaml", "--progress=false", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = "; ".join(line.strip() for line in ok.stdout.splitlines())
    assert summary.startswith("done: 5 rows (5 ok, 0 failed) in ") and summary.endswith("; metrics: out/answers.metrics.json")
    assert "done:" not in ok.stderr  # the console handler does not repeat it
    assert (tmp_path / "run.log").read_text().splitlines()[-1].endswith(f" INFO vllm_generator {summary}")

    failed = cli("recipe.yaml", "--data.template='Q: {topic}'", "--data.prompt_column=null", cwd=tmp_path)
    message = "error: data.template: column(s) 'topic' not in in.parquet (columns: id, question)"
    assert (failed.returncode, failed.stderr) == (1, message + "\n")  # once, not also from the console handler
    assert (tmp_path / "run.log").read_text().splitlines()[-1].endswith(f" ERROR vllm_generator {message}")


# --------------------------------------------------------------------------- validate and list-models


def test_validate_checks_recipe_input_and_server(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url)
    result = cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok: recipe.yaml is a valid recipe",
        "ok: input has 5 rows, columns ['id', 'question']; split 0 of 1",
        'ok: first request: {"messages": [{"role": "user", "content": "question 0"}]}',
    ]

    live = cli("validate", "recipe.yaml", "--check-server", cwd=tmp_path)
    assert live.returncode == 0, live.stderr
    assert live.stdout.splitlines()[-1] == f"ok: {fake_server.url} serves fake-model"
    assert fake_server.log() == []  # it asked /v1/models, and sent no generation request

    url = dead_url()
    dead = cli("validate", "recipe.yaml", "--check-server", f"--model.base_url={url}", cwd=tmp_path)
    assert dead.returncode == 1
    assert len(dead.stderr.splitlines()) == 1
    assert dead.stderr.startswith(f"error: cannot list models at {url}/v1/models (ClientConnectorError: ")
    assert dead.stderr.endswith(f"is the vLLM server running? try `vllm-generator list-models -m {url}`\n")


def test_validate_reports_a_bad_recipe(tmp_path: Path) -> None:
    write_recipe(tmp_path, "http://localhost:8000", generation={"temprature": 0.2})
    result = cli("validate", "recipe.yaml", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "error: recipe.yaml: generation.temprature: unknown field (check the spelling; see the README's recipe reference)\n"
    )


def test_validate_names_a_missing_input_column(tmp_path: Path) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, dead_url(), data={"prompt_column": None, "template": "Q: {question} ({topic})"})
    result = cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "error: data.template: column(s) 'topic' not in in.parquet (columns: id, question)\n"


def test_validate_warns_about_null_prompts_and_sends_nothing(tmp_path: Path, fake_server: FakeServer) -> None:
    pq.write_table(pa.table({"id": [0, 1, 2], "question": [None, "fine", None]}), tmp_path / "in.parquet")
    write_recipe(tmp_path, fake_server.url)
    result = cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "ok: input has 3 rows, columns ['id', 'question']; split 0 of 1",
        "warning: 2 rows have a null prompt (rows 0, 2 of in.parquet): they will get an error and not be sent",
        'ok: first request: {"messages": [{"role": "user", "content": "fine"}]}',
    ]
    assert fake_server.log() == []


def test_validate_refuses_what_run_would_refuse(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "in.parquet", 5)
    write_recipe(tmp_path, fake_server.url)
    too_many = cli("validate", "recipe.yaml", "--processing.num_splits=6", cwd=tmp_path)
    assert (too_many.returncode, too_many.stderr) == (
        1,
        "error: processing.num_splits 6 is more than the 5 rows of in.parquet: use at most 5 splits\n",
    )
    onto_input = cli("validate", "recipe.yaml", "--data.output.path=in.parquet", cwd=tmp_path)
    assert onto_input.returncode == 1 and "which data.input.path in.parquet reads" in onto_input.stderr
    assert fake_server.log() == []


def test_log_file_rotates_and_keeps_backup_count_files(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"question": [f"question {i} [[500:1]]" for i in range(40)]}), path)
    write_recipe(tmp_path, fake_server.url, logging={"file": "logs/run.log", "max_bytes": 1000, "backup_count": 2})
    result = cli("run", "recipe.yaml", "--progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["run.log", "run.log.1", "run.log.2"]  # 40 retry warnings overflow 1,000 bytes many times
    assert all((tmp_path / "logs" / name).stat().st_size <= 1000 for name in logs)
    assert "done: 40 rows (40 ok, 0 failed)" in (tmp_path / "logs" / "run.log").read_text()


def test_list_models(tmp_path: Path, start_fake_server: Any) -> None:
    server = start_fake_server("--model", "org/model-a", "--model", "model-b")
    result = cli("list-models", "-m", f"{server.url}/v1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "org/model-a\tmax_model_len=512\nmodel-b\tmax_model_len=512\n"

    other = start_fake_server("--model", "model-c")
    both = cli("list-models", "-m", server.url, "-m", other.url, cwd=tmp_path)
    assert both.returncode == 0, both.stderr
    assert (
        both.stdout
        == f"{server.url}:\norg/model-a\tmax_model_len=512\nmodel-b\tmax_model_len=512\n{other.url}:\nmodel-c\tmax_model_len=512\n"
    )


def test_list_models_without_a_scheme_is_one_line(tmp_path: Path) -> None:
    result = cli("list-models", "-m", "localhost:8000", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "error: list-models: -m/--base-url: server URL 'localhost:8000' must start with http:// or https://, e.g. http://localhost:8000\n"
    )


# --------------------------------------------------------------------------- merge


@pytest.fixture
def three_splits(tmp_path: Path, fake_server: FakeServer) -> tuple[Path, list[str]]:
    """100 rows cut in 3 splits, all run; returns (recipe, the input's questions)."""
    texts = write_input(tmp_path / "in.parquet", 100)
    recipe = write_recipe(
        tmp_path, fake_server.url, data={"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out" / "answers.parquet")}},
        processing={"num_splits": 3, "chunk_size": 20, "batch_size": 10},
    )  # fmt: skip
    for split_id in range(3):
        run_recipe(load_recipe(recipe, {"processing.split_id": split_id}), progress=False)
    return recipe, texts


def test_merge_joins_splits_in_input_order(tmp_path: Path, three_splits: tuple[Path, list[str]]) -> None:
    recipe, texts = three_splits
    out = tmp_path / "out" / "answers.parquet"
    result = cli("merge", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"merged 3 splits: 100 rows (0 with an error) -> {out}\n"
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == list(range(100))
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts]
    metrics = json.loads((tmp_path / "out" / "answers.metrics.json").read_text())
    assert (metrics["rows"], metrics["splits"], metrics["total_generated_rows"]) == (100, 3, 100)


def test_merge_refuses_a_missing_split(tmp_path: Path, three_splits: tuple[Path, list[str]]) -> None:
    out = tmp_path / "out" / "answers.parquet"
    (tmp_path / "out" / "answers.split-00001-of-00003.parquet").unlink()
    result = cli("merge", str(out), cwd=tmp_path)  # the output path works as well as the recipe
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot merge {out}: split(s) 1 of 3 have no output yet; "
        "run them with --split-id I --num-splits 3 (finished splits are kept)\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("odd", [2, 0])
def test_merge_refuses_a_split_of_another_input_size(tmp_path: Path, three_splits: tuple[Path, list[str]], odd: int) -> None:
    recipe, _ = three_splits
    out = tmp_path / "out" / "answers.parquet"
    run_recipe(load_recipe(recipe, {"processing.split_id": odd, "data.input.limit": 90}), progress=False)
    assert pq.read_metadata(tmp_path / "out" / f"answers.split-0000{odd}-of-00003.parquet").num_rows == 30
    result = cli("merge", str(recipe), cwd=tmp_path)
    assert result.returncode == 1
    sizes = ", ".join(f"split {i}: {90 if i == odd else 100}" for i in range(3))
    assert result.stderr == (
        f"error: cannot merge {out}: the splits were cut from inputs of different sizes ({sizes} rows); "
        "rerun the odd ones with the same data.input\n"
    )
    assert not out.exists()


def test_the_command_collects_less_often_during_a_run_and_puts_the_collector_back() -> None:
    from vllm_generator.__main__ import _tune_gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with _tune_gc():
            assert gc.get_threshold() == (10_000, 10, 10)
            assert gc.get_freeze_count() > 0  # the imports' objects are out of the collector's way
        assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
        gc.set_threshold(0, 10, 10)  # the user turned collection off: it stays off
        with _tune_gc():
            assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
