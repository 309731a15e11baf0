"""The HTTP client: one event loop per process, routing over servers, deadlines, retries, and a
pool of workers that sends a batch's rows.

The hot path is raw aiohttp (one session per event loop, keep-alive) because the openai SDK
costs several times more client CPU per request (README, design notes). Every coroutine runs on
one persistent event loop per process, in a daemon thread, so synchronous callers (a
``Dataset.map`` function, a Jupyter cell with its own running loop) hand work over with
``asyncio.run_coroutine_threadsafe`` and never touch the loop themselves.
"""

from __future__ import annotations

import array
import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from .adaptive import MAX_TARGET, Controller, parse_metrics
from .errors import AuthenticationError, ModelSelectionError, RowFailedError, ServerUnavailableError
from .recipe import RetryConfig
from .wire import FinalError, Result, RetryableError, check_auth, decode, encode, redact_text, redact_url, server_message, status_error

__all__ = ["Stats", "Client", "choose_model", "run_on_loop"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Parse = Callable[[Any], Result]

# A server is down after this many refusals, or failures of different rows, in a row (_Router)
_REFUSALS_BEFORE_DOWN = 3
_PROBE_SECONDS = 1.0  # a down server is probed this often
_PROBE_TIMEOUT = 5.0
# The failures that count against the server, not the row (see _Router.failed). Not 429 and 503:
# a server saying "not now" is up, and a burst of them must not take it out of rotation.
_SERVER_FAULTS = frozenset({"connection", "connect_timeout", "dropped", *(f"http_{status}" for status in range(500, 600) if status != 503)})
# Connecting has its own short bound: a host whose SYNs vanish would otherwise hold an attempt for
# the whole request timeout while the kernel resends the SYN for two minutes.
_CONNECT_TIMEOUT = 10.0
_NOT_ACCEPTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)  # refused, or no handshake in time
# "Not now" from a server (a rate limit, vLLM's full queue): with an adaptive target, backpressure
# that lowers the server's target and costs the row no attempt (for up to retry.max_outage)
_BUSY = frozenset({"http_429", "http_503"})
_BUSY_PAUSE = 0.05  # first pause of a refused row, doubled on each refusal in a row (to max_wait)
_REPORTS_IDLE = 2.0  # seconds without a request in flight before a server's load stops being polled


# --------------------------------------------------------------------------- the event loop


class _LoopThread:
    """One event loop per process, running forever in a daemon thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-generator-loop", daemon=True)
        self.thread.start()

    def current(self) -> bool:
        # after fork (Dataset.map with num_proc>1) the parent's thread does not exist here
        return self.pid == os.getpid() and self.thread.is_alive()


_loop_thread: _LoopThread | None = None
_loop_lock = threading.Lock()
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_sessions() -> None:
    """Close open HTTP sessions at exit, so aiohttp does not warn about unclosed connectors."""
    if _loop_thread is None or not _loop_thread.current():
        return
    open_clients = [c for c in list(_clients) if c._session is not None and not c._session.closed]
    if open_clients:

        async def close_all() -> None:
            await asyncio.gather(*(c.aclose() for c in open_clients), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close_all(), _loop_thread.loop).result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # exiting anyway


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None or not _loop_thread.current():
            _loop_thread = _LoopThread()
        return _loop_thread.loop


def run_on_loop(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the process's background loop; returns a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, _get_loop())


def _close_dropped_session(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """Close the session of a Client garbage-collected without ``close()`` (a finalizer)."""
    if session.closed or os.getpid() != pid or loop.is_closed() or not loop.is_running():
        return
    try:
        asyncio.run_coroutine_threadsafe(session.close(), loop)
    except RuntimeError:  # the loop closed meanwhile
        pass


# --------------------------------------------------------------------------- counters


@dataclass
class Stats:
    """Counters for progress and the metrics file (written on the loop thread only)."""

    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_type: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # 8 bytes a row (a list of floats takes 32): memory stays flat over millions of rows
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    in_flight: int = 0
    reused: int = 0  # rows answered from the response journal (not sent)
    servers: list[Controller] = field(default_factory=list)  # each server's target and queue

    def targets(self) -> str:
        """Each server's target and queue, for the progress bar: "target 1106, queue 82"."""
        if not self.servers:
            return ""

        def queue(control: Controller) -> str:
            return "?" if control.waiting is None else f"{control.waiting:.0f}"

        if len(self.servers) == 1:
            return f"target {self.servers[0].target}, queue {queue(self.servers[0])}"
        return f"targets {'/'.join(str(c.target) for c in self.servers)}, queues {'/'.join(queue(c) for c in self.servers)}"

    @property
    def done(self) -> int:
        """Rows with a result."""
        return self.succeeded + self.failed + self.reused

    def add(self, result: Result) -> None:
        if result.error is None:
            self.succeeded += 1
            self.latencies.append(result.latency)
        else:
            self.failed += 1
            key = result.error_type or "error"
            self.failed_by_type[key] = self.failed_by_type.get(key, 0) + 1
        self.retries += max(0, result.attempts - 1)
        self.prompt_tokens += result.prompt_tokens or 0
        self.completion_tokens += result.completion_tokens or 0


