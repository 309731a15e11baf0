"""A fake vLLM (OpenAI-compatible) HTTP server for tests and benchmarks.

Run as a subprocess::

    python tests/fake_server.py --port 0 [--slots N] [--slots-schedule T:N,...] [--latency S]
        [--latency-model fixed|lognormal] [--model NAME ...] [--api-key KEY]
        [--engines K] [--max-queued N] [--metrics-lag S] [--no-metrics]
        [--no-timeline] [--no-log] [--bind-retry S] [--listen-delay S]

It prints exactly one line, ``LISTENING <port>``, once bound to 127.0.0.1, and exits
cleanly on SIGTERM/SIGINT. From Python, use :class:`FakeServer` (a context manager);
``FakeServer.restart()`` kills it and starts another on the same port (a restart blip).
With ``--bind-retry S`` (what ``restart`` uses) it first prints ``WAITING <port>``, then
retries binding a busy ``--port`` every 5 ms for up to S seconds before ``LISTENING``;
``--listen-delay S`` holds the bound port S seconds before listening (connections to it
are refused meanwhile: a longer restart blip).

Generated text is derived from the prompt so tests can prove row/response alignment:
chat content is ``"echo: " + <last user message>`` (``" #i"`` appended to choice i
when n > 1), completion text is ``"echo: " + <prompt>``. "Tokens" are words (split on
whitespace); ``max_tokens`` (or ``max_completion_tokens``) cuts the text to that many
words with finish_reason "length".

Directives embedded in the prompt (last user message, or the completion prompt) make
a row misbehave; the echo keeps them. ``[[name]]`` or ``[[name:arg]]``, several allowed:

Counted faults, consumed in order of appearance per distinct prompt text: attempts
1..K1 of that prompt get the first fault, the next K2 attempts the second, and so on;
later attempts succeed. K defaults to 1.
    [[429:K]]        429 with ``Retry-After`` (1 s, or ``[[retry_after:S]]``); immediate
    [[503:K]]        503; immediate
    [[500:K]]        500, after the request's latency, holding a slot
    [[drop:K]]       connection closed without a response, after the latency
    [[malformed:K]]  200 application/json with a truncated body, after the latency
    [[truncate:K]]   200 whose ``Content-Length`` promises the whole completion but only
                     its first half is sent before the connection closes (the client
                     sees a truncated body: aiohttp's ``ClientPayloadError``), after the latency
    [[408:K]]        408 Request Timeout (like a proxy's); immediate
    [[hang:K]]       sleeps 3600 s holding a slot (freed when the client disconnects)
    [[no_message:K]] [[null_message:K]] [[null_content:K]]
                     200 whose choice has no ``message``, ``message: null``, or
                     ``content: null`` and no reasoning (a broken answer), after the latency
Uncounted (they apply once the prompt's counted faults, if any, are used up, so
``[[503:2]] [[400]]`` answers 503, 503, then 400 for good):
    [[400]]          always 400 "maximum context length" (never succeeds)
    [[403]]          always 403 Forbidden (a gateway refusing the key; never succeeds)
    [[sleep:S]]      this request's latency is S seconds (overrides the latency model)
    [[retry_after:S]]  Retry-After value for [[429]] (float seconds allowed)
    [[text_usage]]   the usage counts are strings ("3"), as some servers write them
    [[redirect:S]]   answers status S (301, 302, 307, 308) with ``Location`` to
                     ``--redirect-to`` (default: this server's /v1/elsewhere); immediate
    [[reasoning:field|legacy|inline|close_only|unclosed|field_unclosed]]  reasoning
                     output shapes of vLLM (see DESIGN.md §5); for /v1/completions only
                     the in-text shapes (inline, close_only, unclosed) apply.
    [[json:bad|wrong]]  with a response_format json_schema: an answer that is not JSON
                     (bad), or JSON missing the schema's first required field (wrong)

Structured outputs: a chat request with ``response_format: {"type": "json_schema", ...}``
gets, instead of the echo, JSON that follows the schema (strings are the echo, integers the
prompt's word count, numbers 0.5, booleans true, arrays two items, optional nullable fields
null; ``$ref`` resolved), so tests can check both the parsing and the row alignment.
Image inputs: a user message whose content parts hold ``image_url`` parts gets
`` [images: K]`` after the echo.

"Immediate" faults are admission rejections (like a proxy or a full queue): no slot, no
latency. The others model an engine failing mid-generation.

Latency: ``--latency-model fixed`` sleeps ``--latency`` seconds per request;
``lognormal`` derives each request's latency from a hash of its prompt (so the same row
always gets the same latency): median ``--latency``, sigma = ln(25) / z(0.99) ≈ 1.3837,
so about 1 % of rows take more than 25x the median (mean ≈ 2.6x the median).
The sleep happens while holding one of ``--slots`` (0 = unlimited) slots; requests
beyond that wait in line (FIFO), like vLLM's scheduler with ``--max-num-seqs``. The slot
count can change while the server runs: ``POST /_slots`` with ``{"slots": N}``, or
``--slots-schedule "5:128,10:256"`` (128 slots 5 s after the first generation request,
256 at 10 s). Raising it admits waiters at once, in arrival order; lowering it lets the
running requests finish and admits no one until fewer than N run.
``--max-queued N`` is vLLM's ``--max-num-queued-reqs``: a request that would make
running + waiting exceed N is answered at once (no slot, no latency) 503 with vLLM's
QueueOverflowError message and ``type`` "Service Unavailable".

Load reporting, as vLLM 0.32 does it (DESIGN.md §7):
``GET /metrics`` is Prometheus text as vLLM's prometheus_client writes it: the gauges
``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:num_requests_waiting_by_reason`` (``reason="capacity"``, and ``"deferred"`` always 0),
``vllm:kv_cache_usage_perc`` (running / slots, 0 with unlimited slots), among other
metrics (``vllm:cache_config_info``, token and success counters, an e2e latency histogram),
labelled ``{engine="0",model_name="<first --model>"}``. With ``--engines K`` the engines
report separately, ``engine="0"`` to ``"K-1"``: each total (running, waiting, slots, the
counters) is split evenly, engine e getting ``total // K`` plus one if ``e < total % K``,
so a client must sum them; each engine's KV usage is its running / its slots.
A generation request with header ``endpoint-load-metrics-format: json`` (or ``text``)
gets, on a 200 answer only (vLLM sends none with errors; nor does ``[[truncate]]``),
``endpoint-load-metrics: JSON {"named_metrics": {"num_requests_waiting": 3.0,
"kv_cache_usage_perc": 0.25}}`` or ``TEXT named_metrics.num_requests_waiting=3.0,
named_metrics.kv_cache_usage_perc=0.25``, in vLLM's registry order, taken once the
generation is done and its slot freed. With several engines TEXT lists every engine's
value (all waiting, then all usage) and JSON only the last engine's, as vLLM's dict does.
``--metrics-lag S`` makes both report the state of S seconds ago (zeros until the first
change that old), like vLLM's trailing gauges; counters are not delayed.
``--no-metrics`` makes another OpenAI-compatible server: ``/metrics`` answers 404 and no
response carries the header.

Test-control endpoints: ``GET /_log`` (the generation requests, in order of arrival),
``GET /_stats`` (counters, including ``models_requests``: the ``GET /v1/models`` calls,
which ``/_log`` leaves out; ``metrics_requests``: the ``GET /metrics`` calls;
``load_header_requests``: the generation requests asking for the header; ``rejected``: the
``--max-queued`` 503s; ``running`` and ``waiting`` (holding a slot / waiting for one) and
their maxima; ``slots``: the current capacity, 0 = unlimited; ``timeline``:
``[t, in_flight]`` and ``queue_timeline``: ``[t, running, waiting]`` on every change,
unless ``--no-timeline``), ``POST /_reset`` (counters to 0, maxima to the current values;
the Prometheus counters never reset), ``POST /_slots``, and ``POST /_fail`` with
``{"status": 500, "seconds": S}``: every generation request is answered that status
for S seconds (a vLLM engine failing while its server shuts down).

:class:`BlackHole` is a listening socket that never completes a connection: a host whose
SYNs are dropped, to test connect timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from statistics import NormalDist
from typing import Any, NamedTuple, NoReturn, Self

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

MAX_MODEL_LEN = 512
HANG_SECONDS = 3600.0
# P(latency > 25 * median) = 1 %  <=>  ln(25) / sigma = z(0.99)
_STANDARD_NORMAL = NormalDist()
LOGNORMAL_SIGMA = math.log(25.0) / _STANDARD_NORMAL.inv_cdf(0.99)

_DIRECTIVE = re.compile(r"\[\[([A-Za-z0-9_]+)(?::([^\]]*))?\]\]")
_COUNTED = frozenset({"408", "429", "500", "503", "drop", "hang", "malformed", "truncate", "no_message", "null_message", "null_content"})
_REASONING_SHAPES = frozenset({"field", "legacy", "inline", "close_only", "unclosed", "field_unclosed"})
_CONTEXT_LENGTH_MESSAGE = "This model's maximum context length is 512 tokens. However, you requested 900 tokens."
_MALFORMED_BODY = b'{"id": "x", "choi'
_JSON = "application/json"
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# vLLM's QueueOverflowError (--max-num-queued-reqs), answered 503 with type "Service Unavailable"
_QUEUE_OVERFLOW_MESSAGE = "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance."
_LOAD_FORMAT_HEADER = "endpoint-load-metrics-format"
_LOAD_HEADER = "endpoint-load-metrics"
# What vLLM 0.32's prometheus_client serves /metrics as (its CONTENT_TYPE_LATEST).
_METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
# vLLM's default "request_latency" buckets (v1/metrics/buckets.py), in seconds.
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
# vllm:cache_config_info labels: static, like a real engine's after its start-up profiling.
# kv_cache_max_concurrency bounds full-length (512-token) requests and says nothing about --slots.
_CACHE_CONFIG = {
    "block_size": "16",
    "cache_dtype": "auto",
    "enable_prefix_caching": "True",
    "gpu_memory_utilization": "0.9",
    "kv_cache_max_concurrency": "128.0",
    "kv_cache_size_tokens": "65536",
    "num_gpu_blocks": "4096",
    "prefix_caching_hash_algo": "sha256",
}
_SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


class BadDirective(ValueError):
    pass


class Directives:
    """What the ``[[...]]`` markers in one prompt ask for."""

    __slots__ = ("always", "faults", "json", "reasoning", "redirect", "retry_after", "sleep", "text_usage")

    def __init__(self, text: str) -> None:
        self.faults: list[tuple[str, int]] = []  # counted faults, in prompt order
        self.always: str | None = None  # "400" or "403", once the counted faults are used up
        self.sleep: float | None = None
        self.retry_after: float | None = None
        self.reasoning: str | None = None
        self.text_usage = False
        self.redirect: int | None = None
        self.json: str | None = None
        for match in _DIRECTIVE.finditer(text):
            name, arg = match.group(1).lower(), match.group(2)
            try:
                if name in _COUNTED:
                    self.faults.append((name, 1 if arg is None else int(arg)))
                elif name in ("400", "403"):
                    self.always = name
                elif name == "sleep":
                    self.sleep = float(arg or "")
                elif name == "retry_after":
                    self.retry_after = float(arg or "")
                elif name == "text_usage":
                    self.text_usage = True
                elif name == "redirect":
                    self.redirect = int(arg or "")
                    if self.redirect not in (301, 302, 303, 307, 308):
                        raise ValueError(arg)
                elif name == "reasoning":
                    if arg not in _REASONING_SHAPES:
                        raise ValueError(arg)
                    self.reasoning = arg
                elif name == "json":
                    if arg not in ("bad", "wrong"):
                        raise ValueError(arg)
                    self.json = arg
                # Unknown names are ordinary prompt text.
            except ValueError:
                raise BadDirective(f"fake_server: bad directive {match.group(0)}") from None


def _error(status: int, message: str, err_type: str, headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=_JSON,
        headers=headers,
    )


def _forbidden() -> web.Response:
    return _error(403, "Forbidden (fake_server [[403]]).", "PermissionDeniedError")


def _unauthorized() -> web.Response:
    # vLLM's exact 401 body (from its AuthenticationMiddleware): "error" is a string.
    return web.Response(status=401, body=b'{"error": "Unauthorized"}', content_type=_JSON)


def _json(obj: Any) -> web.Response:
    return web.Response(body=json.dumps(obj).encode(), content_type=_JSON)


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a content-parts list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def _break_choice(choice: dict[str, Any], fault: str, chat: bool) -> None:
    """The answer-less shapes of [[no_message]], [[null_message]] and [[null_content]]."""
    if not chat:
        choice.pop("text") if fault == "no_message" else choice.update(text=None)
    elif fault == "no_message":
        del choice["message"]
    elif fault == "null_message":
        choice["message"] = None
    else:
        choice["message"].update(content=None, reasoning=None)


def _image_count(messages: Any) -> int:
    """``image_url`` parts in the last user message."""
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    content = user.get("content")
    return sum(isinstance(p, dict) and p.get("type") == "image_url" for p in content) if isinstance(content, list) else 0


def _schema_value(node: Any, root: dict[str, Any], prompt: str) -> Any:
    """A value that follows the JSON schema ``node``, derived from the prompt."""
    if not isinstance(node, dict):
        return None
    if "$ref" in node:
        target: Any = root
        for part in str(node["$ref"])[2:].split("/"):
            target = target[part]
        return _schema_value(target, root, prompt)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            options = [o for o in node[key] if not (isinstance(o, dict) and o.get("type") == "null")]
            return _schema_value(options[0], root, prompt)
    if "enum" in node:
        return node["enum"][0]
    if "const" in node:
        return node["const"]
    kind = node.get("type")
    kind = next(t for t in kind if t != "null") if isinstance(kind, list) else kind
    if kind == "string":
        return "echo: " + prompt
    if kind == "integer":
        return len(prompt.split())
    if kind == "number":
        return 0.5
    if kind == "boolean":
        return True
    if kind == "array":
        return [_schema_value(node.get("items"), root, prompt) for _ in range(2)]
    required = set(node.get("required") or [])
    out = {}
    for name, sub in (node.get("properties") or {}).items():
        nullable = isinstance(sub, dict) and (
            any(isinstance(o, dict) and o.get("type") == "null" for o in sub.get("anyOf", []))
            or (isinstance(sub.get("type"), list) and "null" in sub["type"])
        )
        out[name] = None if nullable and name not in required else _schema_value(sub, root, prompt)
    return out


def _structured_answer(body: dict[str, Any], prompt: str, directives: Directives | None) -> str | None:
    """The answer to a request with a json_schema response_format (None without one)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = fmt["json_schema"]["schema"]
    mode = directives.json if directives is not None else None
    if mode == "bad":
        return "echo: " + prompt + " {not json"
    value = _schema_value(schema, schema, prompt)
    if mode == "wrong" and isinstance(value, dict) and schema.get("required"):
        value.pop(schema["required"][0], None)
    return json.dumps(value)


