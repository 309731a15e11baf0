"""The in-flight controller (adaptive.py) as plain logic: load reports in, targets out.

A simulated server stands in for vLLM here: ``slots`` sequences run, the rest of what the clients
keep in flight waits, and each report may trail the truth by ``lag`` seconds. The client-side
tests against the fake server's real HTTP reports are in test_client_adaptive.py.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CHAT, MakeClient, cli, write_recipe
from fake_server import FakeServer

from vllm_generator.adaptive import (
    FAST_POLL,
    MAX_TARGET,
    QUICK_POLL,
    RAMP_POLL,
    SLOW_POLL,
    START_TARGET,
    UNREPORTED_TARGET,
    Controller,
    Load,
    parse_metrics,
    queue_allowance,
)
from vllm_generator.client import Client
from vllm_generator.wire import Result, parse_response

METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 100.0
vllm:num_requests_running{engine="1",model_name="m"} 28.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 999.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 4.0
"""


def test_parse_metrics_sums_the_engines_and_skips_everything_else() -> None:
    assert parse_metrics(METRICS) == Load(running=128.0, waiting=8.0, kv_cache=0.75)


def test_parse_metrics_without_the_gauges_is_none() -> None:
    assert parse_metrics(b"") is None
    assert parse_metrics(b"# a Prometheus exporter of something else\nprocess_cpu_seconds_total 3.0\n") is None
    assert parse_metrics(b"<html>not found</html>") is None
    # unlabelled gauges, as a single-engine exporter may write them; a NaN is no reading
    assert parse_metrics(b"vllm:num_requests_running 3\nvllm:num_requests_waiting NaN\n") == Load(3.0, 0.0, None)


class SimServer:
    """``slots`` run; what clients keep in flight beyond that waits; reports trail by ``lag`` s."""

    def __init__(self, slots: int, lag: float = 0.0) -> None:
        self.slots = slots
        self.lag = lag
        self.history: collections.deque[tuple[float, Load]] = collections.deque()

    def load(self, demand: int) -> Load:
        running = min(demand, self.slots)
        return Load(float(running), float(demand - running), running / self.slots)

    def report(self, now: float, demand: int) -> Load:
        self.history.append((now, self.load(demand)))
        while len(self.history) > 1 and self.history[1][0] <= now - self.lag:
            self.history.popleft()
        at, load = self.history[0]
        return load if at <= now - self.lag else Load(0.0, 0.0, 0.0)  # a cold start's zeros


def run(controllers: list[Controller], server: SimServer, seconds: float, start: float = 0.0, rows: int | None = None) -> list[int]:
    """Each controller's client keeps its target in flight (or ``rows``), polled every FAST_POLL;
    returns the total in flight at each report."""
    totals = []
    now = start
    while now < start + seconds:
        ours = [c.target if rows is None else min(rows, c.target) for c in controllers]
        demand = sum(ours)
        totals.append(demand)
        for control, mine in zip(controllers, ours, strict=True):
            control.observe(server.report(now, demand), mine, now)
        now += FAST_POLL
    return totals


@pytest.mark.parametrize("slots", [4, 16, 64, 128, 256, 1024, 3000])
def test_the_target_settles_within_a_quarter_of_the_slots(slots: int) -> None:
    control = Controller("s")
    run([control], SimServer(slots), 10.0)

    assert control.state == "hold"
    assert slots <= control.target <= max(slots * 1.25, slots + 2 * queue_allowance(slots))
    assert control.settled is not None and control.max_target <= 2 * max(slots, START_TARGET)


def test_the_ramp_doubles_per_report_then_grows_by_half_and_reaches_1024_slots_in_seconds() -> None:
    control = Controller("s")
    totals = run([control], SimServer(1024), 3.0)

    # by half from 256 up: the step past the slots queues 272 there, not the 1,024 of 2,048
    assert totals[:8] == [32, 64, 128, 256, 384, 576, 864, 1296]
    assert control.max_target == 1296
    assert totals.index(next(t for t in totals if t >= 1024)) * FAST_POLL <= 1.5
    assert 1024 <= control.target <= 1024 + queue_allowance(1024) * 2


