"""Running recipes against the fake server: output, metrics, resume, retry_failed, splits, Hub, atomicity."""

from __future__ import annotations

import collections
import gc
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import resize_tmpfs, tmpfs, write_recipe
from datasets import Dataset
from fake_server import FakeServer
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub import HfApi as RealHfApi

import vllm_generator
from vllm_generator import MergeError, RecipeError, ServerUnavailableError, StorageError, vllm_generate
from vllm_generator.merge import merge_outputs
from vllm_generator.recipe import load_recipe
from vllm_generator.run import RunSummary, run_recipe
from vllm_generator.storage import push_to_hub
from vllm_generator.wire import WireFormat

OUTPUT_COLUMNS = ["response", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


# --------------------------------------------------------------------------- helpers


def questions(n: int, special: dict[int, str] | None = None) -> list[str]:
    """Row i asks "question i", plus a fake-server directive for the rows in ``special``."""
    return [f"question {i}" + (f" {special[i]}" if special and i in special else "") for i in range(n)]


def write_input(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(texts))), "question": texts}), path)
    return path


def make_recipe(tmp_path: Path, url: str, input_path: Path, name: str = "recipe.yaml", **sections: dict[str, Any]) -> Path:
    return write_recipe(tmp_path, url, input_path, tmp_path / "out" / "answers.parquet", name, **sections)


def run(recipe: Path, **overrides: Any) -> RunSummary:
    return run_recipe(load_recipe(recipe, {k.replace("__", "."): v for k, v in overrides.items()}), progress=False)


def sent_prompts(log: list[dict[str, Any]]) -> list[str]:
    return [entry["body"]["messages"][-1]["content"] for entry in log]


def chunk_files(output: Path, split: str = "split-00000-of-00001") -> list[Path]:
    return sorted((output.parent / f"{output.name}.work" / split).glob("chunk-*.arrow"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


# --------------------------------------------------------------------------- a full run


def test_full_run_writes_aligned_output_and_metrics(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(40, {7: "[[400]]", 12: "[[503:1]]"})
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts))
    summary = run(recipe)

    out = tmp_path / "out" / "answers.parquet"
    table = pq.read_table(out)
    assert table.column_names == ["id", "question", *OUTPUT_COLUMNS]
    for i, row in enumerate(table.to_pylist()):
        assert row["id"] == i and row["question"] == texts[i]
        if i == 7:
            assert row["response"] is None and row["prompt_tokens"] == 0
            assert row["error"] == (
                f"400 from {fake_server.url}/v1/chat/completions: This model's maximum context length is 512 tokens. "
                "However, you requested 900 tokens."
            )
        else:
            assert row["error"] is None and row["response"] == f"echo: {texts[i]}" and row["finish_reason"] == "stop"
            assert row["prompt_tokens"] == len(texts[i].split()) and row["completion_tokens"] == len(row["response"].split())
            assert row["reasoning"] is None

    # every row was sent once, the 503 row twice; nothing else
    counts = collections.Counter(sent_prompts(fake_server.log()))
    assert counts == {t: 2 if i == 12 else 1 for i, t in enumerate(texts)}

    metrics_path = tmp_path / "out" / "answers.metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert metrics == summary.to_dict()
    tokens = table.column("completion_tokens").to_pylist()
    assert {k: metrics[k] for k in ("rows", "succeeded", "failed", "failed_by_type", "retries", "requests", "generated_rows", "reused_rows")} == {
        "rows": 40, "succeeded": 39, "failed": 1, "failed_by_type": {"http_400": 1},
        "retries": 0, "requests": 41, "generated_rows": 40, "reused_rows": 0,
    }  # fmt: skip
    # the 503 is backpressure with the default adaptive target: sent again, not a retry
    (server,) = metrics["servers"]
    assert server["url"] == fake_server.url and server["max_concurrency"] == "adaptive" and server["refusals"] == 1
    assert server["target"] >= 1 and {"queue", "peak_queue", "settled_target", "max_target", "reports"} <= set(server)
    assert metrics["completion_tokens"] == sum(tokens)
    assert metrics["prompt_tokens"] == sum(len(t.split()) for i, t in enumerate(texts) if i != 7)
    assert metrics["wall_time_s"] > 0 and metrics["requests_per_s"] > 0 and metrics["tokens_per_s"] > 0
    assert set(metrics["latency_s"]) == {"p50", "p90", "p99", "max"}
    assert 0 <= metrics["latency_s"]["p50"] <= metrics["latency_s"]["p99"] <= metrics["latency_s"]["max"]
    assert metrics["recipe_hash"] == load_recipe(recipe).hash()
    assert metrics["version"] == vllm_generator.__version__
    assert metrics["output_path"] == str(out) and metrics["metrics_path"] == str(metrics_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "data.prompt_column: column(s) 'prompt' not in {input} (columns: id, question)"),
        ({"prompt_column": "text"}, "data.prompt_column: column(s) 'text' not in {input} (columns: id, question)"),
        ({"template": "Q: {question} about {topic}"}, "data.template: column(s) 'topic' not in {input} (columns: id, question)"),
        ({"messages_column": "messages"}, "data.messages_column: column(s) 'messages' not in {input} (columns: id, question)"),
    ],
    ids=["default-prompt", "prompt-column", "template", "messages-column"],
)
def test_missing_column_fails_before_any_request(tmp_path: Path, fake_server: FakeServer, data: dict[str, str], message: str) -> None:
    input_path = write_input(tmp_path / "in.parquet", questions(5))
    recipe = make_recipe(tmp_path, fake_server.url, input_path, data={"prompt_column": None, **data})
    with pytest.raises(RecipeError) as info:
        run(recipe)
    assert str(info.value) == message.format(input=input_path)
    assert fake_server.log() == []
    assert not (tmp_path / "out").exists()  # not even the work folder


def test_run_recipe_is_public_and_takes_a_path_and_overrides(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(12)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts), generation={"temperature": 0.9})
    assert "run_recipe" in vllm_generator.__all__ and "RunSummary" in vllm_generator.__all__
    summary = vllm_generator.run_recipe(
        str(recipe), progress=False, generation={"temperature": 0.1, "stop": ["x"]}, processing={"split_id": 1, "num_splits": 3}
    )
    assert isinstance(summary, vllm_generator.RunSummary)
    assert (summary.rows, summary.succeeded, summary.split_id, summary.num_splits) == (4, 4, 1, 3)
    assert summary.output_path == str(tmp_path / "out" / "answers.split-00001-of-00003.parquet")
    bodies = [entry["body"] for entry in fake_server.log()]
    assert sorted(sent_prompts(fake_server.log())) == texts[4:8]
    assert all((b["temperature"], b["stop"]) == (0.1, ["x"]) for b in bodies)


def test_run_recipe_takes_a_recipe_and_dotted_keys(tmp_path: Path, fake_server: FakeServer) -> None:
    recipe = load_recipe(make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(6))))
    summary = vllm_generator.run_recipe(
        recipe, progress=False, **{"generation.max_tokens": 1, "data.output.path": str(tmp_path / "b.parquet")}
    )
    assert summary.output_path == str(tmp_path / "b.parquet")
    assert {entry["body"]["max_tokens"] for entry in fake_server.log()} == {1}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.2}, "run_recipe: temperature=0.2 is not an override: give a section as a dict (data, model, generation, "
         'processing, retry, logging), e.g. generation={"temperature": 0.2}, or a dotted key, e.g. **{"generation.temperature": 0.2}'),
        ({"generation": {"temprature": 0.2}}, "run_recipe: generation.temprature: unknown field (check the spelling; see the README's recipe reference)"),
    ],
    ids=["not-a-section", "unknown-field"],
)  # fmt: skip
def test_run_recipe_refuses_a_bad_override_before_any_request(
    tmp_path: Path, fake_server: FakeServer, overrides: dict[str, Any], message: str
) -> None:
    recipe = load_recipe(make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(3))))
    with pytest.raises(RecipeError) as info:
        vllm_generator.run_recipe(recipe, progress=False, **overrides)
    assert str(info.value) == message
    assert fake_server.log() == []