def _truncate(text: str, max_tokens: int | None) -> tuple[str, bool]:
    if max_tokens is None:
        return text, False
    words = text.split()
    if len(words) <= max_tokens:
        return text, False
    return " ".join(words[: max(max_tokens, 0)]), True


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)


def _share(total: int, engines: int, engine: int) -> int:
    """Engine ``engine``'s part of ``total`` split as evenly as possible: the parts sum to it."""
    return total // engines + (engine < total % engines)


def _number(value: float) -> str:
    """A sample value or ``le`` bound as prometheus_client writes it: Python's repr (``12.0``),
    but Go's exponent form from 7 integer digits on (``1.7961276689e+09``), ``+Inf``."""
    if value == math.inf:
        return "+Inf"
    text = repr(float(value))
    whole, dot, fraction = text.partition(".")
    if value > 0 and dot and len(whole) > 6:
        digits = (whole + fraction).rstrip("0")
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{mantissa}e+{len(whole) - 1:02d}"
    return text


def _labels(labels: Mapping[str, str]) -> str:
    """``{a="1",b="2"}`` (nothing without labels): names sorted and values escaped, as
    prometheus_client writes them."""
    if not labels:
        return ""
    pairs = (f'{name}="{_escape(value)}"' for name, value in sorted(labels.items()))
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