# --------------------------------------------------------------------------- routing and outages


@dataclass
class _Route:
    """What the client knows of one server."""

    url: str  # root, without /v1, as requests use it
    name: str  # the same, with any password redacted: for messages and logs
    control: Controller  # its in-flight target
    in_flight: int = 0
    refusals: int = 0  # connections refused (or not accepted in time) in a row
    failing: set[int] = field(default_factory=set)  # requests whose last attempt here failed the server's way
    down_since: float | None = None  # out of rotation since
    refused_down: bool = False  # down for refusing connections (else for failing rows)
    half_open: bool = False  # down, but its probe answered: one trial request may go
    trial_row: int | None = None  # the request sending that trial
    probe: asyncio.Task[None] | None = None  # the client's probe while it is down
    reports: asyncio.Task[None] | None = None  # the client's poll of its load while it has requests
    last_refused: float = -1e9
    last_error: str = ""


class _Router:
    """Chooses the server for each attempt and tracks each server's health.

    A server is down after it refused ``_REFUSALS_BEFORE_DOWN`` connections in a row, or after
    that many different requests in a row failed there the server's way (5xx but 503, a dropped
    connection) with no success between: one row that keeps failing says nothing about the
    server. A down server gets no rows, and failures there are not charged to the rows, which go
    to another server or wait for one. The client probes a down server's ``/health``; once it
    answers, a server that refused connections is back, and one that failed rows gets one
    trial request (a circuit breaker's half-open state): /health can answer while generation
    still fails.
    """

    def __init__(
        self,
        urls: Sequence[str],
        max_outage: float,
        on_down: Callable[[_Route], None] = lambda server: None,
        fixed: int | None = None,
        on_up: Callable[[], None] = lambda: None,
    ) -> None:
        most = _open_files_allowed() // max(1, len(urls))  # sockets: one per request in flight
        self.servers = [_Route(u, redact_url(u), Controller(redact_url(u), fixed, max_target=most)) for u in urls]
        self._on_up = on_up  # the client resizes its pool: the target ramps again
        self.max_outage = max_outage
        self._on_down = on_down  # the client starts probing the server
        self._changed: asyncio.Event | None = None  # set when a server comes back or may take a trial
        self._all_down_since: float | None = None  # when the last server in rotation went down

    def pick(self) -> _Route:
        now = time.monotonic()
        up = [s for s in self.servers if s.down_since is None]
        if not up:  # every server went down since the row waited: the one down longest
            return min(self.servers, key=lambda s: s.down_since or now)
        if len(up) == 1:
            return up[0]
        # the most room relative to its target; a server that refused a connection in the last
        # second goes last, even with nothing in flight
        return min(up, key=lambda s: (now - s.last_refused < 1.0, s.in_flight / s.control.target))

    def _claim_trial(self, row: int) -> _Route | None:
        for server in self.servers:
            if server.half_open and server.trial_row is None:
                server.trial_row = row
                return server
        return None

    def end_trial(self, server: _Route, row: int) -> None:
        """The trial of ``row`` ended without an answer or a server failure (it was cancelled,
        say): the next row may send one."""
        if server.trial_row == row:
            server.trial_row = None
            self._notify()

    def failed(self, server: _Route, err: RetryableError, row: int) -> bool:
        """Count a failed attempt; True when it is the server's failure, not the row's (the server
        is down, or took itself out now), so that the row is not charged an attempt."""
        if server.trial_row == row:  # the trial failed: wait for the next probe
            server.trial_row = None
            server.half_open = False
        if err.kind not in _SERVER_FAULTS:
            return False
        server.last_error = str(err)
        if server.down_since is not None:
            return True
        if err.refused:
            evidence = self.refused(server)
            if evidence == 1:
                logger.warning("%s; trying %s", err, "another server" if len(self.servers) > 1 else "again")
        else:
            server.failing.add(row)
            evidence = len(server.failing)
        if evidence < _REFUSALS_BEFORE_DOWN:
            return err.refused  # a refusal is never the row's: it goes straight to another try
        self._take_down(server, err)
        return True

    def refused(self, server: _Route) -> int:
        """Count a connection that was refused or not accepted in time; returns the run of them."""
        server.refusals += 1
        server.last_refused = time.monotonic()
        return server.refusals

    def answered(self, server: _Route) -> None:
        """The server answered (any status but a server fault)."""
        server.refusals = 0
        server.failing.clear()
        if server.down_since is not None:
            self._bring_up(server)

    def probe_answered(self, server: _Route) -> None:
        """A down server's /health answered: back if it was refusing connections; else a trial."""
        if server.refused_down:
            self._bring_up(server)
        elif not server.half_open:
            server.half_open = True
            self._notify()

    def _bring_up(self, server: _Route) -> None:
        assert server.down_since is not None
        logger.warning("%s answers again after %.0fs: back in rotation", server.name, time.monotonic() - server.down_since)
        server.down_since = None
        server.refusals = 0
        server.failing.clear()
        server.half_open = server.refused_down = False
        server.trial_row = None
        server.control.restart()  # it may have restarted with another capacity
        self._all_down_since = None
        self._notify()
        self._on_up()

    def _take_down(self, server: _Route, err: RetryableError) -> None:
        server.down_since = time.monotonic()
        server.refused_down = err.refused
        others = [s.name for s in self.servers if s.down_since is None]
        if others:
            what = f"its rows go to {', '.join(others)}"
        else:
            self._all_down_since = server.down_since
            what = f"rows wait for a server to answer (for at most {self.max_outage:g}s) without spending attempts"
        logger.warning("%s is down (%s): %s; probing it every %gs", server.name, err, what, _PROBE_SECONDS)
        self._on_down(server)

    def _notify(self) -> None:
        """Wake the waiting rows (each waits on the event current when it began to wait)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def reset(self) -> None:
        """Forget every server's health (the client closed: its probes are gone with it)."""
        for server in self.servers:
            server.down_since = None
            server.half_open = server.refused_down = False
            server.trial_row = server.probe = None
            server.refusals = 0
            server.failing.clear()
        self._all_down_since = None
        self._notify()

    async def wait_up(self, row: int, waiting_since: float | None) -> tuple[_Route | None, float | None]:
        """Wait while no server is up; returns ``(trial, waiting_since)``: a down server's trial
        for ``row`` to send (None: send to any server up), and when this row began to wait
        (to pass in again: a failed trial does not restart the row's clock).

        Raises:
            ServerUnavailableError: no server answered for ``max_outage`` seconds, counted from
                when the last server went down or this row began to wait, the later.
        """
        up = any(s.down_since is None for s in self.servers)
        if up and not any(s.half_open and s.trial_row is None for s in self.servers):
            return None, waiting_since
        now = time.monotonic()
        if waiting_since is None and not up:
            waiting_since = now
        while True:
            remaining = math.inf
            if waiting_since is not None:
                start = max(waiting_since, self._all_down_since or waiting_since)
                remaining = start + self.max_outage - time.monotonic()
                if remaining <= 0:
                    break  # a trial that keeps failing must not keep the row alive forever
            trial = self._claim_trial(row)
            if trial is not None or any(s.down_since is None for s in self.servers):
                return trial, waiting_since
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining if math.isfinite(remaining) else self.max_outage)
            except TimeoutError:
                break
        errors = "; ".join(f"{s.name}: {s.last_error}" for s in self.servers)
        raise ServerUnavailableError(
            f"no server answered for {self.max_outage:g}s ({errors}): the rows answered so far are kept; "
            f"start the server and run the same command again (raise retry.max_outage to wait longer)",
            urls=tuple(s.name for s in self.servers),
        )