# --------------------------------------------------------------------------- input formats


def _parquet(folder: Path, rows: dict[str, list[Any]]) -> str:
    pq.write_table(pa.table(rows), folder / "in.parquet")
    return str(folder / "in.parquet")


def _jsonl(folder: Path, rows: dict[str, list[Any]]) -> str:
    lines = [json.dumps(dict(zip(rows, values, strict=True))) for values in zip(*rows.values(), strict=True)]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "in.jsonl")


def _csv(folder: Path, rows: dict[str, list[Any]]) -> str:
    datasets.Dataset.from_dict(rows).to_csv(str(folder / "in.csv"))
    return str(folder / "in.csv")


def _glob(folder: Path, rows: dict[str, list[Any]]) -> str:
    n = len(rows["id"])
    for part, start in enumerate(range(0, n, 7)):
        pq.write_table(pa.table({k: v[start : start + 7] for k, v in rows.items()}), folder / f"part-{part:03d}.parquet")
    return str(folder / "part-*.parquet")


def _save_to_disk(folder: Path, rows: dict[str, list[Any]]) -> str:
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder / "saved"))
    return str(folder / "saved")


def _save_to_disk_dict(folder: Path, rows: dict[str, list[Any]]) -> str:
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder / "saved_dict"))
    return str(folder / "saved_dict")


@pytest.mark.parametrize(
    ("write", "split"),
    [(_parquet, "train"), (_jsonl, "train"), (_csv, "train"), (_glob, "train"), (_save_to_disk, "train"), (_save_to_disk_dict, "test")],
    ids=["parquet", "jsonl", "csv", "glob", "save_to_disk", "save_to_disk-dict"],
)
def test_input_formats(tmp_path: Path, fake_server: FakeServer, write: Callable[[Path, dict[str, list[Any]]], str], split: str) -> None:
    texts = questions(20)
    (tmp_path / "data").mkdir()
    path = write(tmp_path / "data", {"id": list(range(20)), "question": texts})
    recipe = make_recipe(tmp_path, fake_server.url, Path(path), data={"input": {"path": path, "split": split, "limit": 17}})
    assert run(recipe).rows == 17
    rows = pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist()
    assert [r["id"] for r in rows] == list(range(17))  # input order kept, limit applied
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts[:17]]
    assert len(fake_server.log()) == 17


def test_input_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"question": ["q"]})}).save_to_disk(str(tmp_path / "dd"))
    cases = {
        str(tmp_path / "missing-*.parquet"): "data.input.path: no file matches {path}",
        str(tmp_path / "missing.parquet"): "data.input.path: no file matches {path}",
        str(tmp_path / "plain_folder"): "data.input.path: {path} is a folder but not a save_to_disk dataset (no state.json)",
        str(tmp_path / "notes.txt"): "data.input.path: {path} must name .parquet, .jsonl/.json or .csv files (found {path})",
        str(tmp_path / "dd"): "data.input.path: {path} has splits ['test'], not 'train' (set data.input.split)",
    }
    for path, message in cases.items():
        recipe = make_recipe(tmp_path, "http://127.0.0.1:9", Path(path))
        with pytest.raises(RecipeError) as info:
            run(recipe)
        assert str(info.value) == message.format(path=path)


def test_unreadable_and_empty_inputs_say_why(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"question": "fine"}\n{"question": \n')
    (tmp_path / "empty.jsonl").write_text("")
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    messages = {}
    for name in ("broken.jsonl", "empty.jsonl", "empty.parquet"):
        with pytest.raises(RecipeError) as info:
            run(make_recipe(tmp_path, "http://127.0.0.1:9", tmp_path / name))
        messages[name] = str(info.value)
    assert messages["broken.jsonl"].startswith(f"data.input.path: cannot read {tmp_path / 'broken.jsonl'}: ")
    assert "An error occurred while generating the dataset" not in messages["broken.jsonl"]  # the parser's own words
    assert messages["empty.jsonl"] in (
        f"data.input: {tmp_path / 'empty.jsonl'} has no rows",
        f"data.input.path: cannot read {tmp_path / 'empty.jsonl'}: " + messages["empty.jsonl"].split(": ", 2)[-1],
    )
    assert messages["empty.parquet"] == f"data.input: {tmp_path / 'empty.parquet'} has no rows"


@pytest.mark.parametrize(
    ("column", "data", "message"),
    [
        (
            pa.array([1, 2, 3]),
            {},
            "data.prompt_column: column 'question' of {input} holds int64, not text (use a template such as '{{question}}' to format other types)",
        ),
        (
            pa.array([[{"role": "user", "content": "hi"}]] * 3),
            {},
            "data.prompt_column: column 'question' of {input} holds list<item: struct<role: string, content: string>>, not text (use messages_column for chat messages)",
        ),
        (
            pa.array(["a", "b", "c"]),
            {"prompt_column": None, "messages_column": "question"},
            "data.messages_column: column 'question' of {input} holds string, not lists of {{role, content}} messages (use prompt_column for text)",
        ),
    ],
    ids=["int-as-text", "messages-as-text", "text-as-messages"],
)
def test_a_prompt_column_of_the_wrong_type_fails_before_any_request(
    tmp_path: Path, fake_server: FakeServer, column: pa.Array, data: dict[str, Any], message: str
) -> None:
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "question": column}), input_path)
    with pytest.raises(RecipeError) as info:
        run(make_recipe(tmp_path, fake_server.url, input_path, data=data))
    assert str(info.value) == message.format(input=input_path)
    assert fake_server.log() == []


def test_null_prompts_are_reported_up_front_and_get_an_error_without_a_request(
    tmp_path: Path, fake_server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    texts: list[str | None] = list(questions(30))
    for i in (7, 21):
        texts[i] = None
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(30)), "question": pa.array(texts, pa.string())}), input_path)
    recipe = make_recipe(tmp_path, fake_server.url, input_path, processing={"num_splits": 2, "split_id": 1})
    with caplog.at_level("WARNING", logger="vllm_generator"):
        summary = run(recipe)

    assert f"2 rows have a null prompt (rows 21 of {input_path}): they get an error and are not sent" not in caplog.text
    assert f"1 rows have a null prompt (rows 21 of {input_path}): they get an error and are not sent" in caplog.text
    assert (summary.rows, summary.failed, summary.generated_rows, summary.failed_by_type) == (15, 1, 14, {"no_prompt": 1})
    rows = pq.read_table(tmp_path / "out" / "answers.split-00001-of-00002.parquet").to_pylist()
    assert rows[21 - 15]["error"] == "not sent: this row's prompt column 'question' is null (fill or filter such rows)"
    assert sorted(sent_prompts(fake_server.log())) == sorted(t for t in texts[15:] if t is not None)
    # retry_failed cannot give such a row a prompt: it is left alone
    again = run(recipe, retry__retry_failed=True)
    assert (again.generated_rows, again.failed, again.reused_rows) == (0, 1, 15) and len(fake_server.log()) == 14


