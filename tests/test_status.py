"""`vllm-generator status` on splits run here (no cluster): the status file each run keeps, read back."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, write_recipe
from fake_server import FakeServer

from vllm_generator import AuthenticationError, RecipeError, run_recipe


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the recipes' paths are relative, as users write them


def make_recipe(tmp_path: Path, url: str, texts: list[str], **sections: dict[str, Any]) -> Path:
    pq.write_table(pa.table({"id": list(range(len(texts))), "question": texts}), tmp_path / "in.parquet")
    return write_recipe(tmp_path, url, **sections)


def status(tmp_path: Path, *args: str) -> list[str]:
    result = cli("status", "recipe.yaml", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_status_says_which_splits_are_done_failed_or_not_started(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = [f"question {i}" for i in range(4)] + ["forbidden [[403]]"] * 4 + [f"later {i}" for i in range(4)]
    recipe = make_recipe(tmp_path, fake_server.url, texts, processing={"num_splits": 3})
    run_recipe(recipe, progress=False, processing={"split_id": 0})
    with pytest.raises(AuthenticationError):
        run_recipe(recipe, progress=False, processing={"split_id": 1})
    lines = status(tmp_path)
    assert lines[0] == "split 0: done: 4 rows (0 with an error) -> out/answers.split-00000-of-00003.parquet"
    assert lines[1] == (
        f"split 1: failed: AuthenticationError: {fake_server.url}/v1/chat/completions refused the API key "
        "(403: Forbidden (fake_server [[403]]).): pass api_key=..., set VLLM_API_KEY, or name the variable in a recipe's model.api_key_env"
    )
    assert lines[2:] == ["split 2: not started", "merge: not yet", "3 splits: 1 done, 1 failed, 1 not started"]


def test_a_rerun_that_fails_its_checks_is_a_failed_split(tmp_path: Path, fake_server: FakeServer) -> None:
    """Where the work folder exists (a rerun, a cluster task), an input error is recorded too."""
    recipe = make_recipe(tmp_path, fake_server.url, ["a", "b"])
    run_recipe(recipe, progress=False)
    with pytest.raises(RecipeError):
        run_recipe(recipe, progress=False, data={"prompt_column": None, "template": "{topic}"})
    assert status(tmp_path) == [
        "split 0: failed: RecipeError: data.template: column(s) 'topic' not in in.parquet (columns: id, question)",
        "1 splits: 1 failed",
    ]


@pytest.mark.parametrize(("signum", "state"), [(signal.SIGTERM, "stopped"), (signal.SIGKILL, "lost")])
def test_a_running_split_shows_its_rate_and_eta_then_how_it_ended(
    tmp_path: Path, start_fake_server: Callable[..., FakeServer], signum: int, state: str
) -> None:
    server = start_fake_server("--latency", "0.05", "--slots", "2")
    make_recipe(tmp_path, server.url, [f"question {i}" for i in range(400)], processing={"max_concurrency": 2})
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_generator", "recipe.yaml", "--progress=false"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (lines := status(tmp_path))[0].startswith("split 0: running: ") or "ETA" not in lines[0]:
            assert proc.poll() is None and time.monotonic() < deadline, lines
            time.sleep(0.2)
        running = re.fullmatch(r"split 0: running: (\d+) of 400 rows, ([\d.]+) rows/s, ETA 0:00:(\d\d) \(\S+:(\d+)\)", lines[0])
        assert running, lines
        assert 0 < int(running.group(1)) < 400 and 5 < float(running.group(2)) < 60 and int(running.group(4)) == proc.pid
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    ended = status(tmp_path)[0]
    if state == "stopped":
        assert re.fullmatch(
            r"split 0: stopped at \d+ of 400 rows \(interrupted\); finished chunks are kept and the next run resumes from them", ended
        )
    else:
        assert re.fullmatch(rf"split 0: lost: its run \(\S+:{proc.pid}\) is gone or silent since [\d:]+, when \d+ of 400 rows were done \(killed\?\); "
                            "the next run resumes from its finished chunks", ended)  # fmt: skip
    saved = json.loads((tmp_path / "out" / "answers.parquet.work" / "split-00000-of-00001" / "status.json").read_text())
    assert saved["state"] == ("stopped" if state == "stopped" else "running")  # a killed run cannot say so: its pid is gone


def test_status_asks_for_the_number_of_splits_when_runs_used_several(tmp_path: Path, fake_server: FakeServer) -> None:
    recipe = make_recipe(tmp_path, fake_server.url, [f"q {i}" for i in range(6)])
    run_recipe(recipe, progress=False, processing={"split_id": 0, "num_splits": 2})
    run_recipe(recipe, progress=False, processing={"split_id": 2, "num_splits": 3})
    result = cli("status", "recipe.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, "error: status: runs of recipe.yaml used 2, 3 splits: give --num-splits N\n")
    assert status(tmp_path, "--num-splits", "3") == [
        "split 0: not started",
        "split 1: not started",
        "split 2: done: 2 rows (0 with an error) -> out/answers.split-00002-of-00003.parquet",
        "merge: not yet",
        "3 splits: 2 not started, 1 done",
    ]