def test_the_target_follows_a_capacity_change_down_then_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm_generator")
    control = Controller("s")
    server = SimServer(512)
    run([control], server, 5.0)
    assert 512 <= control.target <= 512 * 1.25

    server.slots = 128
    run([control], server, 2.0, start=5.0)
    assert 128 <= control.target <= 128 * 1.25
    assert any("target" in r.getMessage() and "-> " in r.getMessage() for r in caplog.records)

    server.slots = 600
    run([control], server, 10.0, start=7.0)
    assert 600 <= control.target <= 600 * 1.25


def test_a_client_without_rows_to_fill_its_target_does_not_raise_it() -> None:
    control = Controller("s")
    run([control], SimServer(1024), 5.0, rows=20)
    assert control.target == START_TARGET


def test_lagging_reports_do_not_drive_the_target_below_the_slots() -> None:
    control = Controller("s")
    targets = []
    server = SimServer(100, lag=5.0)  # longer than the grace period
    for second in range(30):
        run([control], server, 1.0, start=float(second))
        targets.append(control.target)

    # the cold start's zeros: the safe default after a grace period, then the real reports
    assert max(targets) >= UNREPORTED_TARGET
    assert all(100 <= t <= 125 for t in targets[-10:]), targets


def test_requests_held_in_a_slow_front_end_do_not_pass_for_cold_gauges(caplog: pytest.LogCaptureFixture) -> None:
    # a CPU-starved vLLM: its engine runs 16, the rest of ours wait in its front end, which the
    # gauges do not count; they are live (not a cold start's zeros), so no jump to the safe default
    control = Controller("s")
    for step in range(100):
        control.observe(Load(running=16.0, waiting=0.0), ours=30, now=step * 0.1)  # the target 32, nearly filled
    assert control.target == START_TARGET and control.max_target == START_TARGET
    # said once, with what to do
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "show 16 requests, fewer than our 30 in flight, for 3 s: holding 32" in warning and "set max_concurrency" in warning


def test_answers_a_busy_client_has_not_read_yet_are_no_room_on_the_server() -> None:
    # settled at 70 on 64 slots; the client's loop is late to read 12 answers, so the server runs
    # 64 with an empty queue while 76 are "in flight" here: no raise (they would all queue)
    control = Controller("s")
    control.state, control.target, control.settled = "hold", 76, 70
    for step in range(20):
        control.observe(Load(running=64.0, waiting=0.0), ours=76, now=step * 0.2)
    assert control.target == 76
    # the same server runs all 76 with nothing waiting: it has grown, and the target follows
    for step in range(20, 24):
        control.observe(Load(running=76.0, waiting=0.0), ours=control.target, now=step * 0.2)
    assert control.target > 76


def test_idle_slots_a_busy_client_has_not_refilled_are_not_room_another_client_left() -> None:
    # settled at 277 on 256 slots, with the server's slots all run before; a CPU-bound client
    # late to read its answers and send more: the server runs 114 of ours, none wait, while 277
    # are "in flight" here. The slots are not free for long: the target grows by the allowance
    # at most, not by the 142 idle slots (277 -> 419 did, and they all queued)
    control = Controller("s")
    run([control], SimServer(256), 10.0)
    assert control.state == "hold" and control.target <= 256 + 2 * queue_allowance(256)
    before = control.target
    for step in range(4):
        control.observe(Load(running=114.0, waiting=0.0), ours=before, now=10.0 + step * 0.2)
    assert control.target <= before + queue_allowance(256)