def test_output_that_is_also_the_input_is_refused(tmp_path: Path, fake_server: FakeServer) -> None:
    input_path = write_input(tmp_path / "data" / "in.parquet", questions(5))
    recipe = write_recipe(tmp_path, fake_server.url, input_path, input_path)
    with pytest.raises(RecipeError) as info:
        run(recipe)
    assert (
        str(info.value)
        == f"data.output.path {input_path} writes {input_path}, which data.input.path {input_path} reads: write the output somewhere else"
    )
    pattern = tmp_path / "data" / "*.parquet"
    glob_recipe = write_recipe(tmp_path, fake_server.url, pattern, tmp_path / "data" / "out.parquet", name="glob.yaml")
    with pytest.raises(RecipeError) as info:
        run(glob_recipe)
    assert str(info.value) == (
        f"data.output.path {tmp_path / 'data' / 'out.parquet'} writes {tmp_path / 'data' / 'out.parquet'}, "
        f"which data.input.path {pattern} reads: write the output somewhere else"
    )
    # the metrics file beside the output counts too
    (tmp_path / "data" / "in.json").write_text('{"question": "q"}\n')
    json_recipe = write_recipe(tmp_path, fake_server.url, tmp_path / "data" / "*.json", tmp_path / "data" / "out.parquet", name="json.yaml")
    with pytest.raises(RecipeError, match=r"writes .*/data/out\.metrics\.json, which data\.input\.path"):
        run(json_recipe)
    assert fake_server.log() == [] and pq.read_table(input_path).column_names == ["id", "question"]


def test_an_output_in_a_folder_below_an_input_glob_is_allowed(tmp_path: Path, fake_server: FakeServer) -> None:
    write_input(tmp_path / "data" / "in.parquet", questions(5))
    recipe = write_recipe(tmp_path, fake_server.url, tmp_path / "data" / "*.parquet", tmp_path / "data" / "generated" / "out.parquet")
    assert run(recipe).rows == 5 and run(recipe).reused_rows == 5  # the rerun reads only data/in.parquet


def test_an_output_folder_that_cannot_be_made_is_a_recipe_error(tmp_path: Path, fake_server: FakeServer) -> None:
    input_path = write_input(tmp_path / "in.parquet", questions(5))
    with pytest.raises(RecipeError) as info:
        run(write_recipe(tmp_path, fake_server.url, input_path, input_path / "out.parquet"))
    assert str(info.value) == f"data.output.path: cannot create the folder {input_path} (File exists)"
    assert fake_server.log() == []


# --------------------------------------------------------------------------- resume


