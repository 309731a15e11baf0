"""The OpenAI-wire HTTP client: routing over servers, retries, response parsing.

The hot path is raw aiohttp (one session per event loop, keep-alive, one semaphore) because the
openai SDK costs 5 to 20 times more client CPU per request (README, design notes). All coroutines
run on one persistent event loop per process, in a daemon thread, so synchronous callers (a
``Dataset.map`` function, a Jupyter cell with its own running loop) hand work over with
``asyncio.run_coroutine_threadsafe`` and never touch the loop themselves.
"""

from __future__ import annotations

import array
import asyncio
import atexit
import collections
import concurrent.futures
import datetime
import email.utils
import json
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
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from .errors import GenerationError, ModelSelectionError, RecipeError, ServerUnavailableError
from .recipe import RetryConfig

__all__ = ["Result", "Stats", "Client", "parse_choice", "run_on_loop"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A server refusing this many connections in a row leaves the rotation for _DOWN_SECONDS
# (while another server is up: see _pick_server).
_FAILURES_BEFORE_DOWN = 3
_DOWN_SECONDS = 30.0
# A TCP handshake with a live host takes milliseconds however busy its server is (the kernel
# answers it), but one whose SYNs vanish (powered off, firewalled, a dead route) would hold
# every attempt for the whole request timeout (600 s by default) while Linux resends the SYN
# for two minutes. So connecting has its own short bound, and a connect that times out counts
# like a refused one for routing.
_CONNECT_TIMEOUT = 10.0
_NOT_ACCEPTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)  # refused, or no handshake in time
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


# --------------------------------------------------------------------------- the event loop


# JSON on the hot path: orjson encodes a request and decodes a response in about a third of the
# time of the json module, which is ~8% of the loop's CPU per request (benchmarks/bench_throughput.py).
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY  # as json does, e.g. logit_bias {50256: -100}


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, option=_DUMPS_OPTIONS)
    except TypeError:  # what orjson refuses (an int over 64 bits, say): json's answer, error included
        return json.dumps(body).encode()


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # NaN and Infinity, which Python servers may write: json reads them
        return json.loads(body)


class _LoopThread:
    """One event loop per process, running forever in a daemon thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-generator-loop", daemon=True)
        self.thread.start()


_loop_thread: _LoopThread | None = None
_loop_lock = threading.Lock()
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_sessions() -> None:
    """Close open HTTP sessions at exit, so aiohttp does not warn about unclosed connectors."""
    if _loop_thread is None or _loop_thread.pid != os.getpid() or not _loop_thread.thread.is_alive():
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
        # after fork (Dataset.map with num_proc>1) the parent's thread does not exist here
        if _loop_thread is None or _loop_thread.pid != os.getpid() or not _loop_thread.thread.is_alive():
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


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class Result:
    """One row's outcome. ``error`` is None on success; n>1 makes the text fields lists."""

    response: str | list[str] | None = None
    reasoning: str | None | list[str | None] = None
    finish_reason: str | list[str | None] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    error_type: str | None = None  # for metrics: "http_400", "timeout", ...
    logprobs: str | None = None
    attempts: int = 0
    latency: float = 0.0  # seconds the successful attempt took


@dataclass
class Stats:
    """Counters for progress and the metrics file (updated on the loop thread only)."""

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


def _split_reasoning(text: str | None) -> tuple[str | None, str]:
    """Separate inline ``<think>`` text from the answer: (reasoning, answer)."""
    if not text:
        return None, text or ""
    head = text.lstrip()
    close = head.find(_THINK_CLOSE)
    if close >= 0:
        # "<think>r</think>a", or "r</think>a" when the chat template put <think> in the prompt
        reasoning = head[:close].removeprefix(_THINK_OPEN)
        return reasoning.strip(), head[close + len(_THINK_CLOSE) :].lstrip()
    if head.startswith(_THINK_OPEN):
        # cut off (max_tokens) before </think>: everything is reasoning, there is no answer
        return head[len(_THINK_OPEN) :].strip(), ""
    return None, text