def test_a_queue_while_the_server_runs_nothing_is_no_sign_of_its_slots() -> None:
    # vLLM compiling a structured output's grammar: the first requests all wait and none run
    # (the quickstart's structured recipe: "it runs 0, 12 wait" cut 32 -> 16 -> 8 -> 4)
    control = Controller("s")
    for step in range(10):
        control.observe(Load(running=0.0, waiting=32.0), ours=32, now=step * 0.05)
    assert control.state == "ramp" and control.target == START_TARGET
    # then it runs them: the ramp goes on from where it was
    for step in range(10, 13):
        control.observe(Load(running=float(control.target), waiting=0.0), ours=control.target, now=step * 0.05)
    assert control.target > START_TARGET


def test_two_clients_on_one_server_share_it_without_a_long_queue() -> None:
    a, b = Controller("s"), Controller("s")
    server = SimServer(256)
    totals = run([a, b], server, 20.0)

    assert 256 <= totals[-1] <= 256 * 1.3
    assert min(a.target, b.target) >= 256 * 0.25  # neither starves


def test_a_client_that_leaves_a_shared_server_leaves_its_room_to_the_other() -> None:
    # two map workers share 256 slots, and one runs out of rows: the other fills the server at
    # once (a second of reports), not by the allowance every two reports (4 s)
    a, b = Controller("s"), Controller("s")
    server = SimServer(256)
    run([a, b], server, 20.0)
    assert a.target <= 256 * 0.75 and b.target <= 256 * 0.75  # each had its share
    run([a], server, 1.0, start=20.0)
    assert 256 <= a.target <= 256 * 1.25


def test_a_refusal_with_most_of_the_target_in_flight_caps_it_for_a_while() -> None:
    control = Controller("s")
    control.target = 200
    control.state = "hold"
    assert control.refused(150, now=100.0)
    assert control.target == 150 and control.refusals == 1
    run([control], SimServer(1000), 20.0, start=100.0)  # nothing waits: it would rise, but for the refusal
    assert control.target == 150
    run([control], SimServer(1000), 10.0, start=131.0)  # 30 s later it probes above again
    assert control.target > 150


def test_a_burst_of_refusals_with_little_in_flight_halves_the_target_once() -> None:
    control = Controller("s")
    control.target = 64
    assert control.refused(3, now=10.0)
    assert control.target == 32
    assert not any(control.refused(2, now=10.0 + i / 100) for i in range(50))  # the same burst
    assert control.target == 32
    assert control.refused(2, now=12.0) and control.target == 16  # a new burst


def test_a_server_that_reports_nothing_gets_the_safe_default(caplog: pytest.LogCaptureFixture) -> None:
    control = Controller("http://h:8000")
    assert control.unreported("/metrics answered 404")
    assert control.target == UNREPORTED_TARGET and not control.reported and control.state == "unreported"
    assert "reports no load (/metrics answered 404)" in caplog.text


def test_a_fixed_target_never_moves() -> None:
    control = Controller("s", fixed=40)
    run([control], SimServer(1000), 5.0)
    control.refused(40, 1.0)
    control.restart()
    assert control.target == 40 and control.state == "fixed"
    assert control.reports > 0 and control.summary()["max_concurrency"] == 40


def test_a_server_back_in_rotation_ramps_again() -> None:
    control = Controller("s")
    run([control], SimServer(1024), 5.0)
    assert control.target > 1024
    control.restart()
    assert control.target == START_TARGET and control.state == "ramp"
    run([control], SimServer(64), 5.0, start=10.0)
    assert 64 <= control.target <= 80


def test_targets_stay_below_the_ceiling() -> None:
    control = Controller("s")
    run([control], SimServer(10 * MAX_TARGET), 10.0)
    assert control.target == MAX_TARGET


def test_queue_allowance_is_short() -> None:
    assert queue_allowance(0) == 4 and queue_allowance(16) == 4
    assert queue_allowance(1024) == math.ceil(1024 * 0.08)


# --------------------------------------------------------------------------- against the fake server's real reports


PARSE = functools.partial(parse_response, chat=True, n=1, parse_reasoning=True, want_logprobs=False)


