"""The response journal: a map or a recipe run again after Ctrl-C, kill -9, a kernel restart or a
full disk sends only the rows that had no answer, and gives every row its own answer."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import datasets
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import received, resize_tmpfs, tmpfs, user_text, write_recipe
from datasets import Dataset, IterableDataset
from fake_server import FakeServer

from vllm_generator import StorageError, vllm_generate
from vllm_generator.journal import FILE_NAME, close_journals, open_journal
from vllm_generator.wire import Result

REPO = Path(__file__).resolve().parent.parent


def prompts(n: int, tag: str = "q") -> list[str]:
    return [f"{tag} {i}" for i in range(n)]


def sent(server: FakeServer) -> list[str]:
    """The prompts the server got, in order of arrival."""
    return [user_text(entry["body"]) for entry in server.log()]


def journaled(folder: Path) -> list[str]:
    """The answers a journal holds (read with sqlite3 itself, not the module under test)."""
    db = sqlite3.connect(folder / FILE_NAME)
    try:
        return [orjson.loads(value)[0] for (value,) in db.execute("SELECT value FROM responses")]
    finally:
        db.close()


def assert_answers(ds: Any, texts: list[str]) -> None:
    rows = list(ds)
    assert [r["response"] for r in rows] == [f"echo: {t}" for t in texts]
    assert [r["error"] for r in rows] == [None] * len(texts)


def generate(url: str, **kwargs: Any) -> Any:
    return vllm_generate(url, initial_wait=0.01, max_wait=0.05, max_attempts=2, **kwargs)


# --------------------------------------------------------------------------- the same map again


def test_a_map_run_again_sends_nothing_and_logs_what_it_reused(
    fake_server: FakeServer, _own_datasets_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    texts = prompts(300)
    ds = Dataset.from_dict({"prompt": texts})  # in memory: datasets never caches its maps
    first = ds.map(generate(fake_server.url), batched=True, batch_size=64)
    assert received(fake_server) == {t: 1 for t in texts}
    assert (_own_datasets_cache / "vllm_generator" / FILE_NAME).exists()  # under HF_DATASETS_CACHE

    fake_server.reset()
    with caplog.at_level(logging.INFO, logger="vllm_generator.journal"):
        again = ds.map(generate(fake_server.url), batched=True, batch_size=100)  # another batch size: same keys
        close_journals()  # the line comes once lookups stop finding entries, or at exit
    assert sent(fake_server) == []
    assert again.to_list() == first.to_list()
    assert_answers(again, texts)
    lines = [r.getMessage() for r in caplog.records if "cached responses" in r.getMessage()]
    assert lines == [f"reused 300 cached responses from the journal {_own_datasets_cache / 'vllm_generator' / FILE_NAME}"]


def test_only_rows_not_answered_yet_are_sent_and_failed_rows_are_sent_again(fake_server: FakeServer) -> None:
    texts = prompts(40)
    bad = {5: "q 5 [[400]]", 17: "q 17 [[400]]"}
    first_texts = [bad.get(i, t) for i, t in enumerate(texts)]
    out = Dataset.from_dict({"prompt": first_texts[:30]}).map(generate(fake_server.url), batched=True, batch_size=8)
    assert [r["error"] is not None for r in out][5] and out[17]["error"] is not None

    fake_server.reset()
    # the same 30 rows (the two failed ones among them) and 10 new ones
    Dataset.from_dict({"prompt": first_texts}).map(generate(fake_server.url), batched=True, batch_size=8)
    assert sorted(sent(fake_server)) == sorted([bad[5], bad[17], *texts[30:]])


def test_cache_false_another_seed_and_disable_caching_send_again(
    fake_server: FakeServer, _own_datasets_cache: Path, tmp_path: Path
) -> None:
    ds = Dataset.from_dict({"prompt": prompts(20)})
    ds.map(generate(fake_server.url, seed=1), batched=True)
    fake_server.reset()
    ds.map(generate(fake_server.url, seed=1, cache=False), batched=True)
    assert len(sent(fake_server)) == 20
    fake_server.reset()
    ds.map(generate(fake_server.url, seed=2), batched=True)  # another request body: fresh samples
    assert len(sent(fake_server)) == 20
    fake_server.reset()
    datasets.disable_caching()
    try:
        ds.map(generate(fake_server.url, seed=3), batched=True)
        ds.map(generate(fake_server.url, seed=3), batched=True)
    finally:
        datasets.enable_caching()
    assert len(sent(fake_server)) == 40
    fake_server.reset()
    elsewhere = tmp_path / "my-journal"
    ds.map(generate(fake_server.url, seed=1, cache=str(elsewhere)), batched=True)
    assert len(sent(fake_server)) == 20  # a journal of its own, which did not hold these
    assert len(journaled(elsewhere)) == 20


def test_repeated_rows_of_a_batch_are_separate_samples(fake_server: FakeServer, _own_datasets_cache: Path) -> None:
    ds = Dataset.from_dict({"prompt": ["same"] * 6 + ["other"]})
    ds.map(generate(fake_server.url, temperature=1.0), batched=True)
    close_journals()
    assert sorted(journaled(_own_datasets_cache / "vllm_generator")) == ["echo: other"] + ["echo: same"] * 6
    fake_server.reset()
    out = ds.map(generate(fake_server.url, temperature=1.0), batched=True)
    assert sent(fake_server) == []
    assert_answers(out, ["same"] * 6 + ["other"])


def test_journaled_answers_keep_every_column_structured_outputs_n_and_logprobs(fake_server: FakeServer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    ds = Dataset.from_dict({"prompt": prompts(30)})
    for kwargs in ({"output_schema": schema, "n": 2}, {"logprobs": True, "n": 3}):
        fake_server.reset()
        first = ds.map(generate(fake_server.url, **kwargs), batched=True, batch_size=8)
        fake_server.reset()
        again = ds.map(generate(fake_server.url, **kwargs), batched=True, batch_size=8)
        assert sent(fake_server) == []
        assert again.features == first.features and again.to_list() == first.to_list()


def test_keys_ignore_servers_and_concurrency(start_fake_server: Any) -> None:
    a, b = start_fake_server("--slots", "4"), start_fake_server("--slots", "4")
    ds = Dataset.from_dict({"prompt": prompts(50)})
    ds.map(generate(a.url, max_concurrency=3), batched=True, batch_size=10)
    out = ds.map(generate([b.url, a.url], max_concurrency=50), batched=True, batch_size=25)
    assert len(a.log()) == 50 and b.log() == []
    assert_answers(out, prompts(50))


# --------------------------------------------------------------------------- interrupted maps


def test_a_map_interrupted_by_ctrl_c_sends_only_what_had_not_come_back(start_fake_server: Any) -> None:
    server = start_fake_server("--slots", "16", "--latency", "0.05")
    texts = prompts(1200)
    ds = Dataset.from_dict({"prompt": texts})
    transform = generate(server.url, max_concurrency=16)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(1.5, signal.pthread_kill, (main, signal.SIGINT))  # about 40% done
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ds.map(transform, batched=True, batch_size=100)
    timer.join()
    first = set(sent(server))
    assert 0 < len(first) < len(texts)

    server.reset()
    out = ds.map(transform, batched=True, batch_size=100)  # the same map, in the same process
    again = sent(server)
    assert len(again) == len(set(again))
    assert set(again) >= set(texts) - first  # what was never sent
    assert len(set(again) & first) <= 16  # and at most the requests in flight at Ctrl-C
    assert_answers(out, texts)


def test_num_proc_and_iterable_datasets_are_journaled(fake_server: FakeServer) -> None:
    texts = prompts(200)
    ds = Dataset.from_dict({"prompt": texts})
    ds.map(generate(fake_server.url), batched=True, batch_size=20, num_proc=2)
    assert len(sent(fake_server)) == 200
    fake_server.reset()
    out = ds.map(generate(fake_server.url), batched=True, batch_size=20, num_proc=2)
    assert sent(fake_server) == []
    assert_answers(out, texts)

    more = prompts(150, "it")
    stream: IterableDataset = Dataset.from_dict({"prompt": more}).to_iterable_dataset(num_shards=3)
    assert_answers(stream.map(generate(fake_server.url), batched=True, batch_size=40), more)
    fake_server.reset()
    assert_answers(stream.map(generate(fake_server.url), batched=True, batch_size=40), more)
    assert sent(fake_server) == []


_TWO_WRITERS = """
import sys
from datasets import Dataset
from vllm_generator import vllm_generate
url, cache, tag = sys.argv[1:]
texts = [f"shared {i}" for i in range(300)] + [f"{tag} {i}" for i in range(900)]
out = Dataset.from_dict({"prompt": texts}).map(vllm_generate(url, cache=cache), batched=True, batch_size=50)
assert out["response"] == [f"echo: {t}" for t in texts]
"""


def test_two_processes_write_one_journal(start_fake_server: Any, tmp_path: Path) -> None:
    server = start_fake_server("--slots", "64", "--latency", "0.01")
    folder = tmp_path / "shared-journal"
    script = tmp_path / "writer.py"
    script.write_text(_TWO_WRITERS)
    procs = [subprocess.Popen([sys.executable, str(script), server.url, str(folder), tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = journaled(folder)
    assert len(entries) == len(set(entries)) == 300 + 1800  # none lost, none twice
    server.reset()
    texts = [f"shared {i}" for i in range(300)] + [f"{tag} {i}" for tag in ("a", "b") for i in range(900)]
    random.Random(0).shuffle(texts)
    out = Dataset.from_dict({"prompt": texts}).map(generate(server.url, cache=str(folder)), batched=True, batch_size=500)
    assert sent(server) == []
    assert_answers(out, texts)  # every row its own answer


def test_forked_workers_opening_a_new_journal_at_once_all_write_it(tmp_path: Path) -> None:
    # as map(num_proc=N) starts its workers: forked together, each creates the file or switches it
    # to WAL, which SQLite's busy handler does not wait for
    folder = tmp_path / "fresh"
    children = []
    for n in range(8):
        pid = os.fork()
        if pid == 0:  # the child: write 50 answers, and say how it went by its exit status
            code = 1
            try:
                journal = open_journal(str(folder))
                assert journal.lookup([b"not there yet..", f"p{n}-0".encode().ljust(16, b".")]) == {}  # as a map's first batch
                for i in range(50):
                    journal.record(f"p{n}-{i}".encode().ljust(16, b"."), Result(response=f"p{n} {i}"))
                journal.flush()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children] == [0] * 8
    assert sorted(journaled(folder)) == sorted(f"p{n} {i}" for n in range(8) for i in range(50))


# --------------------------------------------------------------------------- damaged journals


def fill_journal(url: str, folder: Path, texts: list[str]) -> None:
    Dataset.from_dict({"prompt": texts}).map(generate(url, cache=str(folder)), batched=True, batch_size=50)
    close_journals()


def test_an_entry_changed_on_disk_is_never_read_as_an_answer(fake_server: FakeServer, tmp_path: Path) -> None:
    folder, texts = tmp_path / "j", prompts(100)
    fill_journal(fake_server.url, folder, texts)
    path = folder / FILE_NAME
    data = path.read_bytes()
    assert data.count(b"echo: q 42") == 1  # "q 42" is no prefix of another prompt
    path.write_bytes(data.replace(b"echo: q 42", b"echo: q 24"))  # a plausible wrong answer, same size
    fake_server.reset()
    out = Dataset.from_dict({"prompt": texts}).map(generate(fake_server.url, cache=str(folder)), batched=True, batch_size=50)
    assert sent(fake_server) == ["q 42"]
    assert_answers(out, texts)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zeroed_page"])
def test_a_damaged_journal_file_is_dropped_and_its_rows_sent_again(
    fake_server: FakeServer, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder, texts = tmp_path / "j", prompts(400)
    fill_journal(fake_server.url, folder, texts)
    path = folder / FILE_NAME
    data = path.read_bytes()
    assert len(data) > 4 * 4096
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "garbage":
        path.write_bytes(b"not a database at all " * 500)
    else:  # a page of the table's b-tree overwritten
        path.write_bytes(data[:8192] + b"\x00\x17" * 2048 + data[12288:])
    fake_server.reset()
    with caplog.at_level(logging.WARNING, logger="vllm_generator.journal"):
        out = Dataset.from_dict({"prompt": texts}).map(generate(fake_server.url, cache=str(folder)), batched=True, batch_size=50)
    assert_answers(out, texts)
    assert len(sent(fake_server)) > 0 and len(sent(fake_server)) == len(set(sent(fake_server)))
    assert any(str(path) in r.getMessage() and "sent again" in r.getMessage() for r in caplog.records)
    close_journals()
    fake_server.reset()  # the journal works again: every row is in it now
    Dataset.from_dict({"prompt": texts}).map(generate(fake_server.url, cache=str(folder)), batched=True, batch_size=50)
    assert sent(fake_server) == []


_KILLED_AFTER_TWO_BATCHES = """
import os, signal, sys
from datasets import Dataset
from vllm_generator import vllm_generate
url, cache = sys.argv[1:]
g = vllm_generate(url, cache=cache)
Dataset.from_dict({"prompt": [f"a {i}" for i in range(100)]}).map(g, batched=True, batch_size=100)
Dataset.from_dict({"prompt": [f"b {i}" for i in range(100)]}).map(g, batched=True, batch_size=100)
os.kill(os.getpid(), signal.SIGKILL)  # the WAL is never checkpointed: the last commits stay in it
"""


def test_a_torn_last_record_is_dropped_and_only_its_rows_are_sent_again(fake_server: FakeServer, tmp_path: Path) -> None:
    folder, script = tmp_path / "j", tmp_path / "killed.py"
    script.write_text(_KILLED_AFTER_TWO_BATCHES)
    proc = subprocess.run([sys.executable, str(script), fake_server.url, str(folder)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    wal = folder / (FILE_NAME + "-wal")
    size = wal.stat().st_size
    assert size > 0
    os.truncate(wal, size - 700)  # the last frame torn, as a kill during its write leaves it
    fake_server.reset()
    texts = [f"a {i}" for i in range(100)] + [f"b {i}" for i in range(100)]
    out = Dataset.from_dict({"prompt": texts}).map(generate(fake_server.url, cache=str(folder)), batched=True, batch_size=100)
    again = sent(fake_server)
    assert 0 < len(again) <= 100 and all(t.startswith("b ") for t in again)  # the first batch's commit is whole
    assert_answers(out, texts)


# --------------------------------------------------------------------------- a journal that cannot be written


def test_a_full_disk_is_a_storage_error_naming_the_folder_and_the_rerun_resumes(fake_server: FakeServer, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=400k", before_unmount=close_journals) as disk:
        texts = [f"question {i} " + "x" * 400 for i in range(2000)]
        ds = Dataset.from_dict({"prompt": texts})
        with pytest.raises(StorageError) as info:
            ds.map(generate(fake_server.url, cache=str(disk)), batched=True, batch_size=100)
        assert info.value.path == str(disk)
        assert str(info.value).startswith(f"cannot write the response journal in {disk} (the disk is full;")
        kept = len(journaled(disk))
        assert 0 < kept < 2000

        resize_tmpfs(disk, "16m")  # room again
        fake_server.reset()
        out = ds.map(generate(fake_server.url, cache=str(disk)), batched=True, batch_size=100)
        assert len(sent(fake_server)) == 2000 - kept
        assert_answers(out, texts)


def test_a_read_only_folder_is_a_storage_error_before_any_request(fake_server: FakeServer, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        with pytest.raises(StorageError, match=f"^cannot write the response journal in {folder} ") as info:
            Dataset.from_dict({"prompt": prompts(5)}).map(generate(fake_server.url, cache=str(folder)), batched=True)
        assert info.value.path == str(folder)
        assert sent(fake_server) == []


# --------------------------------------------------------------------------- recipes killed with SIGKILL


def test_a_recipe_killed_again_and_again_sends_only_the_rest_and_ends_as_an_uninterrupted_run(
    start_fake_server: Any, tmp_path: Path
) -> None:
    server = start_fake_server("--slots", "8", "--latency", "0.05")
    texts = [f"question {i}" for i in range(700)]
    pq.write_table(pa.table({"question": texts}), tmp_path / "in.parquet")
    # one chunk: before the journal, every kill lost all of it
    raw = {"processing": {"chunk_size": 10_000, "batch_size": 50, "max_concurrency": 8}}
    recipe = write_recipe(tmp_path, server.url, tmp_path / "in.parquet", tmp_path / "out" / "answers.parquet", **raw)
    reference = write_recipe(tmp_path, server.url, tmp_path / "in.parquet", tmp_path / "ref" / "answers.parquet", "ref.yaml", **raw)
    journal = tmp_path / "out" / "answers.parquet.work" / "split-00000-of-00001"
    command = [sys.executable, "-m", "vllm_generator", "run", str(recipe), "--progress=false"]
    rng = random.Random(10)
    answered: set[str] = set()
    for kill in range(4):
        server.reset()
        proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not server.log() and time.monotonic() < deadline:  # sending: kill it some time later
            time.sleep(0.02)
        time.sleep(rng.uniform(0.6, 1.5))  # after the first commits
        proc.kill()
        proc.wait(timeout=30)
        now_sent = set(sent(server))
        assert not now_sent & answered, f"kill {kill}: rows answered before were sent again"
        before = len(answered)
        answered = {a.removeprefix("echo: ") for a in journaled(journal)}
        assert len(answered) > before, f"kill {kill}: nothing was kept"
        # lost: what was in flight (8), and what came in since the last group commit (~0.5 s at ~150 rows/s)
        assert len(now_sent - answered) <= 8 + 100
    server.reset()
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL, timeout=120)
    assert sorted(sent(server)) == sorted(set(texts) - answered)
    assert not (journal / FILE_NAME).exists()  # a finished run keeps its chunk, not a second copy
    subprocess.run([sys.executable, "-m", "vllm_generator", "run", str(reference), "--progress=false"], check=True, timeout=120)
    out, ref = pq.read_table(tmp_path / "out" / "answers.parquet"), pq.read_table(tmp_path / "ref" / "answers.parquet")
    assert out.to_pylist() == ref.to_pylist()
    assert out.column("response").to_pylist() == [f"echo: {t}" for t in texts]


_NOTEBOOK_CELL = """
import datasets
from vllm_generator import vllm_generate
ds = datasets.Dataset.from_dict({{"prompt": [f"{tag} {{i}}" for i in range({rows})]}})
out = ds.map(vllm_generate("{url}", max_concurrency=16), batched=True, batch_size=50)
print("rows", len(out), "aligned", out["response"] == [f"echo: {tag} {{i}}" for i in range({rows})])
"""


@pytest.mark.slow
def test_a_notebook_map_resumes_after_an_interrupt_and_a_killed_kernel(
    start_fake_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jupyter_client.manager import KernelManager

    # a kernel spec for exactly this interpreter (as test_notebook.py does)
    spec = tmp_path / "jupyter" / "kernels" / "vllm-generator-journal"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(orjson.dumps({"argv": argv, "display_name": "journal", "language": "python"}).decode())
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    server = start_fake_server("--slots", "16", "--latency", "0.05")
    rows = 1500
    cell = _NOTEBOOK_CELL.format(url=server.url, rows=rows, tag="nb")

    def start() -> tuple[Any, Any]:
        km = KernelManager(kernel_name="vllm-generator-journal")
        km.start_kernel(cwd=str(tmp_path))
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        return km, kc

    def run_cell(kc: Any, interrupt: Any = None) -> str:
        out: list[str] = []
        msg_id = kc.execute(cell)
        if interrupt is not None:
            interrupt()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])
            if msg["msg_type"] == "error":
                out.append(msg["content"]["ename"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        return "".join(out)

    km, kc = start()
    try:
        # Ctrl-C (the kernel's interrupt) about a third of the way, then the same cell again
        assert "KeyboardInterrupt" in run_cell(kc, lambda: (time.sleep(3.0), km.interrupt_kernel()))
        first = set(sent(server))
        assert 0 < len(first) < rows
        server.reset()
        assert "rows 1500 aligned True" in run_cell(kc)
        again = sent(server)
        assert set(again) >= {f"nb {i}" for i in range(rows)} - first and len(set(again) & first) <= 16

        # kill -9 the kernel midway, start another, run the cell there
        server.reset()
        cell = _NOTEBOOK_CELL.format(url=server.url, rows=rows, tag="nb2")
        kc.execute(cell)
        time.sleep(3.0)
        first = set(sent(server))
        assert 0 < len(first) < rows
        kernel = km.provisioner.process
        os.kill(kernel.pid, signal.SIGKILL)
        kernel.wait(timeout=30)  # reaped: no Popen left to warn when it is collected
        kc.stop_channels()
        km.cleanup_resources()
        km, kc = start()
        server.reset()
        assert "rows 1500 aligned True" in run_cell(kc)
        again = sent(server)
        # in flight (16) and what came since the last commit: about 0.5 s at ~300 rows/s
        assert set(again) >= {f"nb2 {i}" for i in range(rows)} - first and len(set(again) & first) <= 16 + 200
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