def parse_choice(choice: dict[str, Any], chat: bool, parse_reasoning: bool) -> tuple[str, str | None]:
    """(answer, reasoning) from one vLLM choice, whichever of the three shapes it uses."""
    if chat:
        message = choice.get("message") or {}
        content = message.get("content")
        # vLLM >= 0.10 says "reasoning"; older servers "reasoning_content"
        reasoning = message.get("reasoning") or message.get("reasoning_content")
    else:
        content, reasoning = choice.get("text"), None
    if reasoning is not None:
        return content or "", reasoning
    if parse_reasoning:
        inline, answer = _split_reasoning(content)
        return answer, inline
    return content or "", None


def _parse_body(data: Any, chat: bool, n: int, parse_reasoning: bool, want_logprobs: bool) -> Result:
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ValueError(f"expected {n} choices, got {len(choices)}")
    usage = data.get("usage") or {}
    parsed = [parse_choice(c, chat, parse_reasoning) for c in choices]
    result = Result(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))
    if n == 1:
        result.response, result.reasoning = parsed[0]
        result.finish_reason = choices[0].get("finish_reason")
    else:
        result.response = [p[0] for p in parsed]
        result.reasoning = [p[1] for p in parsed]
        result.finish_reason = [c.get("finish_reason") for c in choices]
    if want_logprobs:
        result.logprobs = json.dumps([c.get("logprobs") for c in choices])
    return result


# --------------------------------------------------------------------------- errors inside the client


class _RetryableError(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, message: str, kind: str, retry_after: float | None = None, refused: bool = False):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.refused = refused  # no connection: refused, or no answer to the SYN
        self.attempts = 1  # of the request, when this error ends it (set by _retry)


