"""The fake vLLM server, exercised over real HTTP (urllib) as a subprocess."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conformance import check_response
from conftest import CHAT, COMPLETIONS
from fake_server import LOGNORMAL_SIGMA, OPENER, BlackHole, FakeServer, FakeVLLM, Sample, _parse_args, parse_metrics

# Never route 127.0.0.1 through a proxy from the environment.


def request(
    url: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any, bytes]:
    """(status, headers, body bytes); HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        url + path,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def chat(url: str, content: str, **params: Any) -> tuple[int, Any, Any]:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": content}],
        **params,
    }
    status, headers, data = request(url, CHAT, body)
    return status, headers, json.loads(data)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


@pytest.fixture()
def srv(server: FakeServer) -> FakeServer:
    server.reset()
    return server


def test_chat_echo(srv: FakeServer) -> None:
    body = {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there row 7"},
        ],
    }
    status, headers, data = request(srv.url, CHAT, body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    out = json.loads(data)
    assert out["object"] == "chat.completion" and out["model"] == "fake-model"
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "echo: hello there row 7"
    assert out["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 5,
        "total_tokens": 11,
        "prompt_tokens_details": None,
    }


def test_n_choices(srv: FakeServer) -> None:
    _, _, out = chat(srv.url, "row 3", n=2)
    assert [c["message"]["content"] for c in out["choices"]] == [
        "echo: row 3 #0",
        "echo: row 3 #1",
    ]
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["completion_tokens"] == 8


def test_completions_and_max_tokens(srv: FakeServer) -> None:
    status, _, data = request(srv.url, COMPLETIONS, {"prompt": "one two three four", "max_tokens": 3})
    out = json.loads(data)
    assert status == 200 and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "echo: one two"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 3


def test_503_then_success(srv: FakeServer) -> None:
    status, _, out = chat(srv.url, "row [[503]]")
    assert status == 503 and out["error"]["code"] == 503
    status, _, out = chat(srv.url, "row [[503]]")
    assert status == 200 and out["choices"][0]["message"]["content"] == "echo: row [[503]]"


def test_faults_are_consumed_in_order(srv: FakeServer) -> None:
    statuses = [chat(srv.url, "r [[429:2]][[500]]")[0] for _ in range(4)]
    assert statuses == [429, 429, 500, 200]


def test_429_has_retry_after(srv: FakeServer) -> None:
    status, headers, out = chat(srv.url, "row [[429]]")
    assert status == 429 and headers["Retry-After"] == "1" and out["error"]["code"] == 429
    status, headers, _ = chat(srv.url, "row [[429]][[retry_after:0.25]]")
    assert status == 429 and headers["Retry-After"] == "0.25"


def test_400_always(srv: FakeServer) -> None:
    expected = {
        "error": {
            "message": "This model's maximum context length is 512 tokens. However, you requested 900 tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    for _ in range(3):
        status, _, out = chat(srv.url, "too long [[400]]")
        assert (status, out) == (400, expected)


def test_malformed_body(srv: FakeServer) -> None:
    status, headers, data = request(srv.url, CHAT, {"messages": [{"role": "user", "content": "[[malformed]]"}]})
    assert status == 200 and headers["Content-Type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(data)


def test_drop_closes_connection(srv: FakeServer) -> None:
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        chat(srv.url, "row [[drop]]")
    assert chat(srv.url, "row [[drop]]")[0] == 200


def test_unknown_model_404(srv: FakeServer) -> None:
    status, _, data = request(srv.url, CHAT, {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404
    assert json.loads(data) == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
    }


def test_models_and_health(srv: FakeServer) -> None:
    status, _, data = request(srv.url, "/v1/models")
    models = json.loads(data)
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [("fake-model", "model", 512)]
    assert request(srv.url, "/health")[0] == 200


@pytest.mark.parametrize(
    ("shape", "content", "reasoning", "finish"),
    [
        ("field", "echo: P", "thinking about P", "stop"),
        ("inline", "<think>thinking about P</think>\n\necho: P", None, "stop"),
        ("close_only", "thinking about P</think>\n\necho: P", None, "stop"),
        ("unclosed", "<think>thinking about P", None, "length"),
        ("field_unclosed", None, "thinking about P", "length"),
    ],
)
def test_reasoning_shapes(srv: FakeServer, shape: str, content: str | None, reasoning: str | None, finish: str) -> None:
    prompt = f"q [[reasoning:{shape}]]"
    _, _, out = chat(srv.url, prompt)
    choice = out["choices"][0]

    def expand(text: str | None) -> str | None:
        return None if text is None else text.replace("P", prompt)

    assert choice["message"]["content"] == expand(content)
    assert choice["message"]["reasoning"] == expand(reasoning)
    assert choice["finish_reason"] == finish


def test_reasoning_legacy_field(srv: FakeServer) -> None:
    message = chat(srv.url, "q [[reasoning:legacy]]")[2]["choices"][0]["message"]
    assert message["reasoning_content"] == "thinking about q [[reasoning:legacy]]"
    assert "reasoning" not in message and message["content"] == "echo: q [[reasoning:legacy]]"


def test_log_contents(srv: FakeServer) -> None:
    chat(srv.url, "first")
    request(
        srv.url,
        COMPLETIONS,
        raw=b"{not json",
        headers={"Authorization": "Bearer secret"},
    )
    request(srv.url, "/v1/models")  # not a generation endpoint: not logged
    log = srv.log()
    assert [e["path"] for e in log] == [CHAT, COMPLETIONS]
    assert log[0]["body"]["messages"][0]["content"] == "first"
    assert log[1]["body"] == "{not json"
    assert [e["headers"] for e in log] == [{"has_auth": False}, {"has_auth": True}]
    assert "secret" not in json.dumps(log)
    # CLOCK_MONOTONIC is system-wide on Linux: comparable with this process's clock.
    assert log[0]["t"] <= log[1]["t"] <= time.monotonic()
    srv.reset()
    assert srv.log() == [] and srv.stats()["requests"] == 0


def test_api_key() -> None:
    with FakeServer("--api-key", "k1", "--model", "m1", "--model", "m2") as srv:
        body = {"model": "m2", "messages": [{"role": "user", "content": "x"}]}
        assert request(srv.url, CHAT, body)[0] == 401
        assert request(srv.url, CHAT, body, headers={"Authorization": "Bearer nope"})[0] == 401
        assert request(srv.url, CHAT, body, headers={"Authorization": "Bearer k1"})[0] == 200
        assert request(srv.url, "/v1/models")[0] == 401
        _, _, data = request(srv.url, "/v1/models", headers={"Authorization": "Bearer k1"})
        assert [m["id"] for m in json.loads(data)["data"]] == ["m1", "m2"]
        assert [e["headers"]["has_auth"] for e in srv.log()] == [False, True, True]


def test_slots_limit_concurrency() -> None:
    with FakeServer("--slots", "3", "--latency", "0.2") as srv:
        barrier = threading.Barrier(10)
        results: list[int] = []

        def send(i: int) -> None:
            barrier.wait()
            results.append(chat(srv.url, f"row {i}")[0])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        stats = srv.stats()
    assert results == [200] * 10
    assert stats["max_running"] == 3  # generating at once: capped by the slots
    assert stats["max_in_flight"] > 3  # the rest queued, counted as in flight
    assert stats["requests"] == 10 and stats["in_flight"] == 0
    assert elapsed >= 0.75  # ceil(10 / 3) = 4 waves of 0.2 s
    counts = [n for _, n in stats["timeline"]]
    assert max(counts) == stats["max_in_flight"] and counts[-1] == 0 and len(counts) == 20


def test_hang_is_cancelled_when_client_leaves() -> None:
    hang = {"messages": [{"role": "user", "content": "stuck [[hang:5]]"}]}
    with FakeServer("--slots", "1") as srv:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            request(srv.url, CHAT, hang, timeout=0.3)
        # The only slot was freed when the client disconnected.
        assert chat(srv.url, "next")[0] == 200

        def hang_until_shutdown() -> None:
            with contextlib.suppress(ConnectionError, urllib.error.URLError, http.client.HTTPException):
                request(srv.url, CHAT, hang, timeout=30)

        threading.Thread(target=hang_until_shutdown, daemon=True).start()
        while srv.stats()["in_flight"] == 0:
            time.sleep(0.01)
        start = time.monotonic()
    # A hang in flight does not delay a clean shutdown.
    assert time.monotonic() - start < 3
    assert srv.proc is not None and srv.proc.returncode == 0


def test_sleep_directive(srv: FakeServer) -> None:
    start = time.monotonic()
    assert chat(srv.url, "slow [[sleep:0.3]]")[0] == 200
    assert time.monotonic() - start >= 0.3


def test_lognormal_latency_is_deterministic_and_heavy_tailed() -> None:
    app = FakeVLLM(_parse_args(["--latency", "0.1", "--latency-model", "lognormal"]))
    samples = sorted(app._lognormal_latency(f"row {i}") for i in range(20000))
    assert app._lognormal_latency("row 1") == app._lognormal_latency("row 1")
    assert samples[len(samples) // 2] == pytest.approx(0.1, rel=0.05)
    tail = sum(s > 2.5 for s in samples) / len(samples)
    assert 0.007 < tail < 0.013 and abs(LOGNORMAL_SIGMA - 1.3837) < 1e-4


def test_kill() -> None:
    srv = FakeServer()
    with srv:
        srv.kill()
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            chat(srv.url, "x")
    assert srv.proc is not None and srv.proc.returncode == -9


def test_408_then_success(srv: FakeServer) -> None:
    statuses = [chat(srv.url, "r [[408:2]]")[0] for _ in range(3)]
    assert statuses == [408, 408, 200]
    status, _, out = chat(srv.url, "s [[408]]")
    assert (status, out["error"]["code"]) == (408, 408)


def test_truncate_sends_less_than_its_content_length(srv: FakeServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    body = {"messages": [{"role": "user", "content": "row [[truncate]]"}]}
    conn.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    promised = int(resp.headers["Content-Length"])
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    conn.close()
    # the first half of the real completion, then the connection closed
    assert 0 < len(info.value.partial) == promised // 2
    assert info.value.partial.startswith(b'{"id": "chatcmpl-')
    # the fault is counted: the next attempt gets the whole body
    assert chat(srv.url, "row [[truncate]]")[2]["choices"][0]["message"]["content"] == ("echo: row [[truncate]]")


def test_403_always(srv: FakeServer) -> None:
    for _ in range(2):
        status, _, out = chat(srv.url, "x [[403]]")
        assert (status, out["error"]["code"], out["error"]["type"]) == (
            403,
            403,
            "PermissionDeniedError",
        )


def test_uncounted_errors_come_after_the_counted_faults(srv: FakeServer) -> None:
    statuses = [chat(srv.url, "r [[503:2]] [[400]]")[0] for _ in range(4)]
    assert statuses == [503, 503, 400, 400]


def test_models_requests_are_counted_apart_from_the_log(srv: FakeServer) -> None:
    assert srv.stats()["models_requests"] == 0
    request(srv.url, "/v1/models")
    request(srv.url, "/v1/models")
    chat(srv.url, "x")
    stats = srv.stats()
    assert (stats["models_requests"], stats["requests"]) == (2, 1)
    assert [e["path"] for e in srv.log()] == [CHAT]
    srv.reset()
    assert srv.stats()["models_requests"] == 0


def test_models_requests_refused_for_the_key_are_counted() -> None:
    with FakeServer("--api-key", "k1") as srv:
        assert request(srv.url, "/v1/models")[0] == 401
        assert srv.stats()["models_requests"] == 1


def test_restart_keeps_the_port_and_takes_new_arguments() -> None:
    with FakeServer("--api-key", "k1") as srv:
        url, old = srv.url, srv.proc
        key1 = {"Authorization": "Bearer k1"}
        body = {"messages": [{"role": "user", "content": "x"}]}
        assert request(srv.url, CHAT, body, headers=key1)[0] == 200
        srv.restart("--api-key", "k2")
        assert old is not None and old.returncode == -9  # killed, not stopped
        assert srv.url == url and srv.proc is not None and srv.proc.pid != old.pid
        assert srv.log() == []  # a new process
        assert request(srv.url, CHAT, body, headers=key1)[0] == 401
        key2 = {"Authorization": "Bearer k2"}
        assert request(srv.url, CHAT, body, headers=key2)[0] == 200
        srv.restart()  # same arguments again
        assert request(srv.url, CHAT, body, headers=key2)[0] == 200
    assert srv.proc is not None and srv.proc.returncode == 0


def test_restart_after_a_kill() -> None:
    with FakeServer() as srv:
        srv.kill()
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            chat(srv.url, "x")
        srv.restart()
        assert chat(srv.url, "x")[0] == 200


def test_black_hole_never_completes_a_connection() -> None:
    with BlackHole() as hole:
        port = int(hole.url.rsplit(":", 1)[1])
        for _ in range(2):
            sock = socket.socket()
            sock.settimeout(0.3)
            started = time.monotonic()
            with pytest.raises(TimeoutError):  # not refused: no answer at all
                sock.connect(("127.0.0.1", port))
            assert time.monotonic() - started >= 0.3
            sock.close()
    # closed: now the port refuses
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_restart_with_down_refuses_connections_meanwhile() -> None:
    with FakeServer() as srv:
        refused: list[float] = []
        stop = threading.Event()

        def knock() -> None:
            while not stop.is_set():
                try:
                    socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
                except ConnectionRefusedError:
                    refused.append(time.monotonic())
                time.sleep(0.01)

        knocker = threading.Thread(target=knock)
        knocker.start()
        try:
            srv.restart(down=0.4)
        finally:
            stop.set()
            knocker.join()
        assert chat(srv.url, "x")[0] == 200
    # refused for at least the 0.4 s the new server held the port before listening
    assert refused and refused[-1] - refused[0] >= 0.3


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "plain"}]}),
        (CHAT, {"messages": [{"role": "user", "content": "thinks [[reasoning:field]]"}]}),
        (CHAT, {"messages": [{"role": "user", "content": "cut [[reasoning:field_unclosed]]"}]}),
        (CHAT, {"messages": [{"role": "user", "content": "old vLLM [[reasoning:legacy]]"}]}),
        (CHAT, {"messages": [{"role": "user", "content": "three"}], "n": 3, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}),
        (COMPLETIONS, {"prompt": "plain"}),
        (COMPLETIONS, {"prompt": "inline [[reasoning:inline]]", "n": 2, "logprobs": 2}),
    ],
)
def test_every_response_shape_is_an_openai_response(srv: FakeServer, path: str, body: dict[str, Any]) -> None:
    status, _, data = request(srv.url, path, {"model": "fake-model", **body})
    assert status == 200
    parsed = check_response(path, json.loads(data))
    assert len(parsed.choices) == body.get("n", 1)  # type: ignore[attr-defined]


# -- load: slots that change, the queue, vLLM's /metrics and endpoint-load-metrics header --

LOAD_HEADER = "endpoint-load-metrics"
JSON_LOAD = {"endpoint-load-metrics-format": "json"}
TEXT_LOAD = {"endpoint-load-metrics-format": "text"}


class Load:
    """Chat requests sent from daemon threads; ``results`` holds their (status, headers, body)
    in order of completion. Requests still running when the server stops fail quietly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[int, Any, Any]] = []
        self.threads: list[threading.Thread] = []

    def send(self, content: str, count: int = 1, headers: dict[str, str] | None = None) -> None:
        def run() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, got, data = request(
                    self.url, CHAT, {"messages": [{"role": "user", "content": content}]}, headers=headers, timeout=60
                )
                self.results.append((status, got, json.loads(data)))

        for _ in range(count):
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> list[tuple[int, Any, Any]]:
        for thread in self.threads:
            thread.join(timeout=30)
        return self.results


def wait_for(srv: FakeServer, **expected: Any) -> dict[str, Any]:
    """``/_stats`` once the given keys hold the given values (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        stats = srv.stats()
        if all(stats[key] == value for key, value in expected.items()):
            return stats
        assert time.monotonic() < deadline, (expected, {key: stats[key] for key in expected})
        time.sleep(0.01)


def gauges(samples: list[Sample], name: str, **labels: str) -> dict[str, float]:
    """``{engine: value}`` of the samples called ``name`` that carry ``labels``."""
    return {s.labels["engine"]: s.value for s in samples if s.name == name and labels.items() <= s.labels.items()}


def test_metrics_show_running_and_waiting() -> None:
    with FakeServer("--slots", "2", "--model", "first", "--model", "second") as srv:
        load = Load(srv.url)
        load.send("[[sleep:0.5]]", 5)
        wait_for(srv, running=2, waiting=3)
        status, headers, data = request(srv.url, "/metrics")
        text = data.decode()
        assert status == 200 and headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        lines = text.splitlines()
        # vLLM's exact lines: labels sorted, the first served model, floats written as 2.0
        for line in (
            'vllm:num_requests_running{engine="0",model_name="first"} 2.0',
            'vllm:num_requests_waiting{engine="0",model_name="first"} 3.0',
            'vllm:num_requests_waiting_by_reason{engine="0",model_name="first",reason="capacity"} 3.0',
            'vllm:num_requests_waiting_by_reason{engine="0",model_name="first",reason="deferred"} 0.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="first"} 1.0',
        ):
            assert line in lines
        running = lines.index('vllm:num_requests_running{engine="0",model_name="first"} 2.0')
        assert lines[running - 2 : running] == [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
        ]
        samples = parse_metrics(text)  # every line is a sample or a comment
        typed = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
        assert {re.sub(r"_(bucket|count|sum)$", "", s.name) for s in samples} <= typed
        assert len(gauges(samples, "vllm:cache_config_info")) == 1

        assert [r[0] for r in load.join()] == [200] * 5
        text = request(srv.url, "/metrics")[2].decode()
        assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="first"} 5.0' in text.splitlines()
        assert 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="first"} 5.0' in text.splitlines()
        after = parse_metrics(text)
        assert gauges(after, "vllm:num_requests_running") == gauges(after, "vllm:num_requests_waiting") == {"0": 0.0}
        assert gauges(after, "vllm:kv_cache_usage_perc") == {"0": 0.0}
        assert gauges(after, "vllm:request_success_total", finished_reason="stop") == {"0": 5.0}
        # e2e latency (queueing included): ~0.5 s for 2 requests, ~1 s for 2, ~1.5 s for 1
        buckets = [s for s in after if s.name == "vllm:e2e_request_latency_seconds_bucket"]
        assert [s.labels["le"] for s in buckets][:4] == ["0.3", "0.5", "0.8", "1.0"] and buckets[-1].labels["le"] == "+Inf"
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[0] == 0.0 and counts[-1] == 5.0
        assert gauges(after, "vllm:e2e_request_latency_seconds_count") == {"0": 5.0}
        assert 4.4 < gauges(after, "vllm:e2e_request_latency_seconds_sum")["0"] < 8
        assert gauges(after, "vllm:generation_tokens_total") == {"0": 10.0}  # "echo: [[sleep:0.5]]": 2 words each

        assert srv.stats()["metrics_requests"] == 2
        srv.reset()
        assert srv.stats()["metrics_requests"] == 0
        # the Prometheus counters never reset
        assert gauges(srv.metrics(), "vllm:request_success_total", finished_reason="stop") == {"0": 5.0}