# --------------------------------------------------------------------------- deadlines


class _Watchdog:
    """Cancels attempts that pass their deadline: one timer task per client while attempts are in
    flight, instead of aiohttp's timer and context per request (see the README's design notes).

    An attempt calls ``arm`` before it sends, ``expired`` when it sees ``CancelledError`` (true
    when the cancel was the watchdog's alone), and ``disarm`` when it ends.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # attempt in flight -> when it times out
        self._timed_out: set[asyncio.Task[Any]] = set()  # cancelled by the watchdog
        self._task: asyncio.Task[None] | None = None

    def arm(self, task: asyncio.Task[Any], now: float) -> None:
        self._deadlines[task] = now + self.timeout
        if self._task is None or self._task.done():  # done: cancelled before its first step
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """On ``CancelledError``: whether the watchdog alone cancelled ``task`` (a cancel from the
        batch or a close as well wins, and the error must propagate)."""
        if task not in self._timed_out:
            return False
        self._timed_out.discard(task)
        return not task.uncancel()

    def disarm(self, task: asyncio.Task[Any]) -> None:
        del self._deadlines[task]
        if task in self._timed_out:  # the watchdog's cancel was swallowed on the way: forget it
            self._timed_out.discard(task)
            task.uncancel()

    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the timer task (at close); returns it so that the caller can await it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def _watch(self) -> None:
        tick = min(1.0, max(0.01, self.timeout / 10))
        try:
            while self._deadlines:
                await asyncio.sleep(tick)
                now = time.monotonic()
                for task, deadline in list(self._deadlines.items()):
                    if deadline <= now and task not in self._timed_out:
                        self._timed_out.add(task)
                        task.cancel()
        finally:
            if self._task is asyncio.current_task():
                self._task = None


# --------------------------------------------------------------------------- the client


@dataclass(eq=False, slots=True)
class _Batch:
    """The rows of one ``submit`` call while the worker pool sends them."""

    path: str
    bodies: Sequence[dict[str, Any]]
    parse: Parse
    done: asyncio.Future[list[Result]]
    results: list[Any]  # Result once each row is done
    remaining: int
    stop_on_error: bool = False  # the first failed row fails the batch (RowFailedError)
    on_result: Callable[[int, Result], None] | None = None  # each row's result as it arrives (the journal)
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)  # row -> the worker sending it


class Client:
    """Sends OpenAI-wire requests to one or more servers from the background loop.

    Create it anywhere; it does no I/O until the first request. Its coroutines must run on the
    loop from ``run_on_loop``; ``submit`` does that for a whole batch.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600,
        max_concurrency: int | None = None,
        retry: RetryConfig | None = None,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        if not base_urls:
            raise ValueError("Client needs at least one base URL")
        check_auth(base_urls, api_key)
        self.retry = retry or RetryConfig()
        # None: adaptive, each server's controller sets its target; a number: a fixed target
        self.max_concurrency = max_concurrency
        self.router = _Router(base_urls, self.retry.max_outage, on_down=self._on_down, fixed=max_concurrency, on_up=self._room_changed)
        self.model = model
        self.stats = Stats(servers=[s.control for s in self.servers])
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._connect_seconds = min(timeout, connect_timeout)
        # no total timeout per request: the watchdog enforces it (see _Watchdog)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_seconds)
        self._watchdog = _Watchdog(timeout)
        self._session: aiohttp.ClientSession | None = None
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()  # attempts waiting for a target's room
        self._model_lock: asyncio.Lock | None = None
        self._model_checked = False
        # submit(): rows wait in one FIFO queue for a pool of workers (see _work)
        self._queue: collections.deque[tuple[_Batch, int]] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # workers, and former workers backing off
        self.unfinished = 0  # rows handed to submit() that have no result yet
        self.capacity = sum(s.control.target for s in self.servers)  # requests in flight at most, all servers
        self._low_water: tuple[Callable[[], int], Callable[[], None]] | None = None  # see wake_below
        _clients.add(self)

    @property
    def servers(self) -> list[_Route]:
        return self.router.servers

    def __repr__(self) -> str:  # never shows the key, nor a password in a URL
        return f"Client({[s.name for s in self.servers]}, model={self.model!r})"

    # -- lifecycle (on the loop)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no connection limit: the targets bound the requests (and so the connections)
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            # a vLLM server sets no cookies: the default jar would still be searched on every request
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, raise_for_status=False, cookie_jar=aiohttp.DummyCookieJar()
            )
            # `ds.map(vllm_generate(...))` drops the transform without closing it: close the session
            # then, or aiohttp reports an unclosed session and connector when it is collected.
            weakref.finalize(self, _close_dropped_session, self._session, asyncio.get_running_loop(), os.getpid()).atexit = False
            self._model_lock = asyncio.Lock()
        return self._session

    async def aclose(self) -> None:
        # stop the work first: a request cut by the closing session would be logged as a retry
        self._queue.clear()
        tasks: list[asyncio.Task[Any]] = list(self._tasks)
        tasks += [task for s in self.servers for task in (s.probe, s.reports) if task is not None]
        for task in tasks:
            task.cancel()
        self.router.reset()  # without its probes, a server marked down would never come back
        watchdog = self._watchdog.stop()
        await asyncio.gather(*tasks, *([watchdog] if watchdog else []), return_exceptions=True)
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def close(self) -> None:
        """Close the HTTP session (a new one opens on the next request)."""
        if self._session is not None and not self._session.closed:
            run_on_loop(self.aclose()).result(timeout=10)

    # -- model

    async def list_models(self, server: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/models`` of one server (the first by default)."""
        session = self._ensure_session()
        root = server or self.servers[0].url
        name = redact_url(root)
        url = f"{name}/v1/models"
        hint = f"is the vLLM server running? try `vllm-generator list-models -m {name}`"
        try:
            timeout = aiohttp.ClientTimeout(total=min(30.0, self._watchdog.timeout), sock_connect=self._connect_seconds)
            async with session.get(f"{root}/v1/models", timeout=timeout, allow_redirects=False) as resp:
                body = await resp.read()
                status = resp.status
                location = resp.headers.get("Location")
        except (TimeoutError, aiohttp.ClientError) as err:
            raise ServerUnavailableError(
                f"cannot list models at {url} ({type(err).__name__}: {redact_text(err)}): {hint}", urls=(name,)
            ) from err
        if status in (401, 403):
            raise _key_refused(url, status, body)
        if status != 200:
            what = f"a redirect to {redact_url(location or '(nowhere)')}" if 300 <= status < 400 else server_message(body)
            raise ServerUnavailableError(f"GET {url} answered {status}: {what}", urls=(name,))
        try:
            return list(decode(body)["data"])
        except (ValueError, KeyError, TypeError) as err:
            raise ServerUnavailableError(f"{url} sent no model list ({type(err).__name__}: {err}): {hint}", urls=(name,)) from err

    async def resolve_model(self) -> str:
        """The model to request: the configured one (checked to exist) or the server's only one."""
        self._ensure_session()
        assert self._model_lock is not None
        async with self._model_lock:
            if not self._model_checked:
                self.model = await self._find_model()
                self._model_checked = True
            assert self.model is not None
            return self.model

    async def _find_model(self) -> str:
        first = self.router.pick()
        # servers out of rotation last: as a last resort, not skipped
        candidates = [first, *sorted((s for s in self.servers if s is not first), key=lambda s: s.down_since is not None)]
        errors: list[ServerUnavailableError] = []
        for server in candidates:
            try:
                ids = [m["id"] for m in await self.list_models(server.url)]
                break
            except ServerUnavailableError as err:
                # one dead server must not stop a run that the others can serve
                errors.append(err)
                if isinstance(err.__cause__, _NOT_ACCEPTED):
                    self.router.refused(server)
                if server is not candidates[-1]:
                    logger.warning("%s; asking the next server", err)
        else:
            if len(errors) == 1:
                raise errors[0]
            urls = tuple(s.name for s in candidates)
            raise ServerUnavailableError(f"no server answered: {'; '.join(map(str, errors))}", urls=urls) from errors[-1]
        return choose_model(server.name, ids, self.model)

    # -- one attempt

    async def _attempt(self, path: str, payload: bytes, parse: Parse, task: asyncio.Task[Any], server: _Route | None = None) -> Result:
        """One request, to ``server`` or the router's pick; ``task`` is the worker sending it (the
        watchdog cancels it at the deadline). A failure names its server in ``RetryableError.server``."""
        assert self._session is not None
        server = server or await self._admit()
        sent = time.monotonic()
        server.in_flight += 1
        self.stats.in_flight += 1
        self.stats.requests += 1
        self._watchdog.arm(task, sent)
        try:
            async with self._session.post(server.url + path, data=payload, timeout=self._timeout, allow_redirects=False) as resp:
                body = await resp.read()
                status = resp.status
                headers = resp.headers
        except asyncio.CancelledError:
            if not self._watchdog.expired(task):
                raise
            raise RetryableError(f"no answer from {server.name} within {self._watchdog.timeout:g}s", "timeout", server=server) from None
        except aiohttp.ClientConnectorError as err:
            raise RetryableError(
                f"cannot connect to {server.name} ({redact_text(err.os_error or err)})", "connection", refused=True, server=server
            ) from err
        except aiohttp.ConnectionTimeoutError as err:  # raised by sock_connect (see _CONNECT_TIMEOUT)
            raise RetryableError(
                f"cannot connect to {server.name} (no answer within {self._connect_seconds:g}s)",
                "connect_timeout",
                refused=True,
                server=server,
            ) from err
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
            raise RetryableError(f"connection to {server.name} dropped ({type(err).__name__})", "dropped", server=server) from err
        except aiohttp.ClientError as err:
            raise RetryableError(
                f"request to {server.name} failed ({type(err).__name__}: {redact_text(err)})", "client_error", server=server
            ) from err
        finally:
            self._watchdog.disarm(task)
            server.in_flight -= 1
            self.stats.in_flight -= 1
            if self._room:
                self._wake_one()
        if status == 200:
            self.router.answered(server)
            try:
                result = parse(decode(body))
            # whatever one odd body raises (a 400-digit integer overflows a float) is that row's
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as err:
                raise RetryableError(f"{server.name} sent a broken response body ({err})", "bad_body", server=server) from err
            result.latency = time.monotonic() - sent  # the server's time, not our queueing
            return result
        url = server.name + path
        if status in (401, 403):  # on every row alike: stop the batch, do not record it on each
            raise _key_refused(url, status, body)
        error = status_error(url, status, body, headers.get("Retry-After"), headers.get("Location"))
        if isinstance(error, RetryableError):
            error.server = server
        else:
            self.router.answered(server)  # a 4xx is the row's: the server is fine
        raise error

    # -- one request, with retries

    def _backoff(self, err: RetryableError, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``."""
        if err.retry_after is not None:
            # the server said when (sooner would be refused again), within reason
            return min(err.retry_after, self.retry.max_wait)
        # "full jitter" exponential backoff spreads a burst of retries from many rows
        ceiling = min(self.retry.max_wait, self.retry.initial_wait * 2 ** (attempt - 1))
        return random.uniform(0, ceiling) if ceiling > 0 else 0.0

    async def _send(self, path: str, payload: bytes, parse: Parse, task: asyncio.Task[Any]) -> Result:
        """Attempts until one succeeds, a final error, or the row has spent ``retry.attempts``.

        A failure that is the server's (it refused the connection, or is down) spends no
        attempt: the row goes to another server, or waits for one to answer (``wait_up``). A
        plain loop rather than tenacity: the first attempt, nearly always the last, must cost
        nothing beyond the request, and waits that are not attempts do not fit its model.
        """
        attempts = self.retry.attempts
        spent = 0
        row = id(payload)  # this request, whichever worker sends it
        waiting_since: float | None = None
        refused_since: float | None = None  # refused in a row (429/503) since
        refusals = 0
        while True:
            trial, waiting_since = await self.router.wait_up(row, waiting_since)
            try:
                result = await self._attempt(path, payload, parse, task, trial)
            except RetryableError as err:
                server = err.server
                if server is not None and self.router.failed(server, err, row):
                    continue  # the server's failure: not this row's attempt
                if server is not None and err.kind in _BUSY and server.control.adaptive:
                    now = time.monotonic()
                    refused_since = refused_since or now
                    if now - refused_since < self.retry.max_outage:  # else it spends attempts, like any failure
                        if server.control.refused(server.in_flight, now):
                            self._room_changed()
                        refusals += 1
                        if refusals == 1:
                            self._leave_pool()  # another worker takes this one's place while it pauses
                        if err.retry_after is not None:  # the server said when
                            pause = min(err.retry_after, self.retry.max_wait)
                        else:  # jittered, so that a burst of refused rows does not come back at once
                            pause = random.uniform(0.5, 1.0) * min(_BUSY_PAUSE * 2 ** min(refusals - 1, 10), self.retry.max_wait)
                        await asyncio.sleep(pause)
                        continue  # backpressure: the server's target is lower now, not this row's attempt
                spent += 1
                if spent == attempts:
                    return Result(error=f"gave up after {spent} attempts: {err}", error_type=err.kind, attempts=spent)
                if spent == 1:
                    self._leave_pool()
                wait = self._backoff(err, spent)
                logger.warning("retrying in %.1fs [%d/%d]: %s", wait, spent + 1, attempts, err)
                await asyncio.sleep(wait)
            except FinalError as err:
                return Result(error=str(err), error_type=err.kind, attempts=spent + 1)
            except BaseException:
                if trial is not None:  # cancelled, a refused key, a bug: another row may try
                    self.router.end_trial(trial, row)
                raise
            else:
                result.attempts = spent + 1
                return result

    async def _probe(self, server: _Route) -> None:
        """Ask a down server ``/health`` every ``_PROBE_SECONDS`` until it answers; then it is back."""
        session = self._ensure_session()
        timeout = aiohttp.ClientTimeout(total=min(_PROBE_TIMEOUT, self._watchdog.timeout), sock_connect=self._connect_seconds)
        while server.down_since is not None:
            await asyncio.sleep(_PROBE_SECONDS)
            if server.half_open:
                continue  # its trial decides
            try:
                async with session.get(server.url + "/health", timeout=timeout, allow_redirects=False) as resp:
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as err:
                cause = err.os_error if isinstance(err, aiohttp.ClientConnectorError) else err
                server.last_error = f"cannot connect to {server.name} ({redact_text(cause) or type(err).__name__})"
                continue
            if status < 500:  # any answer but a server error: it serves again (/health may be absent)
                self.router.probe_answered(server)
            else:
                server.last_error = f"/health answered {status}"

    def _on_down(self, server: _Route) -> None:
        if server.probe is None or server.probe.done():
            server.probe = asyncio.get_running_loop().create_task(self._probe(server))

    async def request(self, path: str, body: dict[str, Any], parse: Parse, task: asyncio.Task[Any]) -> Result:
        """Send one request with retries, from the worker ``task``. Failures become ``Result.error``,
        except that ``ServerUnavailableError`` (every attempt found no server reachable),
        ``ModelSelectionError`` and ``AuthenticationError`` (a 401/403) propagate."""
        self._ensure_session()
        if not self._model_checked:
            await self.resolve_model()
        result = await self._send(path, encode({"model": self.model, **body}), parse, task)
        self.stats.add(result)
        return result

    # -- batches, from any thread

    def submit(
        self,
        path: str,
        bodies: Sequence[dict[str, Any]],
        parse: Parse,
        stop_on_error: bool = False,
        on_result: Callable[[int, Result], None] | None = None,
    ) -> concurrent.futures.Future[list[Result]]:
        """Send every body concurrently; the future resolves to results in the same order.

        With ``stop_on_error`` the first row that ends with ``Result.error`` set fails the future
        with ``RowFailedError`` at once, and the batch's other rows are not sent (or are cut).
        ``on_result(row, result)`` is called on the loop thread as each row's result arrives.
        """

        async def run() -> list[Result]:
            if not bodies:
                return []
            loop = asyncio.get_running_loop()
            batch = _Batch(path, bodies, parse, loop.create_future(), [None] * len(bodies), len(bodies), stop_on_error, on_result)
            self.unfinished += len(bodies)
            self._queue.extend((batch, row) for row in range(len(bodies)))
            self._start_workers()
            try:
                return await batch.done
            except BaseException:
                # one row stopped the batch (no server left, or cancelled): stop sending the rest
                # (workers skip its queued rows) and abort the ones in flight
                if not batch.done.done():
                    batch.done.cancel()
                for task in list(batch.running.values()):
                    task.cancel()
                raise

        return run_on_loop(run())

    def wake_below(self, limit: Callable[[], int], callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, on the loop thread) when fewer than ``limit()`` rows are
        unfinished (a function: it may follow ``capacity``); at once if that is already so. A
        later call replaces an earlier one."""
        self._low_water = (limit, callback)
        self._check_low_water()

    def _check_low_water(self) -> None:
        low = self._low_water
        if low is not None and self.unfinished < low[0]():
            self._low_water = None
            low[1]()

    # -- admission: each server's target (on the loop)

    async def _admit(self) -> _Route:
        """The server with the most room below its target; waits while every one is at its target."""
        while True:
            server = self.router.pick()
            if server.in_flight >= server.control.target:  # the pick is full: any other with room
                server = next((s for s in self.servers if s.down_since is None and s.in_flight < s.control.target), server)
            if server.in_flight < server.control.target:
                if (server.reports is None or server.reports.done()) and server.control.reported and self._model_checked:
                    server.reports = asyncio.get_running_loop().create_task(_poll_load(weakref.ref(self), server))
                return server
            waiter = asyncio.get_running_loop().create_future()
            self._room.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken and cancelled at once: the room goes to the next
                raise

    def _wake_one(self) -> None:
        room = self._room
        while room:
            waiter = room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _room_changed(self) -> None:
        """A target changed: resize the worker pool, wake the attempts waiting for room, and the
        feeder if it waits for the unfinished rows to fall below a share of the capacity."""
        self.capacity = sum(s.control.target for s in self.servers)
        for _ in range(len(self._room)):
            self._wake_one()
        if self._queue:
            self._start_workers()
        self._check_low_water()

    # -- the worker pool behind submit (on the loop)
    #
    # A task per row waiting for room costs more client CPU per request than a bare aiohttp loop,
    # as every release wakes a waiter. Instead a pool of at most ``capacity`` workers (the sum of
    # the targets) takes rows from one FIFO queue, so attempts rarely wait for room and rows
    # start in the order they were submitted.

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(min(self.capacity - len(self._workers), len(self._queue))):
            task = loop.create_task(self._work())
            self._workers.add(task)
            self._tasks.add(task)

    def _leave_pool(self) -> None:
        """A worker is about to back off before a retry: another takes its place in the pool, so
        rows waiting to be retried hold no slot (the semaphore still bounds the attempts)."""
        task = asyncio.current_task()
        if task in self._workers:
            self._workers.discard(task)
            self._start_workers()

    def _row_done(self) -> None:
        self.unfinished -= 1
        if self._low_water is not None:
            self._check_low_water()

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        queue = self._queue
        try:
            while queue and me in self._workers:
                if len(self._workers) > self.capacity:  # a target came down: the pool shrinks
                    break
                batch, row = queue.popleft()
                if batch.done.done():  # cancelled or failed: the rest of it is not sent
                    self._row_done()
                    continue
                batch.running[row] = me
                try:
                    result = await self.request(batch.path, batch.bodies[row], batch.parse, me)
                except Exception as err:  # no server left, no such model, a bug: raised by the batch's future
                    if not batch.done.done():
                        batch.done.set_exception(err)
                    continue
                except BaseException:
                    if not batch.done.done():
                        batch.done.cancel()
                    raise
                finally:
                    del batch.running[row]
                    self._row_done()
                if batch.stop_on_error and result.error is not None:
                    if not batch.done.done():
                        batch.done.set_exception(RowFailedError(row, result))
                    continue
                batch.results[row] = result
                if batch.on_result is not None:
                    batch.on_result(row, result)
                batch.remaining -= 1
                if not batch.remaining and not batch.done.done():
                    batch.done.set_result(batch.results)
        finally:
            self._workers.discard(me)
            self._tasks.discard(me)
            if queue:  # a cancelled worker's place
                self._start_workers()


async def _poll_load(client_ref: weakref.ref[Client], server: _Route) -> None:
    """Read the server's load (vLLM's ``/metrics`` gauges) while it has requests in flight, for
    its controller; ends when the server has been idle a while, or reports nothing. Holds the
    client weakly: a transform that ``Dataset.map`` dropped must be collected (its session closed)."""
    control = server.control
    idle_since: float | None = None
    misses = 0
    while True:
        await asyncio.sleep(control.poll_interval(time.monotonic()))
        client = client_ref()
        if client is None or client._session is None or client._session.closed:
            return
        now = time.monotonic()
        if server.in_flight == 0 or server.down_since is not None:
            # down: its probe and requests tell when it is back (and the target ramps again)
            del client  # no strong reference across the sleep: a dropped client is collected
            idle_since = idle_since or now
            if now - idle_since > _REPORTS_IDLE:
                return  # _admit starts another with the next request
            continue
        idle_since = None
        timeout = aiohttp.ClientTimeout(total=min(_PROBE_TIMEOUT, client._watchdog.timeout), sock_connect=client._connect_seconds)
        session = client._session
        assert session is not None
        del client  # not across the await: a dropped client is collected meanwhile
        try:
            async with session.get(server.url + "/metrics", timeout=timeout, allow_redirects=False) as resp:
                status = resp.status
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            continue  # the requests tell the router whether the server is down
        finally:
            del session  # nor the session across the next sleep
        client = client_ref()
        if client is None:
            return
        load = parse_metrics(body) if status == 200 else None
        if load is None:
            misses += 1
            if (status != 200 and status < 500) or misses >= 3:
                why = f"/metrics answered {status}" if status != 200 else "/metrics has no vllm:num_requests_running"
                if control.unreported(why):
                    client._room_changed()
                return
            del client
            continue
        misses = 0
        if control.observe(load, server.in_flight, time.monotonic()):
            client._room_changed()
        del client


def _open_files_allowed() -> int:
    """Sockets this process may open for requests: the soft open-file limit, raised to the hard
    one (a common soft limit, 1,024, is an H100's batch), less a margin for everything else."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
    except ImportError:  # not on this platform
        return MAX_TARGET
    return MAX_TARGET if soft == resource.RLIM_INFINITY else max(16, soft - 256)


def choose_model(url: str, ids: list[str], model: str | None, hint: str = "choose one with model=...") -> str:
    """``model`` if the server at ``url`` lists it among ``ids``; with ``model`` None, its only model.

    Raises:
        ModelSelectionError: the server does not serve ``model``, or serves several and none was chosen.
    """
    if model is None:
        if len(ids) != 1:
            raise ModelSelectionError(f"{url} serves {len(ids)} models ({', '.join(ids) or 'none'}): {hint}")
        return ids[0]
    if model not in ids:
        raise ModelSelectionError(f"{url} does not serve model {model!r}; it serves: {', '.join(ids) or 'nothing'}")
    return model


def _key_refused(url: str, status: int, body: bytes) -> AuthenticationError:
    """401/403: a setting to fix (the key is never in the message), not a server to wait for."""
    return AuthenticationError(
        f"{url} refused the API key ({status}: {server_message(body)}): pass api_key=..., "
        "set VLLM_API_KEY, or name the variable in a recipe's model.api_key_env",
        url=url,
        status=status,
    )