class Sample(NamedTuple):
    """One line of a Prometheus text exposition: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition; a line that is neither a sample nor a
    ``#`` comment raises ValueError."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        name, label_text, value = match.groups()
        labels: dict[str, str] = {}
        if label_text:
            end = 0
            for pair in _LABEL_PAIR.finditer(label_text):
                if pair.start() != end:
                    break
                labels[pair.group(1)] = _unescape(pair.group(2))
                end = pair.end()
            if end != len(label_text):
                raise ValueError(f"bad labels in Prometheus sample line: {line!r}")
        samples.append(Sample(name, labels, float(value)))
    return samples


class SlotGate:
    """FIFO admission to ``capacity`` slots (0 = unlimited), like vLLM's scheduler with
    ``max_num_seqs``, but the capacity may change while requests hold slots: raising it admits
    waiters at once, in arrival order; lowering it lets running requests finish and admits no
    one until fewer than ``capacity`` run. ``on_change(now)`` is called after every change of
    ``running`` or ``waiting``."""

    __slots__ = ("_on_change", "_waiters", "capacity", "running")

    def __init__(self, capacity: int, on_change: Callable[[float], None]) -> None:
        self.capacity = capacity
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, now: float) -> None:
        """Take a slot, waiting in line for one if none is free (or others already wait)."""
        if not self._waiters and (self.capacity == 0 or self.running < self.capacity):
            self.running += 1
            self._on_change(now)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._on_change(now)
        try:
            await waiter  # release() or set_capacity() hands the slot over, running counted
        except asyncio.CancelledError:  # the client left, or the server shuts down
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # _admit may have dropped it already
                    self._waiters.remove(waiter)
                self._on_change(time.monotonic())
            else:  # handed a slot just before the cancellation arrived
                self.release(time.monotonic())
            raise

    def release(self, now: float) -> None:
        self.running -= 1
        if self._waiters:
            self._admit()
        self._on_change(now)

    def set_capacity(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self._admit()
        self._on_change(now)

    def _admit(self) -> None:
        while self._waiters and (self.capacity == 0 or self.running < self.capacity):
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter leaves the line itself
                waiter.set_result(None)
                self.running += 1


class FakeVLLM:
    """Server state and the request handler (aiohttp's low-level server: no router)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.models: list[str] = args.model or ["fake-model"]
        self.model_set = frozenset(self.models)
        self.latency: float = args.latency
        self.lognormal = args.latency_model == "lognormal"
        self.auth_header = f"Bearer {args.api_key}" if args.api_key else None
        self.record_timeline = not args.no_timeline
        self.record_log = not args.no_log
        self.in_flight = 0
        self.gate = SlotGate(args.slots, self._queue_changed)
        self.engines: int = args.engines
        self.max_queued: int = args.max_queued
        self.report_load = not args.no_metrics
        self.metrics_lag: float = args.metrics_lag
        # (time, running, waiting, slots) on every change, back to the newest older than the lag
        self.history: deque[tuple[float, int, int, int]] | None = deque() if self.metrics_lag > 0 else None
        self.slots_schedule: list[tuple[float, int]] | None = args.slots_schedule
        self._schedule_task: asyncio.Task[None] | None = None  # referenced, so never collected
        # The Prometheus counters never reset, as a real server's do not.
        self.started = time.time()
        self.succeeded = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency_counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # per bucket, the last is +Inf
        self.latency_sum = 0.0
        self._id_prefix = f"{os.getpid():x}"  # response ids: unique per server
        self.redirect_to: str | None = args.redirect_to
        self.failing_until = 0.0  # POST /_fail: every generation request fails until then
        self.failing_status = 500
        self._seq = 0
        self.reset()
        self.routes: dict[tuple[str, str], _Handler] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/_log"): self._get_log,
            ("GET", "/_stats"): self._get_stats,
            ("POST", "/_reset"): self._reset,
            ("POST", "/_fail"): self._fail,
            ("POST", "/_slots"): self._set_slots,
            ("GET", "/metrics"): self._metrics,
        }

    def reset(self) -> None:
        self.requests = 0
        self.models_requests = 0  # GET /v1/models, kept out of the generation log
        self.metrics_requests = 0  # GET /metrics
        self.load_header_requests = 0  # generation requests asking for endpoint-load-metrics
        self.rejected = 0  # --max-queued
        self.max_in_flight = self.in_flight
        self.max_running = self.gate.running
        self.max_waiting = self.gate.waiting
        # Tuples, turned into dicts only when /_log is read: keeps the hot path cheap.
        self.log: list[tuple[str, Any, bool, float]] = []
        self.attempts: dict[str, int] = {}  # per prompt text carrying counted faults
        # Two flat arrays (12 bytes per change) instead of 100k small lists.
        self.tl_time = array("d")
        self.tl_count = array("l")
        self.qt_time = array("d")
        self.qt_running = array("l")
        self.qt_waiting = array("l")

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return _error(404, f"Not Found: {request.method} {request.path}", "NotFoundError")
        if request.path == "/metrics":
            self.metrics_requests += 1
            if not self.report_load:
                return _error(404, "Not Found: GET /metrics", "NotFoundError")
        elif request.path == "/v1/models":
            self.models_requests += 1
            if self.auth_header is not None and request.headers.get("Authorization") != self.auth_header:
                # vLLM guards every /v1 path; generation requests check after logging.
                return _unauthorized()
        return await handler(request)

    # -- in-flight accounting -------------------------------------------------------

    def _track(self, delta: int, now: float) -> None:
        n = self.in_flight = self.in_flight + delta
        self.max_in_flight = max(self.max_in_flight, n)
        if self.record_timeline:
            self.tl_time.append(now)
            self.tl_count.append(n)

    def _queue_changed(self, now: float) -> None:
        running, waiting = self.gate.running, self.gate.waiting
        if running > self.max_running:
            self.max_running = running
        if waiting > self.max_waiting:
            self.max_waiting = waiting
        if self.record_timeline:
            self.qt_time.append(now)
            self.qt_running.append(running)
            self.qt_waiting.append(waiting)
        if self.history is not None:
            self.history.append((now, running, waiting, self.gate.capacity))
            self._forget(now - self.metrics_lag)

    def _forget(self, cutoff: float) -> None:
        """Drop the history older than the newest sample taken at or before ``cutoff``."""
        history = self.history
        assert history is not None
        while len(history) > 1 and history[1][0] <= cutoff:
            history.popleft()

    def _follow_schedule(self, start: float) -> None:
        """Start ``--slots-schedule``: its times count from ``start``, the first generation request."""
        steps, self.slots_schedule = self.slots_schedule or [], None

        async def follow() -> None:
            for at, slots in steps:
                await asyncio.sleep(start + at - time.monotonic())
                self.gate.set_capacity(slots, time.monotonic())

        self._schedule_task = asyncio.get_running_loop().create_task(follow())

    # -- generation -----------------------------------------------------------------

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.BaseRequest, chat: bool) -> web.StreamResponse:
        now = time.monotonic()
        self.requests += 1
        self._track(1, now)
        if self.slots_schedule is not None:
            self._follow_schedule(now)
        load_format = request.headers.get(_LOAD_FORMAT_HEADER)
        if load_format:
            self.load_header_requests += 1
        try:
            raw = await request.read()
            has_auth = "Authorization" in request.headers
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            if self.record_log:
                self.log.append((request.path, body, has_auth, now))
            if now < self.failing_until:
                return _error(self.failing_status, "EngineCore encountered an issue (fake_server /_fail).", "InternalServerError")

            if self.auth_header is not None and request.headers.get("Authorization") != self.auth_header:
                return _unauthorized()
            if not isinstance(body, dict):
                return _error(400, "Request body is not a JSON object.", "BadRequestError")
            model = body.get("model")
            if model is None:
                model = self.models[0]
            elif model not in self.model_set:
                return _error(404, f"The model `{model}` does not exist.", "NotFoundError")

            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    return _error(400, "`messages` must be a non-empty list.", "BadRequestError")
                prompts = [
                    next(
                        (_text_of(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                        "",
                    )
                ]
                prompt_tokens = sum(len(_text_of(m.get("content")).split()) for m in messages if isinstance(m, dict))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, str):
                    prompts = [prompt]
                elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                    prompts = prompt
                else:
                    return _error(
                        400,
                        "`prompt` must be a string or a list of strings.",
                        "BadRequestError",
                    )
                prompt_tokens = sum(len(p.split()) for p in prompts)
            key = prompts[0] if len(prompts) == 1 else "\n".join(prompts)

            directives: Directives | None = None
            fault: str | None = None
            if "[[" in key:  # fast path: most rows carry no directive
                try:
                    directives = Directives(key)
                except BadDirective as exc:
                    return _error(400, str(exc), "BadRequestError")
                if directives.faults:
                    fault = self._next_fault(key, directives.faults)
                if fault is None and directives.always == "400":
                    return _error(400, _CONTEXT_LENGTH_MESSAGE, "BadRequestError")
                if fault is None and directives.always == "403":
                    return _forbidden()
                if directives.redirect is not None:
                    location = self.redirect_to or f"http://127.0.0.1:{request.url.port}/v1/elsewhere"
                    return web.Response(status=directives.redirect, headers={"Location": location})
                if fault == "429":
                    retry_after = 1.0 if directives.retry_after is None else directives.retry_after
                    return _error(
                        429,
                        "Too many requests (fake_server [[429]]).",
                        "RateLimitError",
                        {"Retry-After": _format_seconds(retry_after)},
                    )
                if fault == "503":
                    return _error(
                        503,
                        "Service unavailable (fake_server [[503]]).",
                        "ServiceUnavailableError",
                    )
                if fault == "408":
                    return _error(408, "Request timeout (fake_server [[408]]).", "TimeoutError")

            if directives is not None and directives.sleep is not None:
                latency = directives.sleep
            elif self.lognormal and self.latency > 0:
                latency = self._lognormal_latency(key)
            else:
                latency = self.latency

            # vLLM's --max-num-queued-reqs: running + waiting + this one may not pass the limit
            if self.max_queued and self.gate.running + self.gate.waiting >= self.max_queued:
                self.rejected += 1
                return _error(503, _QUEUE_OVERFLOW_MESSAGE, "Service Unavailable")
            # Queue for a slot like vLLM's scheduler.
            await self.gate.acquire(time.monotonic())
            try:
                response = await self._run(
                    request, body, chat, model, prompts, prompt_tokens,
                    directives, fault, latency,
                )  # fmt: skip
            finally:
                self.gate.release(time.monotonic())
            if response.status == 200:
                self._observe(time.monotonic() - now)
                # vLLM adds the header to its 200 answers only, built once the generation is done.
                if load_format and self.report_load:
                    header = self._load_header(load_format)
                    if header is not None:
                        response.headers[_LOAD_HEADER] = header
            return response
        finally:
            self._track(-1, time.monotonic())

    def _next_fault(self, key: str, faults: list[tuple[str, int]]) -> str | None:
        attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        for name, count in faults:
            if attempt <= count:
                return name
            attempt -= count
        return None

    def _lognormal_latency(self, prompt: str) -> float:
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64  # uniform in (0, 1)
        return self.latency * math.exp(LOGNORMAL_SIGMA * _STANDARD_NORMAL.inv_cdf(u))

    async def _run(
        self,
        request: web.BaseRequest,
        body: dict[str, Any],
        chat: bool,
        model: str,
        prompts: list[str],
        prompt_tokens: int,
        directives: Directives | None,
        fault: str | None,
        latency: float,
    ) -> web.StreamResponse:
        """The "generation": runs for the latency while its caller holds a slot."""
        if fault == "hang":
            # Cancelled when the client disconnects or the server shuts down.
            await asyncio.sleep(HANG_SECONDS)
        elif latency > 0:
            await asyncio.sleep(latency)
        if fault == "500":
            return _error(
                500,
                "Internal server error (fake_server [[500]]).",
                "InternalServerError",
            )
        if fault == "drop":
            # Close the socket without a response; raising CancelledError makes
            # aiohttp end the handler quietly, not write to a closed transport.
            assert request.protocol is not None
            request.protocol.force_close()
            raise asyncio.CancelledError
        if fault == "malformed":
            return web.Response(body=_MALFORMED_BODY, content_type=_JSON)
        completion = self._completion(body, chat, model, prompts, prompt_tokens, directives)
        if fault in ("no_message", "null_message", "null_content"):
            for choice in completion["choices"]:
                _break_choice(choice, fault, chat)
        if directives is not None and directives.text_usage:
            completion["usage"] = {k: str(v) if isinstance(v, int) else v for k, v in completion["usage"].items()}
        if fault == "truncate":
            await self._send_truncated(request, json.dumps(completion).encode())
        return _json(completion)

    @staticmethod
    async def _send_truncated(request: web.BaseRequest, body: bytes) -> NoReturn:
        """Headers promising ``body``, half of it, then a closed connection."""
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        assert request.protocol is not None
        request.protocol.force_close()  # flushes what was written, then closes
        raise asyncio.CancelledError  # as for [[drop]]: end the handler quietly

    def _completion(
        self,
        body: dict[str, Any],
        chat: bool,
        model: str,
        prompts: list[str],
        prompt_tokens: int,
        directives: Directives | None,
    ) -> dict[str, Any]:
        n = body.get("n")
        n = n if isinstance(n, int) and n > 1 else 1
        max_tokens = body.get("max_tokens")
        if max_tokens is None and chat:
            max_tokens = body.get("max_completion_tokens")
        if not isinstance(max_tokens, int):
            max_tokens = None
        shape = directives.reasoning if directives is not None else None
        images = _image_count(body.get("messages")) if chat else 0
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for prompt in prompts:
            thinking = "thinking about " + prompt
            for i in range(n):
                echo = "echo: " + prompt + (f" #{i}" if n > 1 else "") + (f" [images: {images}]" if images else "")
                structured = _structured_answer(body, prompt + (f" #{i}" if n > 1 else ""), directives) if chat else None
                if structured is not None:
                    echo = structured
                content: str | None = echo
                reasoning: str | None = None
                finish = "stop"
                if shape == "inline":
                    content = f"<think>{thinking}</think>\n\n{echo}"
                elif shape == "close_only":
                    content = f"{thinking}</think>\n\n{echo}"
                elif shape == "unclosed":
                    content, finish = "<think>" + thinking, "length"
                elif chat and shape in ("field", "legacy"):
                    reasoning = thinking
                elif chat and shape == "field_unclosed":
                    content, reasoning, finish = None, thinking, "length"
                if content is not None:
                    content, cut = _truncate(content, max_tokens)
                    if cut:
                        finish = "length"
                    completion_tokens += len(content.split())
                if reasoning is not None:
                    completion_tokens += len(reasoning.split())
                index = len(choices)
                if chat:
                    message: dict[str, Any] = {
                        "role": "assistant",
                        "content": content,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                    }
                    if shape == "legacy":
                        # the field's name in older vLLM
                        message["reasoning_content"] = reasoning
                    else:
                        message["reasoning"] = reasoning
                    choices.append(
                        {
                            "index": index,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": None,
                            "token_ids": None,
                        }
                    )
                else:
                    choices.append(
                        {
                            "index": index,
                            "text": content,
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": None,
                            "token_ids": None,
                            "prompt_logprobs": None,
                            "prompt_token_ids": None,
                        }
                    )
        self._seq += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{self._id_prefix}{self._seq:08x}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    # -- load reporting (vLLM's /metrics gauges and endpoint-load-metrics header) -----

    def _observe(self, seconds: float) -> None:
        """A 200 answer: vllm:request_success_total and vllm:e2e_request_latency_seconds."""
        self.succeeded += 1
        self.latency_counts[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def _engine_load(self) -> list[tuple[int, int, float]]:
        """Per engine, (running, waiting, kv_cache_usage_perc) as its gauges read: the state
        now, or ``--metrics-lag`` seconds ago (zeros before the first change that old)."""
        running, waiting, slots = self.gate.running, self.gate.waiting, self.gate.capacity
        if self.history is not None:
            cutoff = time.monotonic() - self.metrics_lag
            self._forget(cutoff)
            if self.history and self.history[0][0] <= cutoff:
                _, running, waiting, slots = self.history[0]
            else:
                running = waiting = 0
        k = self.engines
        load = []
        for engine in range(k):
            share = _share(running, k, engine)
            # the share of the KV cache in use; never above 1 while a lowered capacity drains
            usage = min(1.0, share / _share(slots, k, engine)) if slots else 0.0
            load.append((share, _share(waiting, k, engine), usage))
        return load

    def _load_header(self, load_format: str) -> str | None:
        """vLLM's ``endpoint-load-metrics`` value: its metrics in registry order, one pair per
        engine in ``text``; in ``json`` a dict, which keeps only the last engine's values."""
        kind = load_format.lower()
        if kind not in ("json", "text"):
            return None  # vLLM logs a warning and sends no header
        load = self._engine_load()
        if kind == "json":
            _, waiting, usage = load[-1]
            return "JSON " + json.dumps({"named_metrics": {"num_requests_waiting": float(waiting), "kv_cache_usage_perc": usage}})
        pairs = [f"named_metrics.num_requests_waiting={float(w)}" for _, w, _ in load]
        pairs += [f"named_metrics.kv_cache_usage_perc={u}" for _, _, u in load]
        return "TEXT " + ", ".join(pairs)

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        text = self._exposition()
        return web.Response(body=text.encode(), headers={"Content-Type": _METRICS_CONTENT_TYPE})

    def _exposition(self) -> str:
        """/metrics as vLLM 0.32 writes it (prometheus_client's text format), abridged to the
        load gauges and a few counters and a histogram around them."""
        out: list[str] = []
        model = self.models[0]
        engines = [{"engine": str(e), "model_name": model} for e in range(self.engines)]

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{suffix}{_labels(labels)} {_number(value)}\n" for suffix, labels, value in samples)

        def counter(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            family(name + "_total", "counter", help_text, [("", labels, value) for labels, value in samples])
            family(name + "_created", "gauge", help_text, [("", labels, self.started) for labels, _ in samples])

        def split(total: int) -> list[float]:
            return [float(_share(total, self.engines, e)) for e in range(self.engines)]

        major, minor, micro = (str(n) for n in sys.version_info[:3])
        python = {"implementation": platform.python_implementation(), "major": major, "minor": minor, "patchlevel": micro}
        family("python_info", "gauge", "Python platform information", [("", {**python, "version": f"{major}.{minor}.{micro}"}, 1.0)])
        family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", [("", {}, self.started)])
        load = self._engine_load()
        running = [("", labels, float(r)) for labels, (r, _, _) in zip(engines, load)]
        family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", running)
        waiting = [("", labels, float(w)) for labels, (_, w, _) in zip(engines, load)]
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting)
        by_reason = [("", {**labels, "reason": "capacity"}, value) for _, labels, value in waiting]
        by_reason += [("", {**labels, "reason": "deferred"}, 0.0) for labels in engines]
        reasons = "Number of waiting requests by reason: 'capacity' (no free slot) or 'deferred' (LoRA budget, KV transfer)."
        family("vllm:num_requests_waiting_by_reason", "gauge", reasons, by_reason)
        usage = [("", labels, u) for labels, (_, _, u) in zip(engines, load)]
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage)
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.", list(zip(engines, split(self.prompt_tokens))))
        counter("vllm:generation_tokens", "Number of generation tokens processed.", list(zip(engines, split(self.generation_tokens))))
        counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [
                ({**labels, "finished_reason": reason}, share if reason == "stop" else 0.0)
                for reason in _FINISHED_REASONS
                for labels, share in zip(engines, split(self.succeeded))
            ],
        )
        # cumulative bucket counts, each split over the engines like the totals
        cumulative, running_count = [], 0
        for count in self.latency_counts:
            running_count += count
            cumulative.append(running_count)
        histogram: list[tuple[str, dict[str, str], float]] = []
        for e, labels in enumerate(engines):
            for bound, total in zip((*_LATENCY_BUCKETS, math.inf), cumulative):
                histogram.append(("_bucket", {**labels, "le": _number(bound)}, float(_share(total, self.engines, e))))
            count = _share(self.succeeded, self.engines, e)
            histogram.append(("_count", labels, float(count)))
            histogram.append(("_sum", labels, self.latency_sum * count / self.succeeded if self.succeeded else 0.0))
        e2e = "Histogram of e2e request latency in seconds."
        family("vllm:e2e_request_latency_seconds", "histogram", e2e, histogram)
        family("vllm:e2e_request_latency_seconds_created", "gauge", e2e, [("", labels, self.started) for labels in engines])
        info = [("", {**_CACHE_CONFIG, "engine": labels["engine"]}, 1.0) for labels in engines]
        family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", info)
        return "".join(out)

    # -- other endpoints ------------------------------------------------------------

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        created = int(time.time())
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "vllm",
                        "root": name,
                        "parent": None,
                        "max_model_len": MAX_MODEL_LEN,
                        "permission": [],
                    }
                    for name in self.models
                ],
            }
        )

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    async def _get_log(self, request: web.BaseRequest) -> web.StreamResponse:
        return _json([{"path": path, "body": body, "headers": {"has_auth": has_auth}, "t": t} for path, body, has_auth, t in self.log])

    async def _get_stats(self, request: web.BaseRequest) -> web.StreamResponse:
        return _json(
            {
                "requests": self.requests,
                "models_requests": self.models_requests,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "running": self.gate.running,
                "max_running": self.max_running,
                "waiting": self.gate.waiting,
                "max_waiting": self.max_waiting,
                "slots": self.gate.capacity,
                "rejected": self.rejected,
                "metrics_requests": self.metrics_requests,
                "load_header_requests": self.load_header_requests,
                "timeline": [[t, n] for t, n in zip(self.tl_time, self.tl_count, strict=True)],
                "queue_timeline": [list(c) for c in zip(self.qt_time, self.qt_running, self.qt_waiting, strict=True)],
            }
        )

    async def _reset(self, request: web.BaseRequest) -> web.StreamResponse:
        self.reset()
        return _json({"ok": True})

    async def _set_slots(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            slots = json.loads(await request.read())["slots"]
        except (ValueError, KeyError, TypeError):
            slots = None
        if type(slots) is not int or slots < self.engines:
            return _error(400, f'/_slots takes {{"slots": N}}, N an integer >= {self.engines} (one per engine)', "BadRequestError")
        self.gate.set_capacity(slots, time.monotonic())
        return _json({"ok": True})

    async def _fail(self, request: web.BaseRequest) -> web.StreamResponse:
        spec = json.loads(await request.read() or b"{}")
        self.failing_status = int(spec.get("status", 500))
        self.failing_until = time.monotonic() + float(spec.get("seconds", 1.0))
        return _json({"ok": True})


def _slots_schedule(text: str) -> list[tuple[float, int]]:
    """``--slots-schedule "5:128,10:256"``: (seconds, slots) steps, in time order."""
    steps = []
    for step in text.split(","):
        at, _, slots = step.partition(":")
        try:
            seconds, count = float(at), int(slots)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad step {step!r}: want SECONDS:SLOTS, e.g. 5:128") from None
        if seconds < 0 or count < 1:
            raise argparse.ArgumentTypeError(f"bad step {step!r}: seconds must be >= 0 and slots >= 1")
        steps.append((seconds, count))
    return sorted(steps)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake vLLM OpenAI-compatible server.")
    parser.add_argument("--port", type=int, default=0, help="0 = let the OS pick")
    parser.add_argument("--slots", type=int, default=0, help="concurrent generations, all engines together (0 = unlimited)")
    parser.add_argument(
        "--slots-schedule",
        type=_slots_schedule,
        default=None,
        help='"T1:N1,T2:N2": set the slots to N1 T1 seconds after the first generation request, ...',
    )
    parser.add_argument("--engines", type=int, default=1, help="data-parallel engines the metrics report separately")
    parser.add_argument("--max-queued", type=int, default=0, help="vLLM's --max-num-queued-reqs: 503 past it (0 = no limit)")
    parser.add_argument("--metrics-lag", type=float, default=0.0, help="seconds the load gauges and header trail the state by")
    parser.add_argument("--no-metrics", action="store_true", help="no /metrics (404) and no endpoint-load-metrics header")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds (median for lognormal)")
    parser.add_argument("--latency-model", choices=("fixed", "lognormal"), default="fixed")
    parser.add_argument("--model", action="append", help="served model name (repeatable)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--redirect-to", default=None, help="Location of [[redirect:S]] answers")
    parser.add_argument("--no-timeline", action="store_true", help="do not record /_stats timeline")
    parser.add_argument("--no-log", action="store_true", help="do not record /_log")
    parser.add_argument(
        "--bind-retry",
        type=float,
        default=0.0,
        help="seconds to keep retrying a busy --port (a restart on the same port)",
    )
    parser.add_argument(
        "--listen-delay",
        type=float,
        default=0.0,
        help="seconds between binding and listening (connections are refused)",
    )
    args = parser.parse_args(argv)
    if args.engines < 1:
        parser.error("--engines must be >= 1")
    smallest = min([args.slots or args.engines] + [n for _, n in args.slots_schedule or []])
    if args.slots < 0 or smallest < args.engines:
        parser.error("--slots and --slots-schedule give each engine at least one slot (or --slots 0: unlimited)")
    if args.max_queued < 0 or args.metrics_lag < 0:
        parser.error("--max-queued and --metrics-lag must be >= 0")
    return args


def _bind(port: int, retry_seconds: float) -> socket.socket:
    """A socket bound to 127.0.0.1:port, retrying while another process holds the port."""
    deadline = time.monotonic() + retry_seconds
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # like asyncio's create_server: rebinding a port with TIME_WAIT connections works
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.005)  # the restart blip lasts at most this long after the old exits


