"""The client: unit tests without a server (routing, backoff, the request-timeout watchdog), then
``Client`` against the fake vLLM server as a real subprocess, asserting on what the server received
(``FakeServer.log``).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import aiohttp
import pytest
from conftest import CHAT, MakeClient, received
from fake_server import BlackHole, FakeServer

from vllm_generator import GenerationError, RecipeError, ServerUnavailableError, vllm_generate
from vllm_generator.client import Client, _Route, _Router, _Watchdog, run_on_loop
from vllm_generator.errors import RowFailedError
from vllm_generator.recipe import RetryConfig
from vllm_generator.wire import Result, RetryableError, parse_response

# --------------------------------------------------------------------------- routing and backoff (no I/O)


def refusal(server: Any) -> RetryableError:
    return RetryableError(f"cannot connect to {server.name}", "connection", refused=True, server=server)


def test_pick_server_prefers_the_least_busy_server_in_rotation() -> None:
    client = Client(["http://a:1", "http://b:2", "http://c:3"])
    a, b, c = client.servers
    a.in_flight, b.in_flight, c.in_flight = 5, 2, 3
    assert client.router.pick() is b
    b.down_since = time.monotonic()
    assert client.router.pick() is c


def test_with_every_server_down_pick_gives_the_one_down_longest() -> None:
    # rows wait for a server to come back (wait_up); one that got past the wait as the last
    # server went down is sent to the one that left first
    client = Client(["http://a:1", "http://b:2", "http://c:3"])
    a, b, c = client.servers
    now = time.monotonic()
    a.down_since, b.down_since, c.down_since = now - 20, now - 50, now - 40
    assert client.router.pick() is b


def test_three_refusals_take_a_server_down_and_send_its_rows_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    router = _Router(["http://a:1", "http://b:2"], max_outage=600)
    a, b = router.servers
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    # a refusal is never the row's failure: the row goes straight to another try
    assert router.failed(a, refusal(a), row=1) is True
    assert router.failed(a, refusal(a), row=1) is True
    assert a.down_since is None
    assert router.pick() is b  # a refused a second ago: it goes last
    assert router.failed(a, refusal(a), row=1) is True
    assert a.down_since is not None and router.pick() is b
    assert [r.getMessage() for r in caplog.records] == [
        "cannot connect to http://a:1; trying another server",  # the first refusal of a run of them
        "http://a:1 is down (cannot connect to http://a:1): its rows go to http://b:2; probing it every 1s",
    ]


def test_one_row_failing_again_and_again_does_not_take_a_server_down() -> None:
    router = _Router(["http://a:1"], max_outage=600)
    (a,) = router.servers
    failure = RetryableError("500 from http://a:1", "http_500", server=a)
    assert [router.failed(a, failure, row=7) for _ in range(5)] == [False] * 5  # charged to the row
    assert a.down_since is None
    # three different rows in a row (7, 8, 9), with no success between: the server's failure
    assert [router.failed(a, failure, row=r) for r in (8, 9)] == [False, True]
    assert a.down_since is not None
    assert router.failed(a, failure, row=10) is True  # down: not charged


def test_a_success_between_failures_keeps_a_server_up() -> None:
    router = _Router(["http://a:1"], max_outage=600)
    (a,) = router.servers
    failure = RetryableError("502 from http://a:1", "http_502", server=a)
    for row in range(10):
        assert router.failed(a, failure, row=row) is False
        router.answered(a) if row % 2 else None
    assert a.down_since is None


def test_only_the_server_s_kind_of_failure_counts_against_it() -> None:
    router = _Router(["http://a:1"], max_outage=600)
    (a,) = router.servers
    for kind in ("timeout", "bad_body", "http_408", "client_error"):
        for row in range(5):
            assert router.failed(a, RetryableError(kind, kind, server=a), row=row) is False
    assert a.down_since is None and a.failing == set()


def test_the_only_server_down_makes_rows_wait_until_the_outage_limit() -> None:
    async def main() -> tuple[float, str]:
        client = Client(["http://a:1"], retry=RetryConfig(max_outage=0.3))
        (a,) = client.servers
        for _ in range(3):
            client.router.failed(a, refusal(a), row=1)
        started = time.monotonic()
        try:
            await client.router.wait_up(row=1, waiting_since=None)
        except ServerUnavailableError as err:
            return time.monotonic() - started, str(err)
        finally:
            await client.aclose()
        return time.monotonic() - started, ""

    took, message = asyncio.run(main())
    assert 0.25 <= took < 2.0
    assert message == (
        "no server answered for 0.3s (http://a:1: cannot connect to http://a:1): the rows answered so far are kept; "
        "start the server and run the same command again (raise retry.max_outage to wait longer)"
    )


def test_a_server_back_wakes_the_waiting_rows_at_once() -> None:
    async def main() -> float:
        client = Client(["http://a:1"], retry=RetryConfig(max_outage=30))
        (a,) = client.servers
        for _ in range(3):
            client.router.failed(a, refusal(a), row=1)
        asyncio.get_running_loop().call_later(0.2, client.router.probe_answered, a)
        started = time.monotonic()
        await client.router.wait_up(row=1, waiting_since=None)
        await client.aclose()
        return time.monotonic() - started

    assert asyncio.run(main()) < 1.0


def test_a_server_whose_trials_keep_failing_still_ends_at_the_outage_limit() -> None:
    # /health answers (half-open) but every trial fails the server's way: the row's clock runs on
    async def main() -> tuple[float, int]:
        client = Client(["http://a:1"], retry=RetryConfig(max_outage=0.5))
        router = client.router
        (a,) = client.servers
        failure = RetryableError("500 from http://a:1", "http_500", server=a)
        for row in (1, 2, 3):
            router.failed(a, failure, row)
        trials, waiting_since, started = 0, None, time.monotonic()
        try:
            while time.monotonic() - started < 5:
                router.probe_answered(a)  # as the probe does every second, here at once
                trial, waiting_since = await router.wait_up(row=9, waiting_since=waiting_since)
                assert trial is a
                trials += 1
                assert router.failed(a, failure, row=9) is True  # not charged
                await asyncio.sleep(0.01)
        except ServerUnavailableError:
            return time.monotonic() - started, trials
        finally:
            await client.aclose()
        return time.monotonic() - started, trials

    took, trials = asyncio.run(main())
    assert 0.45 <= took < 2.0 and trials > 5


def test_a_cancelled_trial_lets_the_next_row_try() -> None:
    async def main() -> _Route | None:
        client = Client(["http://a:1"], retry=RetryConfig(max_outage=5))
        router = client.router
        (a,) = client.servers
        failure = RetryableError("500", "http_500", server=a)
        for row in (1, 2, 3):
            router.failed(a, failure, row)
        router.probe_answered(a)
        trial, _ = await router.wait_up(row=7, waiting_since=None)
        assert trial is a and a.trial_row == 7
        router.end_trial(a, row=7)  # row 7's attempt was cancelled
        nxt, _ = await asyncio.wait_for(router.wait_up(row=8, waiting_since=None), 1)
        await client.aclose()
        return nxt

    assert asyncio.run(main()) is not None


def test_closing_the_client_forgets_servers_marked_down() -> None:
    async def main() -> tuple[bool, bool]:
        client = Client(["http://a:1"], retry=RetryConfig(max_outage=600))
        (a,) = client.servers
        for _ in range(3):
            client.router.failed(a, RetryableError("x", "connection", refused=True, server=a), row=1)
        down = a.down_since is not None
        await client.aclose()  # its probe is gone: a later batch must not wait for it forever
        return down, a.down_since is None

    assert asyncio.run(main()) == (True, True)


def test_backoff_honours_retry_after_and_otherwise_grows_within_bounds() -> None:
    client = Client(["http://a:1"], retry=RetryConfig(initial_wait=0.5, max_wait=3))
    assert client._backoff(RetryableError("429", "http_429", retry_after=2.5), 1) == 2.5
    # a Retry-After beyond max_wait would stall the row: it is capped
    assert client._backoff(RetryableError("429", "http_429", retry_after=3600.0), 1) == 3.0
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)]:
        waits = [client._backoff(RetryableError("503", "http_503"), attempt) for _ in range(50)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling / 4  # jittered over the range, not stuck at 0


def test_client_repr_hides_the_api_key() -> None:
    client = Client(["http://a:1"], api_key="very-secret-key", model="m")
    assert repr(client) == "Client(['http://a:1'], model='m')"
    assert client._headers["Authorization"] == "Bearer very-secret-key"


def test_client_needs_a_url() -> None:
    with pytest.raises(ValueError, match="^Client needs at least one base URL$"):
        Client([])


# --------------------------------------------------------------------------- Client against the fake server

PARSE = partial(parse_response, chat=True, n=1, parse_reasoning=True, want_logprobs=False)


def chat_bodies(prompts: list[str]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": p}]} for p in prompts]


def send(client: Client, prompts: list[str], **kwargs: Any) -> list[Result]:
    return client.submit(CHAT, chat_bodies(prompts), PARSE, **kwargs).result(timeout=120)


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying")]


# -- one server restarting, all servers out of rotation


def test_a_restart_blip_of_the_only_server_loses_no_row(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_fake_server("--latency", "0.02")
    # backoff ceilings 0.5, 1, 2, 2 s: four jittered waits all but never fit in a 0.1 s blip
    client = make_client(server.url, attempts=5, initial_wait=0.5, max_wait=2.0, max_concurrency=8)
    prompts = [f"row {i}" for i in range(60)]
    caplog.set_level(logging.INFO, logger="vllm_generator")
    futures = []

    def start_the_batch() -> None:
        futures.append(client.submit(CHAT, chat_bodies(prompts), PARSE))
        deadline = time.monotonic() + 60
        while server.stats()["requests"] < 16 and time.monotonic() < deadline:
            time.sleep(0.005)

    # killed mid-batch: in-flight requests dropped, then 0.1 s of refused connections
    server.restart(down=0.1, before_kill=start_the_batch)
    results = futures[0].result(timeout=120)

    assert [r.error for r in results] == [None] * 60
    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    # the blip was real: connections were refused often enough to take the server down, and
    # one line said so, one that it was back
    messages = [r.getMessage() for r in caplog.records]
    down = [m for m in messages if m.startswith(f"{server.url} is down (")]
    back = [m for m in messages if m.startswith(f"{server.url} answers again after ")]
    assert len(down) == 1 and "rows wait for a server to answer (for at most 600s) without spending attempts" in down[0]
    assert len(back) == 1 and back[0].endswith("s: back in rotation")
    # the restarted server got rows, each once, and only rows the first server did not finish
    after = received(server)
    assert after and set(after) <= set(prompts) and set(after.values()) == {1}
    # the rows in flight at the kill spent at most one attempt (the dropped connection); the
    # refusals spent none
    assert client.stats.requests > 60 and client.stats.retries <= 8
    assert all(r.attempts <= 2 for r in results)


def test_rows_wait_out_an_outage_without_spending_attempts_and_stop_at_the_limit(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient
) -> None:
    server = start_fake_server()
    client = make_client(server.url, attempts=2, max_outage=1.0)
    assert [r.response for r in send(client, ["a"])] == ["echo: a"]
    server.kill()
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError) as info:
        send(client, ["b", "c", "d"])
    assert 1.0 <= time.monotonic() - started < 5.0  # waited the outage limit, not two attempts' backoff
    assert str(info.value).startswith(f"no server answered for 1s ({server.url}: cannot connect to {server.url} (")
    assert str(info.value).endswith(
        "the rows answered so far are kept; start the server and run the same command again (raise retry.max_outage to wait longer)"
    )
    assert client.servers[0].down_since is not None

    server.restart()  # the same client (a rerun in a notebook): the probe brings the server back
    assert [r.response for r in send(client, ["e", "f"])] == ["echo: e", "echo: f"]
    assert received(server) == Counter({"e": 1, "f": 1})
    assert client.servers[0].down_since is None


def test_a_dead_server_at_the_start_still_fails_at_once(make_client: MakeClient) -> None:
    server = FakeServer()
    with server:
        server.kill()
    client = make_client(server.url, attempts=5, initial_wait=10.0, max_wait=10.0)
    with pytest.raises(ServerUnavailableError, match=f"^cannot list models at {server.url}/v1/models \\(ClientConnectorError: "):
        send(client, ["a"])
    # one model lookup, no generation attempt and no backoff: the model lookup fails fast
    assert (client.servers[0].refusals, client.stats.requests) == (1, 0)


# -- connect timeouts


def test_a_black_holed_server_costs_the_connect_timeout_and_leaves_the_rotation(
    fake_server: FakeServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = [f"row {i}" for i in range(16)]
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    with BlackHole() as hole:
        # without a connect timeout every attempt sent to the hole would wait the full 300 s
        client = make_client([fake_server.url, hole.url], timeout=300, connect_timeout=0.3, max_concurrency=4)
        results = client.submit(CHAT, chat_bodies(prompts), PARSE).result(timeout=100)

    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    assert received(fake_server) == Counter(prompts)  # each row once, all from the live server
    sent_to_hole = client.stats.requests - len(prompts)
    assert sent_to_hole >= 3 and all(r.attempts == 1 for r in results)  # a refusal spends no attempt
    warned = [r.getMessage() for r in caplog.records if " is down (" in r.getMessage()]
    assert warned == [
        f"{hole.url} is down (cannot connect to {hole.url} (no answer within 0.3s)): its rows go to {fake_server.url}; probing it every 1s"
    ]
    assert retry_lines(caplog) == []


def test_a_black_holed_server_at_the_start_fails_within_the_connect_timeout(make_client: MakeClient) -> None:
    with BlackHole() as hole:
        client = make_client(hole.url, timeout=300, connect_timeout=0.3)
        with pytest.raises(ServerUnavailableError) as info:
            send(client, ["a"])
    assert str(info.value).startswith(f"cannot list models at {hole.url}/v1/models (ConnectionTimeoutError: ")
    assert client.servers[0].refusals == 1  # counted like a refusal


# -- the watchdog alone (no server)


def test_the_watchdog_cancels_an_attempt_at_its_deadline_and_stops_when_idle() -> None:
    async def main() -> tuple[list[bool], float, bool, bool]:
        dog = _Watchdog(0.05)
        seen: list[bool] = []

        async def attempt() -> None:
            task = asyncio.current_task()
            assert task is not None
            dog.arm(task, time.monotonic())
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                seen.append(dog.expired(task))
            finally:
                dog.disarm(task)

        started = time.monotonic()
        await asyncio.create_task(attempt())
        took = time.monotonic() - started
        for _ in range(100):  # its next tick finds nothing armed
            if dog._task is None:
                break
            await asyncio.sleep(0.01)
        idle = dog._task is None
        await asyncio.create_task(attempt())  # a later attempt starts it again
        return seen, took, idle, dog._task is not None

    seen, took, idle, restarted = asyncio.run(main())
    assert seen == [True, True]
    assert 0.05 <= took < 1.0
    assert idle and restarted


def test_a_cancel_from_elsewhere_as_well_wins_over_the_watchdog() -> None:
    async def main() -> tuple[bool, bool]:
        dog = _Watchdog(60)
        seen: list[bool] = []
        ready = asyncio.Event()

        async def attempt() -> None:
            task = asyncio.current_task()
            assert task is not None
            dog.arm(task, time.monotonic())
            try:
                ready.set()
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                seen.append(dog.expired(task))
                raise
            finally:
                dog.disarm(task)

        task = asyncio.create_task(attempt())
        await ready.wait()
        dog._timed_out.add(task)  # what the watchdog does at the deadline
        task.cancel()
        task.cancel()  # and the batch (or a close) in the same turn
        try:
            await task
        except asyncio.CancelledError:
            return seen[0], True
        return seen[0], False

    expired, propagated = asyncio.run(main())
    assert (expired, propagated) == (False, True)


def test_a_watchdog_cancel_swallowed_by_the_attempt_is_forgotten_at_disarm() -> None:
    async def main() -> int:
        dog = _Watchdog(60)
        ready = asyncio.Event()

        async def attempt() -> int:
            task = asyncio.current_task()
            assert task is not None
            dog.arm(task, time.monotonic())
            try:
                ready.set()
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                pass  # library code that swallows a cancel
            dog.disarm(task)
            return task.cancelling()

        task = asyncio.create_task(attempt())
        await ready.wait()
        dog._timed_out.add(task)
        task.cancel()
        return await task

    assert asyncio.run(main()) == 0  # the task can be cancelled again later, as if nothing happened


# -- request timeouts (enforced by the client's watchdog, not a timer per request)


def test_the_timeout_counts_from_the_attempt_not_from_the_queue(fake_server: FakeServer, make_client: MakeClient) -> None:
    # one slot: the last row waits ~1 s for it, more than the timeout, but its own request takes 0.2 s
    client = make_client(fake_server.url, timeout=0.6, attempts=1, max_concurrency=1)
    prompts = [f"row {i} [[sleep:0.2]]" for i in range(5)]
    results = send(client, prompts)

    assert [r.error for r in results] == [None] * 5
    assert received(fake_server) == Counter(prompts)


def test_a_hung_request_times_out_while_the_others_keep_flowing(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url, timeout=0.5, attempts=1, max_concurrency=4)
    prompts = ["stuck [[hang:5]]"] + [f"row {i} [[sleep:0.05]]" for i in range(30)]
    started = time.monotonic()
    results = send(client, prompts)
    took = time.monotonic() - started

    assert results[0].error == f"gave up after 1 attempts: no answer from {fake_server.url} within 0.5s"
    assert results[0].error_type == "timeout"
    assert [r.response for r in results[1:]] == ["echo: " + p for p in prompts[1:]]
    # the deadline is checked every timeout/10: the hung row ends by ~0.55 s, not at 5 s
    assert 0.5 <= took < 2.0
    # once nothing is in flight the watchdog stops, and a later batch starts it again
    deadline = time.monotonic() + 5
    while client._watchdog._task is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client._watchdog._task is None
    assert send(client, ["again [[hang:5]]"])[0].error_type == "timeout"


def test_a_watchdog_cancelled_before_its_first_step_is_replaced(fake_server: FakeServer, make_client: MakeClient) -> None:
    # a close in the same loop turn as the watchdog's creation cancels it before it ever runs
    client = make_client(fake_server.url, timeout=0.3, attempts=1)
    send(client, ["warm up"])
    deadline = time.monotonic() + 5
    while client._watchdog._task is not None and time.monotonic() < deadline:  # the warm-up's watchdog ends
        time.sleep(0.01)

    async def cancel_early() -> None:
        client._watchdog._task = asyncio.get_running_loop().create_task(client._watchdog._watch())
        client._watchdog._task.cancel()
        await asyncio.sleep(0)

    run_on_loop(cancel_early()).result(timeout=5)
    assert client._watchdog._task is not None and client._watchdog._task.done()
    result = client.submit(CHAT, chat_bodies(["stuck [[hang:5]]"]), PARSE).result(timeout=20)[0]
    assert result.error_type == "timeout"


def test_a_watchdog_cancel_swallowed_below_the_client_does_not_stop_later_timeouts(
    fake_server: FakeServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = aiohttp.ClientSession._request
    swallowed: list[bool] = []

    async def request(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real(self, *args, **kwargs)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)  # as library code that suppresses a cancel and carries on
            return await real(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", request)
    # one worker: the hung row is sent by the task whose cancel was swallowed
    client = make_client(fake_server.url, timeout=0.3, attempts=1, max_concurrency=1)
    results = client.submit(CHAT, chat_bodies(["slow [[sleep:0.6]]", "stuck [[hang:5]]"]), PARSE).result(timeout=20)

    assert swallowed
    assert results[0].response == "echo: slow [[sleep:0.6]]"
    assert results[1].error_type == "timeout"


# -- retry bookkeeping


def test_a_row_that_always_503s_logs_one_line_per_retry(
    fake_server: FakeServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    client = make_client(fake_server.url, attempts=3, max_concurrency=4)  # fixed: a 503 spends attempts
    (result,) = send(client, ["x [[503:10]]"])

    message = f"503 from {fake_server.url}{CHAT}: Service unavailable (fake_server [[503]])."
    assert result.error == f"gave up after 3 attempts: {message}"
    assert result.attempts == 3 and client.stats.retries == 2
    assert received(fake_server) == Counter({"x [[503:10]]": 3})
    lines = retry_lines(caplog)
    assert [line.split("]")[0].split("[")[1] for line in lines] == ["2/3", "3/3"]  # no "[4/3]" after the last
    assert all(line.endswith(": " + message) for line in lines)


def test_503_503_then_400_counts_three_attempts(fake_server: FakeServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    client = make_client(fake_server.url, attempts=5, max_concurrency=4)  # fixed: a 503 spends attempts
    prompt = "x [[503:2]] [[400]]"
    ok, failed = send(client, ["y", prompt])

    assert ok.error is None and ok.attempts == 1
    assert failed.error is not None and failed.error.startswith(f"400 from {fake_server.url}{CHAT}: This model's maximum")
    assert failed.attempts == 3 and failed.error_type == "http_400"
    assert client.stats.retries == 2 and client.stats.requests == 4
    assert received(fake_server) == Counter({prompt: 3, "y": 1})
    assert len(retry_lines(caplog)) == 2


@pytest.mark.parametrize("fault", ["[[408]]", "[[truncate]]"])
def test_a_408_or_a_truncated_body_is_retried(fake_server: FakeServer, make_client: MakeClient, fault: str) -> None:
    prompts = [f"a {fault}", "b"]
    client = make_client(fake_server.url)
    results = send(client, prompts)

    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    assert [r.attempts for r in results] == [2, 1]
    assert received(fake_server) == Counter({prompts[0]: 2, "b": 1})


# -- a refused API key


def key_hint(url: str, status: str) -> str:
    return (
        f"{url}{CHAT} refused the API key ({status}): pass api_key=..., set VLLM_API_KEY, "
        "or name the variable in a recipe's model.api_key_env"
    )


def test_a_key_revoked_mid_run_stops_the_batch(start_fake_server: Callable[..., FakeServer], make_client: MakeClient) -> None:
    server = start_fake_server("--api-key", "key-one")
    client = make_client(server.url, api_key="key-one", max_concurrency=2)
    assert [r.response for r in send(client, ["a"])] == ["echo: a"]
    server.restart("--api-key", "key-two")  # the model was checked already: only generation requests now

    with pytest.raises(RecipeError) as info:
        send(client, [f"row {i}" for i in range(40)])
    assert str(info.value) == key_hint(server.url, "401: Unauthorized")
    assert "key-one" not in str(info.value)
    wait_until_idle(client)
    assert 1 <= len(server.log()) <= 10  # not one 401 per row


def test_a_403_stops_the_batch(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url, max_concurrency=2)
    with pytest.raises(RecipeError) as info:
        send(client, ["a [[403]]", *(f"row {i}" for i in range(1, 40))])
    assert str(info.value) == key_hint(fake_server.url, "403: Forbidden (fake_server [[403]]).")
    wait_until_idle(client)
    assert len(fake_server.log()) <= 10


# -- stop_on_error


def wait_until_idle(client: Client) -> None:
    """Until every row handed to the client has been sent or skipped."""
    deadline = time.monotonic() + 30
    while (client.unfinished or client.stats.in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.unfinished == 0


def test_stop_on_error_fails_the_batch_at_the_first_failed_row(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient
) -> None:
    server = start_fake_server("--latency", "0.05")
    client = make_client(server.url, max_concurrency=4)
    prompts = ["row 0 [[400]]", *(f"row {i}" for i in range(1, 40))]

    with pytest.raises(RowFailedError) as info:
        send(client, prompts, stop_on_error=True)
    assert info.value.row == 0
    assert info.value.result.error is not None and info.value.result.error.startswith(f"400 from {server.url}{CHAT}: ")
    assert str(info.value) == f"row 0 of the batch failed: {info.value.result.error}"
    assert isinstance(info.value, GenerationError)
    wait_until_idle(client)
    assert len(server.log()) <= 10  # the other rows were not sent

    # without it, the batch runs to the end and the row records its error
    server.reset()
    results = send(client, prompts)
    assert [r.error is not None for r in results] == [True] + [False] * 39
    assert len(server.log()) == 40


def test_stop_on_error_names_the_row_within_the_batch(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url, attempts=2)
    prompts = ["a", "b", "c [[500:5]]", "d"]
    with pytest.raises(RowFailedError) as info:
        send(client, prompts, stop_on_error=True)
    assert info.value.row == 2
    assert info.value.result.error == (
        f"gave up after 2 attempts: 500 from {fake_server.url}{CHAT}: Internal server error (fake_server [[500]])."
    )


def test_row_failed_error_pickles() -> None:
    err = RowFailedError(3, Result(error="400 from x", error_type="http_400", attempts=1))
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.row, copy.result, str(copy)) == (3, err.result, "row 3 of the batch failed: 400 from x")


# -- no I/O before the first batch


def test_creating_a_transform_does_no_network_io(fake_server: FakeServer) -> None:
    from datasets import Dataset

    transform = vllm_generate(fake_server.url)
    repr(transform)
    pickle.dumps(transform)
    transform.connect()  # built, not used
    stats = fake_server.stats()
    assert (stats["models_requests"], stats["requests"]) == (0, 0)

    out = Dataset.from_dict({"prompt": ["a", "b"]}).map(transform, batched=True)
    assert out["response"] == ["echo: a", "echo: b"]
    stats = fake_server.stats()
    assert (stats["models_requests"], stats["requests"]) == (1, 2)  # the model lookup, once
    transform.close()


# -- answers that are not answers, odd fields, redirects (issue: never record a wrong success)


@pytest.mark.parametrize("fault", ["no_message", "null_message", "null_content"])
def test_an_answer_without_text_is_retried_never_recorded_as_a_success(
    fake_server: FakeServer, make_client: MakeClient, fault: str
) -> None:
    client = make_client(fake_server.url, attempts=2)
    once, always = f"once [[{fault}:1]]", f"always [[{fault}:9]]"
    ok, failed = send(client, [once, always])

    assert (ok.response, ok.attempts, ok.error) == (f"echo: {once}", 2, None)
    what = "no message (got NoneType)" if fault != "null_content" else "no content"
    assert failed.response is None and failed.error_type == "bad_body"
    assert failed.error == f"gave up after 2 attempts: {fake_server.url} sent a broken response body (a choice has {what})"
    assert received(fake_server) == Counter({once: 2, always: 2})


def test_token_counts_sent_as_text_are_counted_and_the_batch_goes_on(fake_server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(fake_server.url)
    results = send(client, ["a b c [[text_usage]]", "plain"])
    assert [r.error for r in results] == [None, None]
    assert results[0].prompt_tokens == 4 and isinstance(results[0].completion_tokens, int)
    assert client.stats.prompt_tokens == 4 + 1


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_a_row_error_and_is_not_followed(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, status: int
) -> None:
    elsewhere = start_fake_server()
    server = start_fake_server("--redirect-to", f"{elsewhere.url}{CHAT}")
    client = make_client(server.url)
    moved, fine = send(client, [f"x [[redirect:{status}]]", "y"])

    assert moved.response is None and moved.error_type == f"http_{status}" and moved.attempts == 1
    assert moved.error == (
        f"{status} from {server.url}{CHAT}: redirected to {elsewhere.url}{CHAT}; "
        "redirects are not followed for generation requests: set base_url to the server itself"
    )
    assert fine.response == "echo: y"
    assert elsewhere.log() == [] and received(server) == Counter({f"x [[redirect:{status}]]": 1, "y": 1})


def test_a_server_failing_every_row_for_a_while_costs_the_rows_no_attempt(
    start_fake_server: Callable[..., FakeServer], make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # what a vLLM server shutting down does: 500 "EngineCore encountered an issue" to everything
    server = start_fake_server("--latency", "0.02")
    client = make_client(server.url, attempts=2, max_concurrency=8)
    caplog.set_level(logging.WARNING, logger="vllm_generator")
    send(client, ["warm up"])
    server.fail(seconds=2.0)
    prompts = [f"row {i}" for i in range(40)]
    results = send(client, prompts)

    assert [r.error for r in results] == [None] * 40
    assert [r.response for r in results] == ["echo: " + p for p in prompts]
    # the first rows' 500s took the server down; no row spent its two attempts
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if " is down (500 from " in m]) == 1
    assert len([m for m in messages if "answers again after" in m]) == 1
    assert len(messages) <= 6, messages