class _FinalError(Exception):
    """An attempt failed in a way that retrying cannot fix (a 4xx other than 401/403/408/429)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind
        self.attempts = 1  # of the request, this one included (set by _retry)


class RowFailedError(GenerationError):
    """A row of a ``submit(..., stop_on_error=True)`` batch failed for good, so the batch stopped.

    ``row`` is its index in the submitted bodies; ``result`` its outcome (``error`` is set).
    """

    def __init__(self, row: int, result: Result) -> None:
        super().__init__(f"row {row} of the batch failed: {result.error}")
        self.row = row
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:  # map workers (num_proc>1) pickle exceptions
        return (type(self), (self.row, self.result))


def _key_refused(url: str, status: int, body: bytes) -> RecipeError:
    """401/403: a setting to fix (the key is never in the message), not a server to wait for."""
    return RecipeError(
        f"{url} refused the API key ({status}: {_server_message(body)}): pass api_key=..., "
        "set VLLM_API_KEY, or name the variable in a recipe's model.api_key_env"
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None  # unreadable: the usual backoff, not a crashed batch
        if parsed.tzinfo is None:  # "-0000": HTTP dates are GMT
            parsed = parsed.replace(tzinfo=datetime.UTC)
        seconds = parsed.timestamp() - time.time()
    # "inf" would sleep forever and "nan" means nothing
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _server_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace").strip() or "(empty body)"


# --------------------------------------------------------------------------- servers and the client


@dataclass
class _Server:
    url: str  # root, without /v1
    in_flight: int = 0
    failures: int = 0  # consecutive refused connections
    down_until: float = 0.0
    last_refused: float = -1e9
    completed: int = 0


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
        max_concurrency: int = 256,
        retry: RetryConfig | None = None,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        if not base_urls:
            raise ValueError("Client needs at least one base URL")
        self.servers = [_Server(u) for u in base_urls]
        self.model = model
        self.retry = retry or RetryConfig()
        self.max_concurrency = max_concurrency
        self.stats = Stats()
        self.on_result: Callable[[Result], None] | None = None
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._connect_seconds = min(timeout, connect_timeout)
        # No total timeout per request: aiohttp's costs a timer and a context per request, ~14 us
        # of the loop's ~180 (benchmarks/bench_throughput.py). The watchdog enforces it instead.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_seconds)
        self._timeout_seconds = timeout
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # attempt in flight -> when it times out
        self._timed_out: set[asyncio.Task[Any]] = set()  # cancelled by the watchdog
        self._watchdog: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._model_lock: asyncio.Lock | None = None
        self._model_checked = False
        # submit(): rows wait in one FIFO queue for a pool of workers (see _work)
        self._queue: collections.deque[tuple[_Batch, int]] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # workers, and former workers backing off
        self.unfinished = 0  # rows handed to submit() that have no result yet (read by the feeder)
        _clients.add(self)

    def __repr__(self) -> str:  # never shows the key
        return f"Client({[s.url for s in self.servers]}, model={self.model!r})"

    # -- lifecycle (on the loop)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            total = self.max_concurrency * len(self.servers)
            connector = aiohttp.TCPConnector(limit=total + len(self.servers), ttl_dns_cache=300)
            # a vLLM server sets no cookies: the default jar would still be searched on every request
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, raise_for_status=False, cookie_jar=aiohttp.DummyCookieJar()
            )
            # `ds.map(vllm_generate(...))` drops the transform without closing it: close the session
            # then, or aiohttp reports an unclosed session and connector when it is collected.
            weakref.finalize(self, _close_dropped_session, self._session, asyncio.get_running_loop(), os.getpid()).atexit = False
            self._semaphore = asyncio.Semaphore(total)
            self._model_lock = asyncio.Lock()
        return self._session

    async def aclose(self) -> None:
        # stop the work first: a request cut by the closing session would be logged as a retry
        self._queue.clear()
        tasks = list(self._tasks) + ([self._watchdog] if self._watchdog is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
        url = f"{server or self.servers[0].url}/v1/models"
        hint = f"is the vLLM server running? try `vllm-generator list-models -m {server or self.servers[0].url}`"
        try:
            timeout = aiohttp.ClientTimeout(total=min(30.0, self._timeout_seconds), sock_connect=self._connect_seconds)
            async with session.get(url, timeout=timeout) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise ServerUnavailableError(f"cannot list models at {url} ({type(err).__name__}: {err}): {hint}") from err
        if status in (401, 403):
            raise _key_refused(url, status, body)
        if status != 200:
            raise ServerUnavailableError(f"GET {url} answered {status}: {_server_message(body)}")
        try:
            return list(json.loads(body)["data"])
        except (ValueError, KeyError, TypeError) as err:
            raise ServerUnavailableError(f"{url} sent no model list ({type(err).__name__}: {err}): {hint}") from err

    async def resolve_model(self) -> str:
        """The model to request: the configured one (checked to exist) or the server's only one."""
        self._ensure_session()
        assert self._model_lock is not None
        async with self._model_lock:
            if self._model_checked:
                assert self.model is not None
                return self.model
            first = self._pick_server()
            now = time.monotonic()
            # servers out of rotation last: as a last resort, not skipped
            candidates = [first, *sorted((s for s in self.servers if s is not first), key=lambda s: s.down_until > now)]
            errors: list[ServerUnavailableError] = []
            for server in candidates:
                try:
                    ids = [m["id"] for m in await self.list_models(server.url)]
                    break
                except ServerUnavailableError as err:
                    # one dead server must not stop a run that the others can serve
                    errors.append(err)
                    if isinstance(err.__cause__, _NOT_ACCEPTED):
                        self._server_refused(server)
                    if server is not candidates[-1]:
                        logger.warning("%s; asking the next server", err)
            else:
                if len(errors) == 1:
                    raise errors[0]
                raise ServerUnavailableError(f"no server answered: {'; '.join(map(str, errors))}") from errors[-1]
            if self.model is None:
                if len(ids) != 1:
                    raise ModelSelectionError(
                        f"{server.url} serves {len(ids)} models ({', '.join(ids) or 'none'}): choose one with model=..."
                    )
                self.model = ids[0]
            elif self.model not in ids:
                raise ModelSelectionError(
                    f"{server.url} does not serve model {self.model!r}; it serves: {', '.join(ids) or 'nothing'}"
                )
            self._model_checked = True
            return self.model

    # -- routing

    def _pick_server(self) -> _Server:
        now = time.monotonic()
        healthy = [s for s in self.servers if s.down_until <= now]
        if not healthy:
            # Leaving the rotation only routes around a bad server while another is up. With none
            # up (one server restarting, say), try the one that left first: every row keeps its
            # own attempts and backoff, and the first answer puts that server back (_attempt).
            # ServerUnavailableError comes from request(), once a row used all its attempts.
            return min(self.servers, key=lambda s: s.down_until)
        if len(healthy) == 1:
            return healthy[0]
        # a server that refused a connection in the last second goes last, even with nothing in flight
        return min(healthy, key=lambda s: (now - s.last_refused < 1.0, s.in_flight))

    def _server_refused(self, server: _Server) -> None:
        """Count a connection that was refused or timed out."""
        now = time.monotonic()
        server.failures += 1
        server.last_refused = now
        if server.failures >= _FAILURES_BEFORE_DOWN:
            was_down = server.down_until > now
            # a failed probe starts the time out again: the next probe goes to another server
            server.down_until = now + _DOWN_SECONDS
            if was_down:
                return
            others = [s.url for s in self.servers if s is not server and s.down_until <= now]
            what = (
                f": out of rotation for {_DOWN_SECONDS:.0f}s; its requests go to {', '.join(others)}"
                if others
                else ", and no other server is up: rows keep trying it, with backoff"
            )
            logger.warning("%s did not accept %d connections in a row%s", server.url, server.failures, what)

    # -- one attempt

    async def _attempt(self, path: str, payload: bytes, parse: Callable[[Any], Result], task: asyncio.Task[Any]) -> Result:
        """One request; ``task`` is the worker sending it (the watchdog cancels it at the deadline)."""
        assert self._semaphore is not None and self._session is not None
        async with self._semaphore:
            server = self._pick_server()
            sent = time.monotonic()
            probe = server.down_until > sent  # sent while out of rotation
            url = server.url + path
            server.in_flight += 1
            self.stats.in_flight += 1
            self.stats.requests += 1
            self._deadlines[task] = sent + self._timeout_seconds
            if self._watchdog is None or self._watchdog.done():  # done: cancelled before its first step
                self._watchdog = asyncio.get_running_loop().create_task(self._watch())
            try:
                async with self._session.post(url, data=payload, timeout=self._timeout) as resp:
                    body = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except asyncio.CancelledError:
                if task not in self._timed_out:
                    raise
                self._timed_out.discard(task)
                if task.uncancel():  # cancelled by the batch (or a close) as well: that wins
                    raise
                raise _RetryableError(f"no answer from {server.url} within {self._timeout_seconds:g}s", "timeout") from None
            except aiohttp.ClientConnectorError as err:
                self._server_refused(server)
                raise _RetryableError(f"cannot connect to {server.url} ({err.os_error or err})", "connection", refused=True) from err
            except aiohttp.ConnectionTimeoutError as err:  # raised by sock_connect (see _CONNECT_TIMEOUT)
                self._server_refused(server)
                raise _RetryableError(
                    f"cannot connect to {server.url} (no answer within {self._connect_seconds:g}s)", "connect_timeout", refused=True
                ) from err
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
                raise _RetryableError(f"connection to {server.url} dropped ({type(err).__name__})", "dropped") from err
            except aiohttp.ClientError as err:
                raise _RetryableError(f"request to {server.url} failed ({type(err).__name__}: {err})", "client_error") from err
            finally:
                del self._deadlines[task]
                if task in self._timed_out:  # the watchdog's cancel was swallowed on the way: forget it
                    self._timed_out.discard(task)
                    task.uncancel()
                server.in_flight -= 1
                self.stats.in_flight -= 1
            server.failures = 0
            if probe and server.down_until > 0:  # it answers again (any status): back in rotation
                server.down_until = 0.0
                logger.info("%s answers again: back in rotation", server.url)
        if status == 200:
            try:
                result = parse(_loads(body))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise _RetryableError(f"{server.url} sent a broken response body ({err})", "bad_body") from err
            server.completed += 1
            result.latency = time.monotonic() - sent  # the server's time, not our queueing
            return result
        if status in (401, 403):  # on every row alike: stop the batch, do not record it on each
            raise _key_refused(url, status, body)
        message = f"{status} from {url}: {_server_message(body)}"
        if status in (408, 429) or status >= 500:
            raise _RetryableError(message, f"http_{status}", retry_after=_retry_after(retry_after))
        raise _FinalError(message, f"http_{status}")

    async def _watch(self) -> None:
        """Cancel attempts that are past their deadline (see _timed_out), while any is in flight."""
        tick = min(1.0, max(0.01, self._timeout_seconds / 10))
        try:
            while self._deadlines:
                await asyncio.sleep(tick)
                now = time.monotonic()
                for task, deadline in list(self._deadlines.items()):
                    if deadline <= now and task not in self._timed_out:
                        self._timed_out.add(task)
                        task.cancel()
        finally:
            self._watchdog = None

    # -- one request, with retries

    def _backoff(self, err: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``."""
        if isinstance(err, _RetryableError) and err.retry_after is not None:
            # the server said when (sooner would be refused again), within reason
            return min(err.retry_after, self.retry.max_wait)
        if isinstance(err, _RetryableError) and err.refused and len(self.servers) > 1:
            now = time.monotonic()
            if any(s.failures == 0 and s.down_until <= now for s in self.servers):
                return 0.0  # that server is gone, not busy: go straight to a healthy one
        # "full jitter" exponential backoff spreads a burst of retries from many rows
        ceiling = min(self.retry.max_wait, self.retry.initial_wait * 2 ** (attempt - 1))
        return random.uniform(0, ceiling) if ceiling > 0 else 0.0

    def _log_retry(self, err: BaseException | None, attempt: int, wait: float) -> None:
        """One line per retry that will happen: ``attempt`` is the one that just failed."""
        logger.warning("retrying in %.1fs [%d/%d]: %s", wait, attempt + 1, self.retry.attempts, err)

    async def _retry(
        self, first: _RetryableError, path: str, payload: bytes, parse: Callable[[Any], Result], task: asyncio.Task[Any]
    ) -> tuple[Result, int]:
        """Attempts 2..N after ``first`` failed; returns the result and the attempts made.

        An error that ends the request carries the attempts made in ``attempts``.
        """
        self._leave_pool()
        wait = self._backoff(first, 1)
        self._log_retry(first, 1, wait)
        await asyncio.sleep(wait)
        attempts = 1

        def error(state: RetryCallState) -> BaseException | None:
            return state.outcome.exception() if state.outcome else None

        # a fresh AsyncRetrying per failing request: tenacity keeps its state per thread, not per
        # task. It computes the wait before it checks stop, so the wait only computes and
        # before_sleep (called only when a retry follows) logs.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts - 1),
            wait=lambda state: self._backoff(error(state), attempts),
            before_sleep=lambda state: self._log_retry(error(state), attempts, state.upcoming_sleep),
            retry=retry_if_exception_type(_RetryableError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    result = await self._attempt(path, payload, parse, task)
        except (_RetryableError, _FinalError) as err:
            err.attempts = attempts
            raise
        return result, attempts

    async def request(self, path: str, body: dict[str, Any], parse: Callable[[Any], Result], task: asyncio.Task[Any]) -> Result:
        """Send one request with retries, from the worker ``task``. Failures become ``Result.error``, except that
        ``ServerUnavailableError`` (every attempt found no server reachable),
        ``ModelSelectionError`` and ``RecipeError`` (a 401/403: the API key) propagate."""
        self._ensure_session()
        if not self._model_checked:
            await self.resolve_model()
        payload = _dumps({"model": self.model, **body})
        attempts = 1
        try:
            try:
                result = await self._attempt(path, payload, parse, task)
            except _RetryableError as first:
                if self.retry.attempts == 1:
                    raise
                result, attempts = await self._retry(first, path, payload, parse, task)
        except _RetryableError as err:
            attempts = err.attempts
            if err.refused and all(s.failures for s in self.servers):
                raise ServerUnavailableError(
                    f"cannot reach {', '.join(s.url for s in self.servers)} after {attempts} attempts "
                    f"({err}): is `vllm serve` running? try `vllm-generator list-models -m {self.servers[0].url}`"
                ) from None
            result = Result(error=f"gave up after {attempts} attempts: {err}", error_type=err.kind)
        except _FinalError as err:
            attempts = err.attempts
            result = Result(error=str(err), error_type=err.kind)
        result.attempts = attempts
        self.stats.add(result)
        if self.on_result is not None:
            self.on_result(result)
        return result

    # -- batches, from any thread

    def submit(
        self, path: str, bodies: Sequence[dict[str, Any]], parse: Callable[[Any], Result], stop_on_error: bool = False
    ) -> concurrent.futures.Future[list[Result]]:
        """Send every body concurrently; the future resolves to results in the same order.

        With ``stop_on_error`` the first row that ends with ``Result.error`` set fails the future
        with ``RowFailedError`` at once, and the batch's other rows are not sent (or are cut).
        """

        async def run() -> list[Result]:
            if not bodies:
                return []
            batch = _Batch(
                path, bodies, parse, asyncio.get_running_loop().create_future(), [None] * len(bodies), len(bodies), stop_on_error
            )
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

    # -- the worker pool behind submit (on the loop)
    #
    # A task per row waiting on the semaphore costs ~40 us of CPU per request more than a bare
    # aiohttp loop (measured: benchmarks/bench_throughput.py), as every release wakes a waiter.
    # Instead a pool of at most ``max_concurrency x servers`` workers takes rows from one FIFO
    # queue, so the semaphore is rarely contended and rows start in the order they were submitted.

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(min(self.max_concurrency * len(self.servers) - len(self._workers), len(self._queue))):
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

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        queue = self._queue
        try:
            while queue and me in self._workers:
                batch, row = queue.popleft()
                if batch.done.done():  # cancelled or failed: the rest of it is not sent
                    self.unfinished -= 1
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
                    self.unfinished -= 1
                if batch.stop_on_error and result.error is not None:
                    if not batch.done.done():
                        batch.done.set_exception(RowFailedError(row, result))
                    continue
                batch.results[row] = result
                batch.remaining -= 1
                if not batch.remaining and not batch.done.done():
                    batch.done.set_result(batch.results)
        finally:
            self._workers.discard(me)
            self._tasks.discard(me)
            if queue:  # a cancelled worker's place
                self._start_workers()


@dataclass(eq=False, slots=True)
class _Batch:
    """The rows of one ``submit`` call while the worker pool sends them."""

    path: str
    bodies: Sequence[dict[str, Any]]
    parse: Callable[[Any], Result]
    done: asyncio.Future[list[Result]]
    results: list[Any]  # Result once each row is done
    remaining: int
    stop_on_error: bool = False  # the first failed row fails the batch (RowFailedError)
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)  # row -> the worker sending it