async def _serve(args: argparse.Namespace) -> None:
    app = FakeVLLM(args)
    # ~50 allocations per request: the default gen-0 threshold (700) collects every
    # ~14 requests, scanning startup objects too. This cuts server CPU by ~10 %.
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)
    loop = asyncio.get_running_loop()

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # The low-level server's default factory caps bodies at 1 MiB: too small.
        return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=64 * 2**20)

    server = web.Server(
        app,
        request_factory=make_request,
        # Like vLLM, abort a generation when its client leaves (frees [[hang]] slots).
        handler_cancellation=True,
        access_log=None,  # no per-request logging
    )
    # On shutdown, give in-flight handlers (a [[hang]]) a moment, then cancel them.
    runner = web.ServerRunner(server, shutdown_timeout=0.2)
    await runner.setup()
    if args.bind_retry > 0:
        sys.stdout.write(f"WAITING {args.port}\n")
        sys.stdout.flush()
    sock = _bind(args.port, args.bind_retry)
    if args.listen_delay > 0:
        # bound but not listening: Linux answers a SYN with a reset (connection refused)
        await asyncio.sleep(args.listen_delay)
    # A large backlog: 256+ clients connecting at once must not hit SYN retransmits.
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    port = sock.getsockname()[1]
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parse_args(argv)))