def test_metrics_engines_report_separately() -> None:
    with FakeServer("--slots", "4", "--engines", "2") as srv:
        load = Load(srv.url)
        load.send("[[sleep:0.5]]", 7)
        wait_for(srv, running=4, waiting=3)
        samples = srv.metrics()
        running = gauges(samples, "vllm:num_requests_running")
        waiting = gauges(samples, "vllm:num_requests_waiting")
        assert running == {"0": 2.0, "1": 2.0} and waiting == {"0": 2.0, "1": 1.0}
        assert sum(running.values()) == 4 and sum(waiting.values()) == 3
        assert gauges(samples, "vllm:num_requests_waiting_by_reason", reason="capacity") == waiting
        assert gauges(samples, "vllm:kv_cache_usage_perc") == {"0": 1.0, "1": 1.0}
        assert gauges(samples, "vllm:cache_config_info") == {"0": 1.0, "1": 1.0}
        assert [r[0] for r in load.join()] == [200] * 7
        samples = srv.metrics()
        assert gauges(samples, "vllm:request_success_total", finished_reason="stop") == {"0": 4.0, "1": 3.0}
        assert gauges(samples, "vllm:e2e_request_latency_seconds_count") == {"0": 4.0, "1": 3.0}
        assert gauges(samples, "vllm:e2e_request_latency_seconds_bucket", le="+Inf") == {"0": 4.0, "1": 3.0}