def test_killed_run_resumes_and_redoes_at_most_one_chunk(
    tmp_path: Path, start_fake_server: Callable[..., FakeServer], fake_server: FakeServer
) -> None:
    server = start_fake_server("--latency", "0.05", "--slots", "4")
    rows, chunk_size, lookahead, max_concurrency = 200, 20, 8, 4
    texts = questions(rows)
    recipe = make_recipe(
        tmp_path,
        server.url,
        write_input(tmp_path / "in.parquet", texts),
        processing={"chunk_size": chunk_size, "batch_size": 10, "max_concurrency": max_concurrency, "lookahead": lookahead},
    )
    out = tmp_path / "out" / "answers.parquet"
    command = [sys.executable, "-m", "vllm_generator", str(recipe), "--progress=false"]
    with open(tmp_path / "first-run.log", "wb") as first_log:
        proc = subprocess.Popen(command, stdout=first_log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while len(chunk_files(out)) < 2:
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline, "no chunk finished within 30 s"
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    finished = len(chunk_files(out))
    assert 2 <= finished < rows // chunk_size and not out.exists()
    sent_before = len(server.log())
    assert sent_before < rows

    second = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert f"reused {finished * chunk_size} from earlier runs" in second.stdout
    log = server.log()
    assert set(sent_prompts(log)) == set(texts)
    # redone work: at most the unfinished chunk plus what was sent ahead or in flight
    assert len(log) <= rows + chunk_size + lookahead + max_concurrency, (sent_before, len(log))

    reference = tmp_path / "reference" / "answers.parquet"
    run(recipe, data__output__path=str(reference), model__base_url=fake_server.url)
    resumed, fresh = pq.read_table(out), pq.read_table(reference)
    assert resumed.column_names == fresh.column_names
    assert resumed.to_pylist() == fresh.to_pylist()
    assert [r["response"] for r in resumed.to_pylist()] == [f"echo: {t}" for t in texts]


def test_a_late_feeder_does_not_make_map_send_rows_twice(tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The look-ahead thread may start late (a busy GIL): map must not send a batch the feeder sends too."""
    build = WireFormat.bodies
    first_call = threading.Event()

    def late_in_feeder(self: WireFormat, batch: Any) -> list[dict[str, Any] | None]:
        if threading.current_thread().name == "vllm-generator-feeder" and not first_call.is_set():
            first_call.set()
            # hold the feeder until map has sent something itself (or 0.5 s, if map rightly waits)
            deadline = time.monotonic() + 0.5
            while not fake_server.log() and time.monotonic() < deadline:
                time.sleep(0.01)
        return build(self, batch)

    monkeypatch.setattr(WireFormat, "bodies", late_in_feeder)
    texts = questions(20)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts))
    run(recipe)
    assert first_call.is_set()
    assert collections.Counter(sent_prompts(fake_server.log())) == {t: 1 for t in texts}


def test_rerun_reuses_until_the_generation_changes(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(30)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts))
    out = tmp_path / "out" / "answers.parquet"
    first = run(recipe)
    assert first.generated_rows == 30 and first.reused_rows == 0 and len(fake_server.log()) == 30
    before = pq.read_table(out)

    again = run(recipe)
    assert (again.generated_rows, again.reused_rows, again.requests, again.rows) == (0, 30, 0, 30)
    assert len(fake_server.log()) == 30
    assert pq.read_table(out).equals(before)

    # not part of what is generated: no request either
    same = run(recipe, processing__max_concurrency=2, logging__level="DEBUG", retry__attempts=4, model__timeout=30)
    assert (same.generated_rows, same.reused_rows) == (0, 30) and len(fake_server.log()) == 30

    changed = run(recipe, generation__temperature=0.5)
    assert (changed.generated_rows, changed.reused_rows) == (30, 0)
    new = fake_server.log()[30:]
    assert sorted(sent_prompts(new)) == sorted(texts)
    assert all(entry["body"]["temperature"] == 0.5 for entry in new)
    assert len(chunk_files(out)) == 3  # the caches of the old temperature are gone


def test_chunk_caches_hold_only_the_new_columns_and_an_input_column_of_the_same_name_is_replaced(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    texts = questions(12)
    input_path = tmp_path / "in.parquet"
    # an input that already has a "response" column (the output of an earlier run, say)
    pq.write_table(pa.table({"question": texts, "response": ["old"] * 12, "notes": ["n"] * 12}), input_path)
    recipe = make_recipe(tmp_path, fake_server.url, input_path, processing={"chunk_size": 5})
    out = tmp_path / "out" / "answers.parquet"
    run(recipe)

    table = pq.read_table(out)
    assert table.column_names == ["question", "notes", *OUTPUT_COLUMNS]
    assert table.column("response").to_pylist() == [f"echo: {t}" for t in texts]
    assert table.column("notes").to_pylist() == ["n"] * 12
    # the caches do not copy the input: a resume joins it back
    chunks = chunk_files(out)
    assert len(chunks) == 3
    for path in chunks:
        assert datasets.Dataset.from_file(str(path)).column_names == OUTPUT_COLUMNS
    again = run(recipe)
    assert (again.reused_rows, again.requests) == (12, 0)
    assert pq.read_table(out).equals(table)


def test_chunk_caches_of_the_older_layout_that_copied_the_input_still_resume(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(12)
    input_path = write_input(tmp_path / "in.parquet", texts)
    recipe = make_recipe(tmp_path, fake_server.url, input_path, processing={"chunk_size": 5})
    out = tmp_path / "out" / "answers.parquet"
    run(recipe)
    expected = pq.read_table(out)
    # rewrite each cache as versions before this one wrote them: the input's columns, then the new ones
    source = pq.read_table(input_path)
    start = 0
    for path in chunk_files(out):
        new = datasets.Dataset.from_file(str(path)).data.table
        combined = source.slice(start, len(new))
        for name in new.column_names:
            combined = combined.append_column(name, new.column(name))
        start += len(new)
        with datasets.arrow_writer.ArrowWriter(path=f"{path}.new") as writer:  # not over the mapped file
            writer.write_table(combined)
            writer.finalize()
        os.replace(f"{path}.new", path)
    assert datasets.Dataset.from_file(str(chunk_files(out)[0])).column_names == ["id", "question", *OUTPUT_COLUMNS]

    again = run(recipe)
    assert (again.reused_rows, again.requests) == (12, 0) and len(fake_server.log()) == 12
    assert pq.read_table(out).equals(expected)


def test_a_server_now_serving_another_model_is_not_answered_from_the_old_models_chunks(
    tmp_path: Path, start_fake_server: Callable[..., FakeServer]
) -> None:
    # model.model is unset: the servers' only model decides, and it is part of the chunk keys
    first_server = start_fake_server("--model", "model-a")
    recipe = make_recipe(tmp_path, first_server.url, write_input(tmp_path / "in.parquet", questions(12)))
    assert run(recipe).generated_rows == 12
    same_model = start_fake_server("--model", "model-a")  # another server, same model: resumes
    assert run(recipe, model__base_url=same_model.url).reused_rows == 12 and same_model.log() == []

    other = start_fake_server("--model", "model-b")
    summary = run(recipe, model__base_url=other.url)
    assert (summary.generated_rows, summary.reused_rows) == (12, 0)
    assert {entry["body"]["model"] for entry in other.log()} == {"model-b"} and len(other.log()) == 12


def test_a_finished_run_writes_its_output_again_with_no_server_up(tmp_path: Path, start_fake_server: Callable[..., FakeServer]) -> None:
    # model.model is unset: the model the servers served is saved with the chunks
    server = start_fake_server("--model", "model-a")
    recipe = make_recipe(tmp_path, server.url, write_input(tmp_path / "in.parquet", questions(20)))
    out = tmp_path / "out" / "answers.parquet"
    first = run(recipe)
    before = pq.read_table(out)
    out.unlink()
    server.kill()
    again = run(recipe)  # e.g. after a failed Hub push: nothing to send, so no server needed
    assert (again.reused_rows, again.generated_rows) == (20, 0) and first.rows == 20
    assert pq.read_table(out).equals(before)

    # the same output, other rows: the model is saved, but rows are left to send
    more = make_recipe(tmp_path, server.url, write_input(tmp_path / "more.parquet", questions(30)), name="more.yaml")
    with pytest.raises(ServerUnavailableError, match="cannot list models at"):
        run(more)


def test_null_prompts_with_on_error_raise_fail_before_any_request(tmp_path: Path, fake_server: FakeServer) -> None:
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"question": pa.array(["a", None, "c"], pa.string())}), input_path)
    with pytest.raises(RecipeError) as info:
        run(make_recipe(tmp_path, fake_server.url, input_path, retry={"on_error": "raise"}))
    assert str(info.value) == (
        f"1 rows have a null prompt (rows 1 of {input_path}) and retry.on_error is raise: fill or filter those rows, or set on_error: record"
    )
    assert fake_server.log() == []


def test_hub_only_recipes_sharing_a_work_dir_keep_apart_by_split(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: RecordingHfApi())
    input_path = write_input(tmp_path / "in.parquet", questions(10))
    recipes = []
    for hub_split in ("first", "second"):
        recipe = make_recipe(tmp_path, fake_server.url, input_path, name=f"{hub_split}.yaml", processing={"work_dir": str(tmp_path / "wd")})
        raw = yaml.safe_load(recipe.read_text())
        raw["data"]["output"] = {"hub_repo_id": "org/answers", "hub_split": hub_split}
        recipe.write_text(yaml.safe_dump(raw))
        recipes.append(recipe)
    run(recipes[0])
    run(recipes[1], generation__temperature=0.5)
    assert run(recipes[0]).reused_rows == 10 and len(fake_server.log()) == 20
    assert len(list((tmp_path / "wd").iterdir())) == 2


def test_num_proc_runs_resume_and_retry_like_single_process_runs(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(20, {3: "[[500:1]]", 14: "[[500:1]]"})
    recipe = make_recipe(
        tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts), processing={"num_proc": 2}, retry={"attempts": 1}
    )
    out = tmp_path / "out" / "answers.parquet"
    first = run(recipe)
    assert (first.rows, first.failed, first.generated_rows) == (20, 2, 20) and len(fake_server.log()) == 20
    # map wrote each chunk as two shard files: they are the cache, and are kept
    assert len(chunk_files(out)) == 4

    again = run(recipe)
    assert (again.generated_rows, again.reused_rows, again.failed) == (0, 20, 2) and len(fake_server.log()) == 20

    fixed = run(recipe, retry__retry_failed=True)
    assert (fixed.generated_rows, fixed.failed) == (2, 0)
    assert sorted(sent_prompts(fake_server.log()[20:])) == sorted([texts[3], texts[14]])
    rows = pq.read_table(out).to_pylist()
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts]
    assert run(recipe).generated_rows == 0 and len(fake_server.log()) == 22  # the retried rows were saved


def test_recipes_sharing_a_work_dir_keep_their_own_chunks(tmp_path: Path, fake_server: FakeServer) -> None:
    input_path = write_input(tmp_path / "in.parquet", questions(10))
    first = write_recipe(
        tmp_path, fake_server.url, input_path, tmp_path / "out" / "a.parquet", "a.yaml", processing={"work_dir": str(tmp_path / "wd")}
    )
    second = write_recipe(
        tmp_path, fake_server.url, input_path, tmp_path / "out" / "b.parquet", "b.yaml", processing={"work_dir": str(tmp_path / "wd")}
    )
    run(first)
    run(second, generation__temperature=0.3)
    assert run(first).reused_rows == 10 and run(second, generation__temperature=0.3).reused_rows == 10
    assert len(fake_server.log()) == 20


# --------------------------------------------------------------------------- retry_failed


def test_retry_failed_sends_only_failed_rows(tmp_path: Path, fake_server: FakeServer) -> None:
    bad = {3: "[[500:3]]", 14: "[[500:3]]", 25: "[[500:3]]"}
    texts = questions(30, bad)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts), retry={"attempts": 1})
    out = tmp_path / "out" / "answers.parquet"
    first = run(recipe)
    assert (first.failed, first.failed_by_type) == (3, {"http_500": 3})
    before = pq.read_table(out).to_pylist()
    for i in bad:
        assert before[i]["response"] is None
        assert (
            before[i]["error"]
            == f"gave up after 1 attempts: 500 from {fake_server.url}/v1/chat/completions: Internal server error (fake_server [[500]])."
        )
    assert len(fake_server.log()) == 30

    # attempts 2 and 3 of those prompts fail too, the 4th succeeds
    retried = run(recipe, retry__retry_failed=True, retry__attempts=3)
    assert collections.Counter(sent_prompts(fake_server.log()[30:])) == {texts[i]: 3 for i in bad}
    assert (retried.failed, retried.rows, retried.generated_rows) == (0, 30, 3)
    after = pq.read_table(out).to_pylist()
    for i, row in enumerate(after):
        if i in bad:
            assert row["error"] is None and row["response"] == f"echo: {texts[i]}"
        else:
            assert row == before[i]

    # the fixed rows were saved: nothing is left to retry
    assert run(recipe, retry__retry_failed=True).generated_rows == 0
    assert len(fake_server.log()) == 39


def test_retry_failed_with_unfinished_chunks_sends_each_row_once(tmp_path: Path, fake_server: FakeServer) -> None:
    bad = {3: "[[500:3]]", 14: "[[500:3]]"}
    texts = questions(40, bad)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts), retry={"attempts": 1})
    out = tmp_path / "out" / "answers.parquet"
    run(recipe)
    chunk_files(out)[2].unlink()  # as if the first run had died in chunk 2 (rows 20 to 29)
    assert len(fake_server.log()) == 40

    run(recipe, retry__retry_failed=True, retry__attempts=3)
    expected = {texts[3]: 3, texts[14]: 3} | {texts[i]: 1 for i in range(20, 30)}
    assert collections.Counter(sent_prompts(fake_server.log()[40:])) == expected
    rows = pq.read_table(out).to_pylist()
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts]


# --------------------------------------------------------------------------- splits


def test_splits_are_disjoint_and_cover_every_row(tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = questions(100)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts), processing={"num_splits": 3})
    out = tmp_path / "out" / "answers.parquet"
    run(recipe, processing__split_id=0)
    run(recipe, processing__split_id=2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # split_id from the SLURM array
    summary = run(recipe)
    assert (summary.split_id, summary.num_splits) == (1, 3)

    ids = []
    for i, size in enumerate((34, 33, 33)):
        rows = pq.read_table(tmp_path / "out" / f"answers.split-{i:05d}-of-00003.parquet").to_pylist()
        assert len(rows) == size
        assert all(r["response"] == f"echo: {texts[r['id']]}" for r in rows)
        ids.append([r["id"] for r in rows])
        assert (tmp_path / "out" / f"answers.split-{i:05d}-of-00003.metrics.json").exists()
    assert sorted(ids[0] + ids[1] + ids[2]) == list(range(100))
    assert ids[0] + ids[1] + ids[2] == list(range(100))  # contiguous: concatenation is the input order
    assert collections.Counter(sent_prompts(fake_server.log())) == {t: 1 for t in texts}
    assert not out.exists()

    merged = merge_outputs(str(out))
    assert merged["rows"] == 100 and merged["splits"] == 3 and merged["rows_with_error"] == 0
    assert pq.read_table(out).column("id").to_pylist() == list(range(100))


def test_more_splits_than_rows_is_refused_before_any_request(tmp_path: Path, fake_server: FakeServer) -> None:
    input_path = write_input(tmp_path / "in.parquet", questions(2))
    recipe = make_recipe(tmp_path, fake_server.url, input_path, processing={"num_splits": 3, "split_id": 0})
    with pytest.raises(RecipeError) as info:
        run(recipe)
    assert str(info.value) == f"processing.num_splits 3 is more than the 2 rows of {input_path}: use at most 2 splits"
    assert fake_server.log() == []


def test_merge_refuses_mismatched_split_files(tmp_path: Path, split_outputs: tuple[Path, Path]) -> None:
    recipe, out = split_outputs
    with pytest.raises(MergeError) as info:
        merge_outputs(str(tmp_path / "elsewhere.parquet"))
    assert str(info.value) == (
        f"no split outputs next to {tmp_path / 'elsewhere.parquet'} (expected files like {tmp_path / 'elsewhere.split-00000-of-00002.parquet'})"
    )

    run(recipe, processing__split_id=1, generation__temperature=0.9)
    with pytest.raises(MergeError) as info:
        merge_outputs(str(out))
    assert (
        str(info.value)
        == f"cannot merge {out}: the splits were generated with different settings (split(s) 0, 2 vs split(s) 1); rerun the odd ones"
    )

    foreign = out.parent / "answers.split-00001-of-00003.parquet"
    pq.write_table(pa.table({"id": [1]}), foreign)
    with pytest.raises(MergeError) as info:
        merge_outputs(str(out))
    assert str(info.value) == f"{foreign} was not written by vllm-generator (no metadata): rerun its split"

    pq.write_table(pa.table({"id": [1]}), out.parent / "answers.split-00000-of-00002.parquet")
    with pytest.raises(MergeError) as info:
        merge_outputs(str(out))
    stale = out.parent / "answers.split-00000-of-00002.parquet"
    threes = ", ".join(str(out.parent / f"answers.split-0000{i}-of-00003.parquet") for i in range(3))
    assert (
        str(info.value)
        == f"split outputs of {out} disagree on the number of splits (2 splits: {stale}; 3 splits: {threes}): remove the stale ones"
    )
    assert not out.exists()


def test_merge_refuses_an_incomplete_split(split_outputs: tuple[Path, Path]) -> None:
    _, out = split_outputs
    split = out.parent / "answers.split-00001-of-00003.parquet"
    table = pq.read_table(split)
    pq.write_table(table.slice(0, 5).replace_schema_metadata(table.schema.metadata), split)  # our metadata, half the rows
    with pytest.raises(MergeError) as info:
        merge_outputs(str(out))
    assert str(info.value) == f"cannot merge {out}: split 1 ({split}) is incomplete: 5 rows, expected 10; rerun it"
    assert not out.exists()


# --------------------------------------------------------------------------- the Hub boundary


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``; every call must also bind to the real method's signature."""

    def __init__(self, files: list[str] | None = None) -> None:
        self.files = list(files or [])
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.uploaded: dict[str, list[dict[str, Any]]] = {}
        self.cards: list[str] = []  # every README.md pushed, in order

    def _record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inspect.signature(getattr(RealHfApi, name)).bind(self, *args, **kwargs)
        self.calls.append((name, args, kwargs))

    def create_repo(self, *args: Any, **kwargs: Any) -> None:
        self._record("create_repo", args, kwargs)

    def list_repo_files(self, *args: Any, **kwargs: Any) -> list[str]:
        self._record("list_repo_files", args, kwargs)
        return list(self.files)

    def create_commit(self, *args: Any, **kwargs: Any) -> None:
        operations = kwargs.pop("operations")
        described: list[tuple[str, ...]] = []
        for op in operations:
            if isinstance(op, CommitOperationAdd) and op.path_in_repo == "README.md":
                assert isinstance(op.path_or_fileobj, bytes)
                self.cards.append(op.path_or_fileobj.decode())
                described.append(("add", "README.md", "<card>"))
            elif isinstance(op, CommitOperationAdd):
                assert isinstance(op.path_or_fileobj, str)
                self.uploaded[op.path_in_repo] = pq.read_table(op.path_or_fileobj).to_pylist()
                described.append(("add", op.path_in_repo, op.path_or_fileobj))
            else:
                assert isinstance(op, CommitOperationDelete)
                described.append(("delete", op.path_in_repo))
        self._record("create_commit", args, {"operations": described, **kwargs})


def test_push_to_hub_deletes_only_matching_files(tmp_path: Path) -> None:
    local = tmp_path / "answers.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), local)
    api = RecordingHfApi(
        [
            ".gitattributes",
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00001.parquet",
            "data/test-00000-of-00001.parquet",
            "archive/data/train-00000-of-00001.parquet",
        ]
    )
    push_to_hub(
        str(local), "org/answers", "data/train-00000-of-00001.parquet", private=False, api=api, delete_patterns=["data/train-*.parquet"]
    )
    assert api.calls == [
        ("create_repo", ("org/answers",), {"repo_type": "dataset", "private": False, "exist_ok": True}),
        ("list_repo_files", ("org/answers",), {"repo_type": "dataset"}),
        (
            "create_commit",
            ("org/answers",),
            {
                "operations": [
                    ("add", "data/train-00000-of-00001.parquet", str(local)),
                    ("delete", "data/train-00000-of-00002.parquet"),
                    ("delete", "data/train-00001-of-00002.parquet"),
                ],
                "repo_type": "dataset",
                "commit_message": "vllm-generator: upload data/train-00000-of-00001.parquet",
            },
        ),
    ]


@pytest.fixture
def split_outputs(tmp_path: Path, fake_server: FakeServer) -> tuple[Path, Path]:
    """A recipe over 30 rows whose 3 splits have all run; returns (recipe, output path)."""
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(30)), processing={"num_splits": 3})
    for split_id in range(3):
        run(recipe, processing__split_id=split_id)
    return recipe, tmp_path / "out" / "answers.parquet"