# -- the test/benchmark helper -------------------------------------------------------

# Never send 127.0.0.1 traffic through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FakeServer:
    """``fake_server.py`` as a subprocess: ``with FakeServer("--slots", "8") as s:``.

    ``s.url`` is ``http://127.0.0.1:<port>``; ``log()``, ``stats()``, ``reset()``,
    ``fail()``, ``set_slots()`` call the test-control endpoints; ``metrics()`` parses
    ``/metrics``; ``kill()`` SIGKILLs the server; ``restart()`` kills it
    and starts another on the same port.
    """

    STARTUP_TIMEOUT = 15.0

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""

    def __enter__(self) -> Self:
        self.proc = self._spawn("--port", "0", *self.args)
        try:
            self.port = self._read_port(self.proc)
        except BaseException:
            self._stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, os.path.abspath(__file__), *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, env=self.env)

    def restart(
        self,
        *args: str,
        down: float = 0.0,
        before_kill: Callable[[], object] | None = None,
    ) -> None:
        """SIGKILL the server and start a new one on the same port (``args`` replace the
        arguments when given). The new process is started first and binds as soon as the
        port is free, so connections are refused for ``down`` seconds plus a few
        milliseconds (a restart blip); requests in flight are dropped, and the log and
        stats start empty. ``before_kill`` runs once the new process waits for the port
        (starting it takes a while): start the load there to kill the server mid-run."""
        if args:
            self.args = args
        timing = ["--bind-retry", "30", "--listen-delay", repr(down)]
        new = self._spawn("--port", str(self.port), *timing, *self.args)
        try:
            self._read_line(new, "WAITING")  # about to bind: the blip starts at the kill
            if before_kill is not None:
                before_kill()
        except BaseException:
            self._terminate(new)
            raise
        self.kill()
        self._stop()
        self.proc = new  # stopped by __exit__ even if it never listens
        port = self._read_line(new, "LISTENING", extra=down)
        assert port == self.port, (port, self.port)

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    @classmethod
    def _read_port(cls, proc: subprocess.Popen[bytes]) -> int:
        return cls._read_line(proc, "LISTENING")

    @classmethod
    def _read_line(cls, proc: subprocess.Popen[bytes], word: str, extra: float = 0.0) -> int:
        """The port from the server's next line, which must be ``<word> <port>``."""
        assert proc.stdout is not None
        deadline = time.monotonic() + cls.STARTUP_TIMEOUT + extra
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            # byte by byte: a second line must stay in the pipe for the next call
            while not buf.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fake server printed no {word} line in {cls.STARTUP_TIMEOUT + extra}s")
                if not sel.select(remaining):
                    continue
                chunk = os.read(proc.stdout.fileno(), 1)
                if not chunk:
                    raise RuntimeError(f"fake server exited before {word} (rc={proc.wait()})")
                buf += chunk
        line = buf.decode().rstrip("\n")
        if not line.startswith(word + " "):
            raise RuntimeError(f"unexpected fake server output: {line!r}")
        return int(line.split()[1])

    def _stop(self) -> None:
        if self.proc is not None:
            self._terminate(self.proc)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the server (a "server dies mid-run" test)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
        req = urllib.request.Request(self.url + path, method=method, data=data)
        with OPENER.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def log(self) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = self._call("GET", "/_log")
        return log

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._call("GET", "/_stats")
        return stats

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def fail(self, seconds: float, status: int = 500) -> None:
        """Answer every generation request ``status`` for ``seconds`` (see ``POST /_fail``)."""
        self._call("POST", "/_fail", {"status": status, "seconds": seconds})

    def set_slots(self, slots: int) -> None:
        """Change the slot count now (see ``POST /_slots``)."""
        self._call("POST", "/_slots", {"slots": slots})

    def metrics(self) -> list[Sample]:
        """The samples of ``GET /metrics``."""
        with OPENER.open(self.url + "/metrics", timeout=30) as resp:
            return parse_metrics(resp.read().decode())


class BlackHole:
    """A port where TCP connections never complete, like a host whose SYNs are dropped:
    ``with BlackHole() as hole: hole.url``.

    A listening socket with a backlog of 0 that never accepts: once one connection waits in
    its accept queue, Linux drops every new SYN (``tcp_abort_on_overflow`` is 0 by default),
    so a client's ``connect`` hangs until its own timeout, with no refusal. Checked on
    entry: a probe connection must time out.
    """

    PROBE_SECONDS = 0.2

    def __init__(self) -> None:
        self.url = ""
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sockets.append(listener)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            address = listener.getsockname()
            for _ in range(8):  # the queue holds backlog + 1 on Linux; a few more elsewhere
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probe.settimeout(self.PROBE_SECONDS)
                try:
                    probe.connect(address)
                except TimeoutError:
                    probe.close()
                    break
                self._sockets.append(probe)  # it fills the queue: keep it open
            else:
                raise RuntimeError("BlackHole: connections still complete (not Linux?)")
        except BaseException:
            self.__exit__()
            raise
        self.url = f"http://127.0.0.1:{address[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


if __name__ == "__main__":
    main()
