"""Throughput behaviour, checked on what the fake server saw rather than timed.

The fake server records every change of its in-flight count (``GET /_stats`` timeline) and the
arrival time of every request (``GET /_log``), so "the server was never short of work" is a
property we can assert exactly. benchmarks/bench_throughput.py measures the same things in rows/s.

Why ``max_concurrency`` is four times the server's slots here: with exactly ``slots`` requests in
flight, every response leaves its slot empty for one client round trip before the next request
arrives, and with a fixed latency the eight requests started together also finish together, so
the count touches 0 even with a perfect client. A client that keeps a queue at the server makes
"never below ``slots`` while rows remain to be sent" strict, and then only a real gap (a batch or
chunk boundary that nothing was sent across) breaks it. A queue three waves deep (150 ms) keeps a
scheduling hiccup of this shared 2-core machine from looking like such a gap.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CHAT
from datasets import Dataset
from fake_server import FakeServer

from vllm_generator import vllm_generate
from vllm_generator.client import Client
from vllm_generator.recipe import load_recipe
from vllm_generator.run import RunSummary, run_recipe
from vllm_generator.wire import parse_response

SLOTS = 8
LATENCY = 0.05
CONCURRENCY = 4 * SLOTS


def prompts(n: int) -> list[str]:
    return [f"row {i}" for i in range(n)]


def arrivals(server: FakeServer) -> dict[str, float]:
    """When each generation request arrived, by prompt (each prompt is sent once)."""
    log = [e for e in server.log() if e["path"] == CHAT]
    sent = {e["body"]["messages"][-1]["content"]: e["t"] for e in log}
    assert len(sent) == len(log), "a row was sent twice"
    return sent


def dips(timeline: list[list[float]], start: float, end: float, slots: int = SLOTS) -> list[tuple[float, int]]:
    """Changes of the in-flight count below ``slots`` from the first time it reaches ``slots`` at
    or after ``start``, up to ``end`` (the arrival of the last row that had to be sent)."""
    full = next((t for t, n in timeline if t >= start and n >= slots), None)
    assert full is not None and full <= end, f"the server never had {slots} requests in flight"
    return [(t, int(n)) for t, n in timeline if full <= t <= end and n < slots]


def run(tmp_path: Path, urls: list[str], rows: int, **processing: Any) -> RunSummary:
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts(rows)}), data)
    recipe = tmp_path / "recipe.yaml"
    raw = {
        "data": {"input": {"path": str(data)}, "output": {"path": str(tmp_path / "out.parquet")}},
        "model": {"base_url": urls},
        "processing": {"batch_size": 16, "chunk_size": 64, "max_concurrency": CONCURRENCY, **processing},
    }
    recipe.write_text(yaml.safe_dump(raw))
    summary = run_recipe(load_recipe(recipe), progress=False)
    out = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert out["response"] == [f"echo: {p}" for p in prompts(rows)]
    return summary


@pytest.fixture
def timed_server(start_fake_server: Callable[..., FakeServer]) -> FakeServer:
    return start_fake_server("--slots", str(SLOTS), "--latency", str(LATENCY))


def test_a_recipe_keeps_the_server_full_across_batches_and_chunks(tmp_path: Path, timed_server: FakeServer) -> None:
    # 400 rows: 25 batches of 16 in 7 chunks of 64; each boundary is a place where map waits
    run(tmp_path, [timed_server.url], 400)
    sent = arrivals(timed_server)
    assert len(sent) == 400
    found = dips(timed_server.stats()["timeline"], 0.0, max(sent.values()))
    assert found == [], f"the server had fewer than {SLOTS} requests while rows remained: {found[:10]}"


def test_a_slow_row_does_not_hold_back_the_rows_after_it(tmp_path: Path, timed_server: FakeServer) -> None:
    # one row of the first batch takes 40 times the others (a long reasoning trace): map waits
    # for it, and the rows of the later batches and chunks keep the server full meanwhile
    rows = prompts(400)
    rows[3] += " [[sleep:2]]"
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": rows}), data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"input": {"path": str(data)}, "output": {"path": str(tmp_path / "out.parquet")}},
        "model": {"base_url": timed_server.url},
        "processing": {"batch_size": 16, "chunk_size": 64, "max_concurrency": CONCURRENCY},
    }))  # fmt: skip
    run_recipe(load_recipe(recipe), progress=False)
    assert pq.read_table(tmp_path / "out.parquet").column("response").to_pylist() == [f"echo: {p}" for p in rows]

    log = [e for e in timed_server.log() if e["path"] == CHAT]
    sent = {e["body"]["messages"][-1]["content"]: e["t"] for e in log}
    assert len(sent) == len(log) == 400
    slow_done = sent[rows[3]] + 2.0
    # at most 8 slots x 2 s / 50 ms = 320 rows fit in the slow row's time; without look-ahead, 16 would
    assert sum(t < slow_done for t in sent.values()) > 200
    last_needed = max(sent.values())
    found = dips(timed_server.stats()["timeline"], 0.0, last_needed)
    assert found == [], f"fewer than {SLOTS} in flight while rows remained: {found[:10]}"


def test_without_look_ahead_the_server_drains_at_every_batch(tmp_path: Path, timed_server: FakeServer) -> None:
    # the control for the test above: the same check finds the batch barrier when nothing feeds it
    run(tmp_path, [timed_server.url], 160, lookahead=0)
    sent = arrivals(timed_server)
    timeline = timed_server.stats()["timeline"]
    found = dips(timeline, 0.0, max(sent.values()))
    empty = [t for t, n in timeline if n == 0 and t < max(sent.values())]
    # map sends batch k+1 only after batch k's last answer: the server empties between batches
    assert len(empty) >= 160 // 16 - 1 and found


def test_a_plain_map_keeps_the_server_full_within_each_batch(timed_server: FakeServer) -> None:
    batch_size, rows = 64, 256
    generate = vllm_generate(timed_server.url, max_concurrency=CONCURRENCY)
    # open the client's connections first: their set-up is not what this test is about, and on a
    # busy machine it can hold back the first requests of the first batch
    Dataset.from_dict({"prompt": [f"warm {i}" for i in range(CONCURRENCY)]}).map(generate, batched=True)
    timed_server.reset()
    ds = Dataset.from_dict({"prompt": prompts(rows)})
    out = ds.map(generate, batched=True, batch_size=batch_size)
    assert out["response"] == [f"echo: {p}" for p in prompts(rows)]

    sent = arrivals(timed_server)
    timeline = timed_server.stats()["timeline"]
    for first in range(0, rows, batch_size):
        batch = [sent[p] for p in prompts(rows)[first : first + batch_size]]
        found = dips(timeline, min(batch), max(batch))
        assert found == [], f"batch at row {first}: fewer than {SLOTS} in flight while its rows remained: {found[:10]}"
    # and between batches the barrier empties it: what run_recipe's look-ahead is for
    empty = [t for t, n in timeline if n == 0 and t < max(sent.values())]
    assert len(empty) >= rows // batch_size - 1


def test_two_servers_both_stay_full_and_the_faster_gets_more_rows(tmp_path: Path, start_fake_server: Callable[..., FakeServer]) -> None:
    fast = start_fake_server("--slots", str(SLOTS), "--latency", "0.05")
    slow = start_fake_server("--slots", str(SLOTS), "--latency", "0.15")
    rows = 480
    run(tmp_path, [fast.url, slow.url], rows)

    sent_fast, sent_slow = arrivals(fast), arrivals(slow)
    assert len(sent_fast) + len(sent_slow) == rows and not set(sent_fast) & set(sent_slow)
    last = max(*sent_fast.values(), *sent_slow.values())
    for name, server in (("fast", fast), ("slow", slow)):
        found = dips(server.stats()["timeline"], 0.0, last)
        assert found == [], f"the {name} server had fewer than {SLOTS} in flight while rows remained: {found[:10]}"
    # both full all along: rows split as their speeds, 3 to 1
    assert len(sent_fast) > 2 * len(sent_slow), (len(sent_fast), len(sent_slow))


def test_rows_waiting_to_be_retried_do_not_hold_slots(fake_server: FakeServer) -> None:
    # four rows are refused once and told to come back in 0.5 s; with four slots, the other rows
    # must use them meanwhile rather than wait behind the sleeping ones
    retried = [f"slow {i} [[429]][[retry_after:0.5]]" for i in range(4)]
    others = [f"row {i}" for i in range(40)]
    generate = vllm_generate(fake_server.url, max_concurrency=4)
    out = Dataset.from_dict({"prompt": retried + others}).map(generate, batched=True, batch_size=44)
    assert out["error"] == [None] * 44

    log = [e for e in fake_server.log() if e["path"] == CHAT]
    times = collections.defaultdict(list)
    for e in log:
        times[e["body"]["messages"][-1]["content"]].append(e["t"])
    assert all(len(times[p]) == 2 for p in retried)
    first_refusal = min(times[p][0] for p in retried)
    first_retry = min(times[p][1] for p in retried)
    assert first_retry - first_refusal >= 0.45
    during = [t for p in others for t in times[p] if first_refusal < t < first_retry]
    assert len(during) > 4, "rows waited while the refused ones slept"


def test_a_cancelled_batch_sends_no_more_rows_and_aborts_those_in_flight(start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--slots", "4")
    client = Client([server.url], max_concurrency=4, timeout=30)
    parse = partial(parse_response, chat=True, n=1, parse_reasoning=True, want_logprobs=False)
    hanging = [{"messages": [{"role": "user", "content": f"row {i} [[hang]]"}]} for i in range(20)]
    future = client.submit(CHAT, hanging, parse)
    deadline = time.monotonic() + 10
    while server.stats()["in_flight"] < 4:
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.01)
    future.cancel()
    while server.stats()["in_flight"] > 0:
        assert time.monotonic() < deadline, "requests of the cancelled batch are still in flight"
        time.sleep(0.01)
    time.sleep(0.1)
    assert server.stats()["requests"] == 4  # the 16 queued rows were never sent

    # the pool serves the next batch
    bodies = [{"messages": [{"role": "user", "content": f"row {i}"}]} for i in range(10)]
    results = client.submit(CHAT, bodies, parse).result(timeout=10)
    assert [r.response for r in results] == [f"echo: row {i}" for i in range(10)]
    assert client.unfinished == 0
    client.close()