def test_metrics_with_unlimited_slots_report_no_kv_usage(srv: FakeServer) -> None:
    load = Load(srv.url)
    load.send("[[sleep:0.5]]", 3)
    wait_for(srv, running=3)
    samples = srv.metrics()
    assert gauges(samples, "vllm:num_requests_running") == {"0": 3.0}
    assert gauges(samples, "vllm:kv_cache_usage_perc") == {"0": 0.0}
    assert srv.stats()["slots"] == 0
    load.join()


def test_load_header_formats() -> None:
    with FakeServer("--slots", "1") as srv:
        load = Load(srv.url)
        load.send("asks [[sleep:0.5]]", headers=JSON_LOAD)
        wait_for(srv, running=1)
        load.send("[[sleep:30]]", 3)
        wait_for(srv, waiting=3)
        # taken once the generation is done: its slot went to the next, two still wait
        while not load.results:
            time.sleep(0.01)
        status, headers, out = load.results[0]
        assert (status, out["choices"][0]["message"]["content"]) == (200, "echo: asks [[sleep:0.5]]")
        assert headers[LOAD_HEADER] == 'JSON {"named_metrics": {"num_requests_waiting": 2.0, "kv_cache_usage_perc": 1.0}}'
        srv.set_slots(4)  # the three [[sleep:30]] run; one slot is free
        status, headers, _ = request(srv.url, CHAT, {"messages": [{"role": "user", "content": "x"}]}, headers=TEXT_LOAD)
        assert status == 200
        assert headers[LOAD_HEADER] == "TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.75"
        assert srv.stats()["load_header_requests"] == 2