def send_all(client: Client, prompts: list[str]) -> list[Result]:
    results = client.submit(CHAT, [{"messages": [{"role": "user", "content": p}]} for p in prompts], PARSE).result(timeout=120)
    assert [r.error for r in results] == [None] * len(prompts)
    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    return results


def queue_quantile(server: FakeServer, q: float, after: float = 0.0, before: float = math.inf, running: bool = False) -> float:
    """The ``q`` quantile of the server's queue (or running count) over time, each value weighted by
    how long it held, from ``after`` to ``before`` seconds after the first request."""
    timeline = [(t, busy if running else waiting) for t, busy, waiting in server.stats()["queue_timeline"]]
    start = timeline[0][0] + after
    spans: list[tuple[float, float]] = []  # (waiting, seconds)
    for (t0, waiting), (t1, _) in itertools.pairwise(timeline):
        lo, hi = max(t0, start), min(t1, timeline[0][0] + before)
        if hi > lo:
            spans.append((waiting, hi - lo))
    total = sum(d for _, d in spans)
    acc = 0.0
    for waiting, seconds in sorted(spans):
        acc += seconds
        if acc >= q * total:
            return waiting
    return 0.0


def test_the_target_settles_on_the_server_s_slots_with_a_short_queue(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient
) -> None:
    server = start_fake_server("--slots", "64", "--latency", "0.05")
    client = make_client(server.url)
    send_all(client, [f"q {i}" for i in range(4000)])

    control = client.servers[0].control
    assert control.state == "hold" and 64 <= control.target <= 80
    stats = server.stats()
    assert stats["max_running"] == 64 and stats["metrics_requests"] > 0
    assert queue_quantile(server, 0.95, after=1.0) <= 64 * 0.25