def test_merge_pushes_one_file_and_removes_the_split_files(split_outputs: tuple[Path, Path]) -> None:
    _, out = split_outputs
    api = RecordingHfApi([f"data/train-0000{i}-of-00003.parquet" for i in range(3)] + ["README.md"])
    summary = merge_outputs(str(out), hub_repo_id="org/answers", hub_split="train", private=True, api=api)
    assert summary["hub_repo_id"] == "org/answers"
    assert [c[0] for c in api.calls] == ["create_repo", "list_repo_files", "create_commit"]
    assert api.calls[0] == ("create_repo", ("org/answers",), {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert api.calls[2][2]["operations"] == [
        ("add", "data/train-00000-of-00001.parquet", str(out)),
        *[("delete", f"data/train-0000{i}-of-00003.parquet") for i in range(3)],
        ("add", "README.md", "<card>"),
    ]
    assert [r["id"] for r in api.uploaded["data/train-00000-of-00001.parquet"]] == list(range(30))


def test_each_split_uploads_its_own_file_and_removes_files_of_other_split_counts(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[RecordingHfApi] = []
    # on the Hub already: an earlier 2-split run, an earlier merge, this run's split 1, another split
    existing = [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/train-00000-of-00001.parquet",
        "data/train-00001-of-00003.parquet",
        "data/test-00000-of-00001.parquet",
        "data/train-v2-00000-of-00001.parquet",  # another split whose name starts like ours
    ]

    def make_api(*args: Any, **kwargs: Any) -> RecordingHfApi:
        assert args == () and kwargs == {}  # the token comes from HF_TOKEN or the login, as huggingface_hub reads them
        created.append(RecordingHfApi(existing))
        return created[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", make_api)
    monkeypatch.chdir(tmp_path)  # hub-only output is staged in ./.vllm_generator_work
    texts = questions(30)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts), processing={"num_splits": 3})
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["output"] = {"hub_repo_id": "org/answers", "private": False}
    recipe.write_text(yaml.safe_dump(raw))

    for split_id in range(3):
        summary = run(recipe, processing__split_id=split_id)
        assert summary.output_path is None and summary.hub_repo_id == "org/answers"
        api = created[split_id]
        name = f"data/train-{split_id:05d}-of-00003.parquet"
        staged = os.path.join(".vllm_generator_work", "org--answers", "train", f"split-{split_id:05d}-of-00003.parquet")
        stale = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/train-00000-of-00001.parquet"]
        assert api.calls == [
            ("create_repo", ("org/answers",), {"repo_type": "dataset", "private": False, "exist_ok": True}),
            ("list_repo_files", ("org/answers",), {"repo_type": "dataset"}),
            (
                "create_commit",
                ("org/answers",),
                {
                    "operations": [("add", name, staged), *(("delete", f) for f in stale), ("add", "README.md", "<card>")],
                    "repo_type": "dataset",
                    "commit_message": f"vllm-generator: upload {name}",
                },
            ),
        ]
        start = (0, 10, 20)[split_id]
        assert [r["response"] for r in api.uploaded[name]] == [f"echo: {t}" for t in texts[start : start + 10]]
    assert len(created) == 3
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("status", "calls"), [(503, 2), (401, 1)])
def test_a_passing_hub_failure_is_retried_and_a_refusal_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, calls: int
) -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    class FlakyHfApi(RecordingHfApi):
        commits = 0

        def create_commit(self, *args: Any, **kwargs: Any) -> None:
            FlakyHfApi.commits += 1
            if FlakyHfApi.commits == 1:
                response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/datasets/org/a/commit/main"))
                raise HfHubHTTPError(f"{status} from the Hub", response=response)
            super().create_commit(*args, **kwargs)

    local = tmp_path / "answers.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), local)
    monkeypatch.setattr("vllm_generator.storage._HUB_WAIT", 0.01)
    api = FlakyHfApi()
    if calls == 1:
        with pytest.raises(vllm_generator.HubError):
            push_to_hub(str(local), "org/a", "data/train-00000-of-00001.parquet", True, api=api)
    else:
        push_to_hub(str(local), "org/a", "data/train-00000-of-00001.parquet", True, api=api)
        assert api.uploaded["data/train-00000-of-00001.parquet"] == [{"id": 1}, {"id": 2}]
    assert FlakyHfApi.commits == calls