def test_load_header_with_two_engines() -> None:
    with FakeServer("--slots", "2", "--engines", "2") as srv:
        load = Load(srv.url)
        load.send("asks [[sleep:0.5]]", headers=TEXT_LOAD)
        wait_for(srv, running=1)
        load.send("[[sleep:30]]", 7)
        wait_for(srv, running=2, waiting=6)
        while not load.results:
            time.sleep(0.01)
        # running 2 = 1 + 1 of 1 + 1 slots, waiting 5 = 3 + 2: TEXT lists every engine
        assert load.results[0][1][LOAD_HEADER] == (
            "TEXT named_metrics.num_requests_waiting=3.0, named_metrics.num_requests_waiting=2.0, "
            "named_metrics.kv_cache_usage_perc=1.0, named_metrics.kv_cache_usage_perc=1.0"
        )
        srv.set_slots(8)  # 7 run: 4 + 3 of 4 + 4 slots
        _, headers, _ = request(srv.url, CHAT, {"messages": [{"role": "user", "content": "x"}]}, headers=JSON_LOAD)
        # vLLM's JSON is a dict keyed by metric name: the last engine's values win
        assert headers[LOAD_HEADER] == 'JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.75}}'


def test_load_header_only_when_asked_and_only_on_200(srv: FakeServer) -> None:
    def ask(content: str, headers: dict[str, str] | None) -> tuple[int, Any]:
        status, got, _ = request(srv.url, CHAT, {"messages": [{"role": "user", "content": content}]}, headers=headers)
        return status, got.get(LOAD_HEADER)

    assert ask("plain", None) == (200, None)
    assert ask("plain", JSON_LOAD) == (200, 'JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}}')
    assert ask("plain", {"endpoint-load-metrics-format": "TEXT"}) == (
        200,
        "TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.0",
    )
    assert ask("plain", {"endpoint-load-metrics-format": "xml"}) == (200, None)  # vLLM: a warning, no header
    # vLLM returns its ErrorResponses without the header, whatever the status
    assert ask("too long [[400]]", JSON_LOAD) == (400, None)
    assert ask("fails [[500]]", JSON_LOAD) == (500, None)
    assert srv.stats()["load_header_requests"] == 5