def test_admission_503s_lower_the_target_and_cost_no_attempt(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    # vLLM's --max-num-queued-reqs 24: running + waiting above 24 is refused with a 503
    server = start_fake_server("--slots", "16", "--latency", "0.05", "--max-queued", "24")
    client = make_client(server.url, attempts=1)  # a refusal that spent an attempt would fail its row
    results = send_all(client, [f"q {i}" for i in range(1500)])

    assert all(r.attempts == 1 for r in results)
    stats = server.stats()
    assert 0 < stats["rejected"] < 200  # the target came down to what the server takes, and stayed there
    assert stats["max_running"] == 16
    assert client.servers[0].control.target <= 24 and client.stats.retries == 0
    assert sum("refuses requests" in r.getMessage() for r in caplog.records) <= 3


def test_a_server_that_reports_nothing_gets_256_in_flight(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    server = start_fake_server("--no-metrics", "--latency", "0.2")
    client = make_client(server.url)
    send_all(client, [f"q {i}" for i in range(1200)])

    assert client.servers[0].control.target == UNREPORTED_TARGET
    assert server.stats()["max_in_flight"] == UNREPORTED_TARGET
    assert sum("reports no load (/metrics answered 404)" in r.getMessage() for r in caplog.records) == 1


def test_the_queue_settles_after_the_server_loses_slots_mid_run(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient
) -> None:
    server = start_fake_server("--slots", "256", "--latency", "0.1", "--slots-schedule", "1.5:64")
    client = make_client(server.url)
    send_all(client, [f"q {i}" for i in range(7500)])  # about 6 s after the drop

    control = client.servers[0].control
    assert 64 <= control.target <= 64 * 1.25  # settled within a quarter of the slots
    assert control.max_target >= 256
    # the queue grew just after the change; 3 s after it, it is short again: at most a quarter
    # of the slots at the 95th percentile (up to the last 0.5 s, when our rows run out)
    timeline = server.stats()["queue_timeline"]
    end = timeline[-1][0] - timeline[0][0]
    assert end > 6.0, "too few rows after the drop to judge the settled queue"
    assert queue_quantile(server, 1.0, after=1.5, before=3.0) > 64
    assert queue_quantile(server, 0.95, after=4.5, before=end - 0.5) <= 64 * 0.25


def test_two_unequal_servers_each_get_their_own_batch(start_fake_server: Callable[..., FakeServer], make_client: MakeClient) -> None:
    # 100 ms: the big one's 960 rows/s leave this machine's CPU room (a busy CI machine too)
    big = start_fake_server("--slots", "96", "--latency", "0.1")
    small = start_fake_server("--slots", "16", "--latency", "0.1")
    client = make_client([big.url, small.url])
    send_all(client, [f"q {i}" for i in range(6000)])

    big_control, small_control = (s.control for s in client.servers)
    assert 96 <= big_control.target <= 96 * 1.5 and 16 <= small_control.target <= 24
    assert big.stats()["max_running"] == 96 and small.stats()["max_running"] == 16
    assert queue_quantile(big, 0.95, after=1.0) <= 96 * 0.25 and queue_quantile(small, 0.95, after=1.0) <= 16
    # rows went where the room was: about 6 to 1 (less while both ramp)
    assert big.stats()["requests"] > 3 * small.stats()["requests"]


def test_a_server_killed_and_restarted_ramps_again(start_fake_server: Callable[..., FakeServer], make_client: MakeClient) -> None:
    server = start_fake_server("--slots", "64", "--latency", "0.05")
    client = make_client(server.url)
    future = client.submit(CHAT, [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(12000)], PARSE)
    deadline = time.monotonic() + 10
    while client.servers[0].control.state != "hold" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.servers[0].control.state == "hold"
    server.restart("--slots", "16", "--latency", "0.05", down=0.5)

    results = future.result(timeout=120)
    assert [r.error for r in results] == [None] * len(results)
    control = client.servers[0].control
    assert 16 <= control.target <= 24  # it found the new server's slots
    # the new server saw a ramp from the start target, not the old target at once
    first = [n for _t, n in server.stats()["timeline"][:200]]
    assert max(first[:50]) <= START_TARGET


@pytest.mark.parametrize(
    ("args", "full", "queue"),
    [(("--engines", "2"), 0.2, 0.25), (("--metrics-lag", "1"), 0.5, 0.25)],
    ids=["two-engines", "lagging-gauges"],
)
def test_per_engine_or_lagging_reports_still_fill_the_slots(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, args: tuple[str, str], full: float, queue: float
) -> None:
    server = start_fake_server("--slots", "64", "--latency", "0.05", *args)
    client = make_client(server.url)
    send_all(client, [f"q {i}" for i in range(12000)])

    stats = server.stats()
    assert stats["max_running"] == 64 and 64 <= client.servers[0].control.target <= 96
    # once ramped (paced by the reports' lag: a few seconds with 1 s-old gauges), the batch is
    # nearly full at least ``1 - full`` of the time, and the queue short (the run's end aside);
    # 1 s-old gauges make the target swing: full at the median (queue p95 6 to 12 of 64 here,
    # under two busy loops too)
    end = stats["queue_timeline"][-1][0] - stats["queue_timeline"][0][0]
    assert queue_quantile(server, full, after=6.0, before=end - 1.0, running=True) >= 64 * 0.85
    assert queue_quantile(server, 0.95, after=6.0) <= 64 * queue


def test_the_command_shows_and_records_each_server_s_target_and_queue(tmp_path: Path, start_fake_server: Callable[..., FakeServer]) -> None:
    server = start_fake_server("--slots", "16", "--latency", "0.05")
    pq.write_table(pa.table({"question": [f"question {i}" for i in range(1500)]}), tmp_path / "in.parquet")
    write_recipe(tmp_path, server.url, processing={"chunk_size": 1500, "batch_size": 500})
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    # the bar's last line, and the log's line when the target settled
    assert re.search(r"in flight \(target (1[6-9]|2[0-4]), queue \d+\)", result.stderr), result.stderr[-2000:]
    assert re.search(r"target settled at (1[6-9]|2[0-4]) in flight \(the server queues: it runs 16, \d+ wait\)", result.stderr)
    (summary,) = json.loads((tmp_path / "out" / "answers.metrics.json").read_text())["servers"]
    assert summary["url"] == server.url and summary["state"] == "hold" and 16 <= summary["target"] <= 24
    assert summary["settled_target"] is not None and summary["peak_queue"] >= 0 and summary["reports"] > 0


def test_targets_stay_below_the_open_file_limit_and_reports_come_as_often_as_the_ramp_needs() -> None:
    control = Controller("s", max_target=300)
    run([control], SimServer(10_000), 10.0)
    assert control.target == 300

    stalled = Controller("s")
    run([stalled], SimServer(1024), 5.0, rows=20)  # our rows cannot fill even the start target
    assert stalled.state == "ramp" and stalled.poll_interval(now=5.0) == SLOW_POLL
    fresh = Controller("s")
    assert fresh.poll_interval(now=0.0) == RAMP_POLL  # no report yet
    assert fresh.observe(Load(running=32, waiting=0), ours=32, now=1.0) and fresh.target == 64
    # a ramp step is seen as soon as its requests reach the server: quick reports for a moment
    assert fresh.poll_interval(now=1.05) == QUICK_POLL and fresh.poll_interval(now=1.2) == RAMP_POLL

    # once settled, fast reports for 1 s after each change, then one a second: each costs the
    # server's front end milliseconds (a CPU server's only core)
    small = Controller("s")
    assert small.observe(Load(running=16, waiting=16), ours=32, now=1.0) and small.state == "hold"
    assert small.poll_interval(now=1.9) == FAST_POLL and small.poll_interval(now=2.1) == SLOW_POLL
    # ... or for three times the reports' lag, when they trail by more: the change shows later
    lagging = Controller("s")
    assert lagging.observe(Load(running=32, waiting=0), ours=32, now=1.0) and lagging.target == 64
    assert not lagging.observe(Load(running=32, waiting=0), ours=64, now=1.05)  # not in the reports yet
    assert lagging.observe(Load(running=64, waiting=0), ours=64, now=1.65) and lagging.target == 128  # 0.6 s later
    assert lagging.observe(Load(running=64, waiting=64), ours=128, now=1.7) and lagging.state == "hold"
    # (the lag estimate: 0.45 s, the 0.6 s sample's weight less for the next one's 0)
    assert lagging.poll_interval(now=2.9) == FAST_POLL and lagging.poll_interval(now=3.2) == SLOW_POLL


def test_map_workers_of_one_run_share_a_server_without_a_long_queue(tmp_path: Path, start_fake_server: Callable[..., FakeServer]) -> None:
    # processing.num_proc 2: two processes, a controller each, one server; each sees the other's
    # requests only in the server's queue, and the share rule converges them together
    server = start_fake_server("--slots", "64", "--latency", "0.1")
    questions = [f"question {i}" for i in range(6000)]
    pq.write_table(pa.table({"question": questions}), tmp_path / "in.parquet")
    write_recipe(tmp_path, server.url, processing={"chunk_size": 6000, "batch_size": 3000, "num_proc": 2})
    result = cli("run", "recipe.yaml", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    out = pq.read_table(tmp_path / "out" / "answers.parquet").to_pydict()
    assert out["response"] == ["echo: " + q for q in questions] and out["error"] == [None] * 6000
    stats = server.stats()
    assert stats["max_running"] == 64 and stats["requests"] == 6000
    # both workers ramp to 128 at first (256 at the server); once they have seen it queue, the
    # batch is full and the queue short, until the rows run out. Two clients whose reports come
    # at different moments let the queue grow between them more than one does: p95 5 to 22 of
    # 64 measured here over ten runs (one client: 6 to 12), hence a bound above the 25 %
    end = stats["queue_timeline"][-1][0] - stats["queue_timeline"][0][0]
    assert end > 6.0, "too few rows to judge the settled queue"
    assert queue_quantile(server, 0.5, after=3.0, before=end - 1.0, running=True) == 64
    assert queue_quantile(server, 0.95, after=3.0, before=end - 1.0) <= 64 * 0.375