def test_a_failed_push_keeps_the_file_and_says_how_to_push_again(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class RefusingHfApi(RecordingHfApi):
        def create_commit(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: RefusingHfApi())
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(10)))
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["output"]["hub_repo_id"] = "org/answers"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out" / "answers.parquet"

    with pytest.raises(vllm_generator.HubError) as info:
        run(recipe)
    assert str(info.value) == (
        f"pushing {out} to the Hub dataset org/answers failed (ConnectionError: [Errno 111] Connection refused); "
        "the file is kept: check HF_TOKEN (or `hf auth login`) and the network, then run the same command again to push it"
    )
    assert pq.read_table(out).num_rows == 10 and (out.parent / "answers.metrics.json").exists()
    assert run(recipe, data__output__hub_repo_id=None).reused_rows == 10  # nothing is sent again
    assert len(fake_server.log()) == 10


def test_hub_only_recipes_in_one_folder_keep_their_own_caches(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: RecordingHfApi())
    monkeypatch.chdir(tmp_path)
    input_path = write_input(tmp_path / "in.parquet", questions(20))
    recipes = []
    for repo in ("org/first", "org/second"):
        recipe = make_recipe(tmp_path, fake_server.url, input_path, name=f"{repo.split('/')[1]}.yaml")
        raw = yaml.safe_load(recipe.read_text())
        raw["data"]["output"] = {"hub_repo_id": repo}
        raw["generation"] = {"temperature": 0.1 if repo == "org/first" else 0.2}
        recipe.write_text(yaml.safe_dump(raw))
        recipes.append(recipe)
    run(recipes[0])
    run(recipes[1])
    assert len(fake_server.log()) == 40
    again = run(recipes[0])  # the second recipe did not remove the first one's chunk caches
    assert (again.generated_rows, again.reused_rows) == (0, 20) and len(fake_server.log()) == 40


# --------------------------------------------------------------------------- atomic output