def test_no_metrics() -> None:
    with FakeServer("--no-metrics") as srv:
        status, _, data = request(srv.url, "/metrics")
        assert status == 404 and json.loads(data)["error"]["code"] == 404
        status, headers, _ = request(srv.url, CHAT, {"messages": [{"role": "user", "content": "x"}]}, headers=JSON_LOAD)
        assert status == 200 and LOAD_HEADER not in headers
        stats = srv.stats()
        assert (stats["metrics_requests"], stats["load_header_requests"]) == (1, 1)


def test_queue_timeline_and_max_waiting() -> None:
    with FakeServer("--slots", "2") as srv:
        load = Load(srv.url)
        load.send("[[sleep:0.3]]", 5)
        assert wait_for(srv, running=2, waiting=3)["slots"] == 2
        load.join()
        stats = srv.stats()
        assert (stats["running"], stats["waiting"], stats["max_running"], stats["max_waiting"]) == (0, 0, 2, 3)
        queue = stats["queue_timeline"]
        # (running, waiting) on every change: 5 arrivals, then two ending together every 0.3 s
        assert [(r, w) for _, r, w in queue] == [(1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]
        assert [t for t, _, _ in queue] == sorted(t for t, _, _ in queue)
        load.send("[[sleep:0.3]]", 3)
        wait_for(srv, running=2, waiting=1)
        srv.reset()  # the maxima start again from the present state
        stats = srv.stats()
        assert (stats["queue_timeline"], stats["max_running"], stats["max_waiting"]) == ([], 2, 1)
        load.join()
        assert [(r, w) for _, r, w in srv.stats()["queue_timeline"]] == [(2, 0), (1, 0), (0, 0)]


def test_raising_slots_admits_waiters_at_once_in_arrival_order() -> None:
    with FakeServer("--slots", "1") as srv:
        load = Load(srv.url)
        load.send("first [[sleep:1.5]]")
        wait_for(srv, running=1)
        for i in range(4):  # one by one: their order of arrival is known
            load.send(f"waiter {i} [[sleep:0.2]]")
            wait_for(srv, waiting=i + 1)
        srv.set_slots(2)
        stats = srv.stats()  # at once, not when the first finishes
        assert (stats["slots"], stats["running"], stats["waiting"]) == (2, 2, 3)
        load.join()
        # the new slot served the waiters one after another, in their order of arrival
        assert [r[2]["choices"][0]["message"]["content"] for r in load.results] == [
            "echo: waiter 0 [[sleep:0.2]]",
            "echo: waiter 1 [[sleep:0.2]]",
            "echo: waiter 2 [[sleep:0.2]]",
            "echo: waiter 3 [[sleep:0.2]]",
            "echo: first [[sleep:1.5]]",
        ]
        srv.set_slots(1)
        load.send("[[sleep:0.5]]", 4)
        wait_for(srv, running=1, waiting=3)
        srv.set_slots(4)
        stats = srv.stats()
        assert (stats["running"], stats["waiting"]) == (4, 0)  # several admitted at once
        load.join()


def test_lowering_slots_drains_the_running_first() -> None:
    with FakeServer("--slots", "4") as srv:
        load = Load(srv.url)
        for i in range(1, 5):  # they end 0.3 s apart
            load.send(f"[[sleep:{0.3 * i:.1f}]]")
        wait_for(srv, running=4)
        srv.set_slots(2)
        lowered = time.monotonic()
        load.send("late", 2)
        wait_for(srv, waiting=2)
        assert [r[0] for r in load.join()] == [200] * 6
        queue = [(running, waiting) for t, running, waiting in srv.stats()["queue_timeline"] if t > lowered]
    # (running, waiting): the two late ones wait while 4, 3 and 2 run, then take turns
    assert queue == [(4, 1), (4, 2), (3, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]


def test_slots_schedule() -> None:
    with FakeServer("--slots", "1", "--slots-schedule", "0.5:3,1.0:2") as srv:
        load = Load(srv.url)
        load.send("[[sleep:30]]")  # the schedule counts from this first generation request
        wait_for(srv, running=1)
        load.send("[[sleep:30]]", 3)
        stats = wait_for(srv, waiting=3)
        assert stats["slots"] == 1
        stats = wait_for(srv, slots=3, running=3, waiting=1)
        start = srv.log()[0]["t"]
        admitted = next(t for t, running, _ in stats["queue_timeline"] if running == 3)
        assert 0.5 <= admitted - start < 0.9
        # lowered to 2 at 1.0 s: the three run on, no one is admitted
        stats = wait_for(srv, slots=2)
        assert (stats["running"], stats["waiting"]) == (3, 1)


def test_max_queued_rejects_with_vllms_503() -> None:
    with FakeServer("--slots", "1", "--max-queued", "3") as srv:
        load = Load(srv.url)
        load.send("[[sleep:0.5]]", 3)
        wait_for(srv, running=1, waiting=2)
        started = time.monotonic()
        status, _, out = chat(srv.url, "one too many")
        assert time.monotonic() - started < 0.3  # at once: no slot, no latency
        assert (status, out) == (
            503,
            {
                "error": {
                    "message": "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance.",
                    "type": "Service Unavailable",
                    "param": None,
                    "code": 503,
                }
            },
        )
        assert [r[0] for r in load.join()] == [200] * 3
        assert chat(srv.url, "room again")[0] == 200
        stats = srv.stats()
        assert (stats["rejected"], stats["requests"]) == (1, 5)
        srv.reset()
        assert srv.stats()["rejected"] == 0


def test_metrics_lag() -> None:
    with FakeServer("--slots", "2", "--metrics-lag", "1") as srv:
        started = time.monotonic()
        load = Load(srv.url)
        load.send("asks [[sleep:0.3]]", headers=JSON_LOAD)
        wait_for(srv, running=1)
        load.send("[[sleep:30]]", 3)
        wait_for(srv, running=2, waiting=2)
        reads: list[tuple[float, float, float]] = []  # (seconds since the start, running, waiting)
        while not reads or reads[-1][1:] != (2.0, 1.0):
            samples = srv.metrics()
            running = gauges(samples, "vllm:num_requests_running")["0"]
            reads.append((time.monotonic() - started, running, gauges(samples, "vllm:num_requests_waiting")["0"]))
            assert reads[-1][0] < 5, reads
            time.sleep(0.02)
        # the header of the request that ended at ~0.3 s read the gauges of 1 s before: none yet
        assert load.results[0][1][LOAD_HEADER] == 'JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}}'
    first_nonzero = next(t for t, running, waiting in reads if running or waiting)
    assert all(running == waiting == 0 for t, running, waiting in reads if t < 1.0)
    assert 1.0 <= first_nonzero < 2.0 and reads[-1][0] < 2.5, reads


def test_slots_endpoint_rejects_bad_values() -> None:
    with FakeServer("--engines", "2") as srv:
        for body in ({"slots": 1}, {"slots": 0}, {"slots": "4"}, {"slots": True}, {}, [4]):
            status, _, data = request(srv.url, "/_slots", body)
            assert status == 400 and "/_slots takes" in json.loads(data)["error"]["message"], body
        assert srv.stats()["slots"] == 0
        srv.set_slots(2)
        assert srv.stats()["slots"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slots-schedule", "5"], "bad step '5'"),
        (["--slots-schedule", "5:0"], "slots >= 1"),
        (["--slots-schedule=-1:4"], "seconds must be >= 0"),
        (["--engines", "0"], "--engines must be >= 1"),
        (["--slots", "1", "--engines", "2"], "each engine at least one slot"),
        (["--slots", "4", "--engines", "2", "--slots-schedule", "1:1"], "each engine at least one slot"),
        (["--max-queued", "-1"], "must be >= 0"),
    ],
)
def test_bad_load_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse_args(argv)
    assert message in capsys.readouterr().err


def test_parse_metrics_is_strict() -> None:
    samples = parse_metrics('# HELP x y\na_total{b="q\\"uote",c="back\\\\slash"} 1.5e+09\nplain 2.0\n')
    assert samples == [Sample("a_total", {"b": 'q"uote', "c": "back\\slash"}, 1.5e9), Sample("plain", {}, 2.0)]
    for line in ("a{b=1} 2", 'a{b="1"', "a 2 3 4", 'a{b="1",,c="2"} 1'):
        with pytest.raises(ValueError):
            parse_metrics(line)