def test_server_death_leaves_no_output(tmp_path: Path, start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--latency", "0.05", "--slots", "4")
    recipe = make_recipe(
        tmp_path,
        server.url,
        write_input(tmp_path / "in.parquet", questions(200)),
        processing={"chunk_size": 20, "batch_size": 10, "max_concurrency": 4},
        retry={"attempts": 2, "initial_wait": 0.01, "max_wait": 0.05, "max_outage": 1},  # rows wait for a dead server this long
    )

    def kill_after_a_chunk() -> None:
        deadline = time.monotonic() + 30
        while not chunk_files(tmp_path / "out" / "answers.parquet") and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()

    killer = threading.Thread(target=kill_after_a_chunk)
    killer.start()
    try:
        with pytest.raises(ServerUnavailableError) as info:
            run(recipe)
    finally:
        killer.join()
    assert server.url in str(info.value)
    out_dir = tmp_path / "out"
    assert not (out_dir / "answers.parquet").exists() and not (out_dir / "answers.metrics.json").exists()
    assert leftovers(tmp_path) == []
    assert 1 <= len(chunk_files(out_dir / "answers.parquet")) < 10  # finished chunks are kept for the rerun


def test_failed_write_keeps_the_previous_output(tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(20)))
    out = tmp_path / "out" / "answers.parquet"
    run(recipe)
    before = out.read_bytes()

    class DiskFullWriter(pq.ParquetWriter):
        def write_table(self, *args: Any, **kwargs: Any) -> None:
            super().write_table(*args, **kwargs)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "ParquetWriter", DiskFullWriter)
    with pytest.raises(OSError, match="No space left on device"):
        run(recipe, generation__temperature=0.5)
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_killed_map_s_temp_file_is_removed_on_the_next_run(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(20)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts))
    split_dir = tmp_path / "out" / "answers.parquet.work" / "split-00000-of-00001"
    split_dir.mkdir(parents=True)
    (split_dir / "tmpab12cd").write_bytes(b"half a chunk")  # what map leaves when killed
    run(recipe)
    assert not (split_dir / "tmpab12cd").exists()
    assert pq.read_table(tmp_path / "out" / "answers.parquet")["response"].to_pylist() == [f"echo: {t}" for t in texts]


def test_the_progress_bar_ends_at_the_split_s_rows(tmp_path: Path, fake_server: FakeServer, capfd: pytest.CaptureFixture[str]) -> None:
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(25)), processing={"max_concurrency": 2})
    run_recipe(load_recipe(recipe), progress=True)
    bar = capfd.readouterr().err
    assert "generate: 100%" in bar and "25/25" in bar and "0 errors" in bar


def test_merge_refuses_splits_with_other_columns(tmp_path: Path, fake_server: FakeServer) -> None:
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(10)), processing={"num_splits": 2})
    run(recipe, processing__split_id=0)
    table = pq.read_table(tmp_path / "in.parquet")
    pq.write_table(table.append_column("extra", pa.array(range(10))), tmp_path / "in.parquet")  # same rows, one column more
    run(recipe, processing__split_id=1)
    out = tmp_path / "out" / "answers.parquet"
    with pytest.raises(MergeError) as info:
        merge_outputs(str(out))
    split1 = out.parent / "answers.split-00001-of-00002.parquet"
    assert str(info.value) == f"cannot merge {out}: split 1 ({split1}) has other columns than split 0; rerun it"
    assert not out.exists()


# --------------------------------------------------------------------------- bad rows, caught before the first request


def test_a_message_without_a_role_deep_in_the_input_is_named_before_anything_is_sent(tmp_path: Path, fake_server: FakeServer) -> None:
    rows = [[{"role": "user", "content": f"q {i}"}] for i in range(3000)]
    rows[2500] = [{"role": "system", "content": "be terse"}, {"content": "no role here"}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    recipe = make_recipe(tmp_path, fake_server.url, path, data={"prompt_column": None, "messages_column": "messages"})
    with pytest.raises(RecipeError) as info:
        run(recipe)
    assert str(info.value) == f"data.messages_column: row 2500 of {path}: message 1 has no 'role'"
    assert fake_server.log() == []
    # split 1 of 2 holds that row too: its number in the input, not in the split
    with pytest.raises(RecipeError) as info:
        run(recipe, processing__num_splits=2, processing__split_id=1)
    assert str(info.value) == f"data.messages_column: row 2500 of {path}: message 1 has no 'role'"


def test_a_messages_row_of_the_wrong_shape_in_a_plain_map_names_its_dataset_row(fake_server: FakeServer) -> None:
    ds = Dataset.from_list([{"m": [{"role": "user", "content": "a"}]}] * 5 + [{"m": [{"content": "b"}]}])
    with pytest.raises(RecipeError) as info:
        ds.map(vllm_generate(fake_server.url, messages_column="m"), batched=True, batch_size=4, with_indices=True)
    assert str(info.value) == "row 5: column 'm': message 0 has no 'role' (each message is {role, content})"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{question:d}", "data.template: row 0 of {input}: the template '{{question:d}}' cannot format this row's values (ValueError: "),
        ("{question!s:^{id}}", None),  # id is a column too: this one works
    ],
)
def test_template_values_are_checked_on_the_first_rows(tmp_path: Path, fake_server: FakeServer, template: str, message: str | None) -> None:
    input_path = write_input(tmp_path / "in.parquet", questions(5))
    recipe = make_recipe(tmp_path, fake_server.url, input_path, data={"prompt_column": None, "template": template})
    if message is None:
        assert run(recipe).succeeded == 5
        assert sent_prompts(fake_server.log())[2] == format("question 2", f"^{2}")
        return
    with pytest.raises(RecipeError) as info:
        run(recipe)
    assert str(info.value).startswith(message.format(input=input_path))
    assert fake_server.log() == []


def test_text_that_is_not_utf8_is_named_by_row_and_column(tmp_path: Path, fake_server: FakeServer) -> None:
    values = pa.array([b"fine", b"also fine", b"caf\xe9"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"question": values, "notes": ["a", "b", "c"]}), tmp_path / "in.parquet")
    with pytest.raises(RecipeError) as info:
        run(make_recipe(tmp_path, fake_server.url, tmp_path / "in.parquet"))
    assert str(info.value) == f"data.input: row 2 of {tmp_path / 'in.parquet'}, column 'question': not UTF-8 text: write the file as UTF-8"
    assert fake_server.log() == []


def test_a_broken_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"question": "a"}\n{"question": "b"}\n{"question": "c"} trailing\n')
    with pytest.raises(RecipeError) as info:
        run(make_recipe(tmp_path, "http://127.0.0.1:9", path))
    assert str(info.value).startswith(f"data.input.path: cannot read {path}: line 3 is not one JSON value (Extra data: ")


def test_an_output_path_that_is_a_folder_is_refused_before_anything_is_sent(tmp_path: Path, fake_server: FakeServer) -> None:
    (tmp_path / "out" / "answers.parquet").mkdir(parents=True)
    with pytest.raises(RecipeError) as info:
        run(make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(3))))
    assert (
        str(info.value)
        == f"data.output.path: {tmp_path / 'out' / 'answers.parquet'} is a folder: name a .parquet file to write (it is replaced as a whole)"
    )
    assert fake_server.log() == []


def test_a_log_file_in_a_folder_that_cannot_be_made_is_refused_up_front(tmp_path: Path, fake_server: FakeServer) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    recipe = make_recipe(
        tmp_path,
        fake_server.url,
        write_input(tmp_path / "in.parquet", questions(3)),
        logging={"file": str(tmp_path / "blocker" / "run.log")},
    )
    with pytest.raises(RecipeError) as info:
        run(recipe)
    assert str(info.value) == f"logging.file: cannot create the folder {tmp_path / 'blocker'} (File exists)"
    assert fake_server.log() == []


# --------------------------------------------------------------------------- damaged and shared state


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_chunk_cache_is_sent_again_with_a_warning_naming_it(
    tmp_path: Path, fake_server: FakeServer, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    texts = questions(30)
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts))
    run(recipe)
    first = run(recipe, data__output__path=str(tmp_path / "reference.parquet"))  # another output, same answers
    assert first.generated_rows == 30
    broken = chunk_files(tmp_path / "out" / "answers.parquet")[1]
    data = broken.read_bytes()
    broken.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not arrow at all" * 10}[damage])
    fake_server.reset()
    caplog.set_level(logging.WARNING, logger="vllm_generator")

    again = run(recipe)
    assert (again.reused_rows, again.generated_rows) == (20, 10)
    assert sorted(sent_prompts(fake_server.log())) == texts[10:20]
    assert any(r.getMessage().startswith(f"chunk cache {broken} is damaged (") for r in caplog.records)
    assert pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist() == pq.read_table(tmp_path / "reference.parquet").to_pylist()


def test_a_second_run_on_the_same_split_refuses_naming_the_first(tmp_path: Path, start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--latency", "0.2", "--slots", "2")
    recipe = make_recipe(
        tmp_path,
        server.url,
        write_input(tmp_path / "in.parquet", questions(20)),
        processing={"chunk_size": 10, "batch_size": 5, "max_concurrency": 2},
    )
    command = [sys.executable, "-m", "vllm_generator", str(recipe), "--progress=false"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not server.log() and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1
        assert second.stderr.startswith(
            f"error: split 0 of 1 of {tmp_path / 'out' / 'answers.parquet'} is being written by pid {first.pid} on "
        )
        assert second.stderr.rstrip().endswith("wait for it to finish or stop it (set processing.wait_for_lock: true to wait)")
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
    finally:
        first.kill()
        first.wait()
    assert collections.Counter(sent_prompts(server.log())) == {t: 1 for t in questions(20)}  # nothing sent twice
    # the lock went with the run: the next one resumes at once
    assert run(recipe).reused_rows == 20


def test_a_run_that_waits_for_the_lock_resumes_from_the_first_run_s_work(tmp_path: Path, fake_server: FakeServer) -> None:
    from vllm_generator.storage import hold_lock

    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", questions(10)), processing={"wait_for_lock": True})
    split_dir = tmp_path / "out" / "answers.parquet.work" / "split-00000-of-00001"
    split_dir.mkdir(parents=True)
    held = threading.Event()
    done: list[RunSummary] = []

    def hold() -> None:
        with hold_lock(str(split_dir), "it", wait=False):
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    started = time.monotonic()
    done.append(run(recipe))
    holder.join()
    assert time.monotonic() - started >= 0.8 and done[0].succeeded == 10


def test_a_full_disk_says_where_and_what_is_kept_and_the_rerun_resumes(tmp_path: Path, fake_server: FakeServer) -> None:
    with tmpfs(tmp_path / "small", "size=400k") as disk:
        texts = [f"question {i} " + "x" * 400 for i in range(2000)]
        recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts),
                             processing={"chunk_size": 50, "batch_size": 25, "work_dir": str(disk)})  # fmt: skip
        with pytest.raises(StorageError) as info:
            run(recipe)
        message = str(info.value)
        del info
        with warnings.catch_warnings():  # datasets' cache writer leaves its file open when a write fails
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        assert message.startswith("no space left on ") and "(No space left on device)" in message
        assert " chunks (" in message and "rows) are kept in " in message and message.endswith("(it sends only what is not kept)")
        kept = int(message.split(" chunks (")[1].split(" rows")[0])
        assert kept < 2000
        assert not [p for p in disk.rglob("*") if p.name.startswith("tmp") or ".tmp-" in p.name]  # nothing left that cannot resume

        resize_tmpfs(disk, "16m")  # room again
        fake_server.reset()
        again = run(recipe)
        # the finished chunks, and the journaled answers of the chunk that was being written
        assert again.reused_rows >= kept and again.generated_rows == 2000 - again.reused_rows
        assert len(fake_server.log()) == 2000 - again.reused_rows
        rows = pq.read_table(tmp_path / "out" / "answers.parquet").to_pylist()
        assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts]


# --------------------------------------------------------------------------- the dataset card


def test_every_push_writes_a_dataset_card_with_the_run_and_a_viewer_config(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = RecordingHfApi(["README.md", "data/test-00000-of-00001.parquet", "data/train-v2-00000-of-00001.parquet"])
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: api)
    texts = questions(10, {4: "[[400]]"})
    recipe = make_recipe(
        tmp_path,
        fake_server.url,
        write_input(tmp_path / "in.parquet", texts),
        generation={"temperature": 0.5, "max_tokens": 32},
        data={"system_prompt": "Be brief."},
    )
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["output"]["hub_repo_id"] = "org/answers"
    raw["model"]["base_url"] = fake_server.url.replace("http://", "http://user:hunter2@")
    recipe.write_text(yaml.safe_dump(raw))
    summary = run(recipe)
    (card,) = api.cards
    front, body = card.removeprefix("---\n").split("---\n", 1)
    # train's own pattern: "data/train-*" would also take the train-v2 split's files
    assert yaml.safe_load(front)["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "test", "path": "data/test-*"},
                {"split": "train", "path": "data/train-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].parquet"},
                {"split": "train-v2", "path": "data/train-v2-*"},
            ],
        }
    ]
    assert "| served model name | fake-model |" in body
    assert '| generation parameters | {"max_tokens": 32, "temperature": 0.5} |' in body
    assert "| prompt source | text column `question`, system prompt `Be brief.` |" in body
    assert "| rows | 10 |\n| succeeded | 9 |\n| failed | 1 |\n| failed by type | http_400: 1 |" in body
    assert f"| tokens | {summary.prompt_tokens:,} prompt, {summary.completion_tokens:,} completion |" in body
    assert f"| throughput | {summary.rows_per_s:,.1f} rows/s" in body
    assert f"| library version | vllm-generator {vllm_generator.__version__} |" in body
    recipe_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block)["model"]["base_url"] == [fake_server.url.replace("http://", "http://user:***@")]
    assert "hunter2" not in card
    assert 'load_dataset("org/answers", split="train")' in body


def test_the_card_redacts_secret_settings() -> None:
    from vllm_generator.card import redact

    recipe = {
        "model": {
            "api_key_env": "MY_KEY",  # a variable's name: kept
            "serve": {
                "env": {"HF_TOKEN": "hf_abc", "VLLM_CPU_KVCACHE_SPACE": "1"},
                "args": ["--api-key", "sk-1", "--hf-token=hf_xyz", "--dtype", "bf16", "--note=see http://u:pw@h:1/x"],
            },
        },
        "generation": {"extra_body": {"auth": {"user": "x"}}},
    }
    assert redact(recipe) == {
        "model": {
            "api_key_env": "MY_KEY",
            "serve": {
                "env": {"HF_TOKEN": "<redacted>", "VLLM_CPU_KVCACHE_SPACE": "1"},
                "args": ["--api-key", "<redacted>", "--hf-token=<redacted>", "--dtype", "bf16", "--note=see http://u:***@h:1/x"],
            },
        },
        "generation": {"extra_body": {"auth": "<redacted>"}},
    }


def test_a_merge_push_writes_a_card_with_the_totals(split_outputs: tuple[Path, Path]) -> None:
    _, out = split_outputs
    api = RecordingHfApi([])
    merge_outputs(str(out), hub_repo_id="org/answers", hub_split="train", private=True, api=api)
    (card,) = api.cards
    assert "  - split: train\n    path: data/train-*\n" in card
    assert "| rows | 30 |\n| succeeded | 30 |\n| failed | 0 |\n| failed by type | none |" in card


def test_retry_failed_names_the_dataset_row_of_a_row_that_fails_again(tmp_path: Path, fake_server: FakeServer) -> None:
    texts = questions(20, {13: "question 13 [[400]]", 17: "question 17 [[400]]"})
    recipe = make_recipe(tmp_path, fake_server.url, write_input(tmp_path / "in.parquet", texts))
    assert run(recipe).failed == 2
    with pytest.raises(vllm_generator.GenerationError) as info:
        run(recipe, retry__retry_failed=True, retry__on_error="raise")
    assert info.value.row == 13  # not 10, the first row of its chunk
    assert str(info.value).startswith("row 13 failed: 400 from ")
