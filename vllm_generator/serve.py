"""Start vLLM servers for a run, wait until they answer, and stop them afterwards.

``serve_models(serve)`` is a context manager yielding the servers' base URLs. Each server runs in
its own process group, so stopping it also stops vLLM's engine and worker processes.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import logging
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .errors import RecipeError, ServerStartError
from .recipe import ServeConfig

__all__ = ["serve_models"]

logger = logging.getLogger(__name__)

LOG_DIR_ENV = "VLLM_GENERATOR_SERVER_LOG_DIR"
_POLL_TIMEOUT = 2.0  # seconds per /health or /v1/models request
_POLL_INTERVAL = 0.5
_PROGRESS_EVERY = 10.0  # seconds between "waiting for vLLM" lines
_STOP_GRACE = 20.0  # seconds from SIGTERM to SIGKILL: vLLM needs ~2 s to stop its engine
_TAIL_LINES = 20

# Servers started here and not yet stopped, for the atexit safety net.
_live: set[subprocess.Popen[bytes]] = set()
# Our own servers are local: never send readiness polls through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Process(NamedTuple):
    proc: subprocess.Popen[bytes]
    url: str
    command: list[str]
    log_path: Path


@contextlib.contextmanager
def serve_models(serve: ServeConfig) -> Iterator[list[str]]:
    """Start ``serve.count`` vLLM servers and yield their base URLs once all of them are ready.

    Every process started here is stopped on exit, also on exceptions and KeyboardInterrupt
    (SIGTERM to its process group, SIGKILL after 20 s).

    Args:
        serve: the launcher, model, ports, GPUs and environment (see ``ServeConfig``).

    Yields:
        Base URLs without ``/v1``, e.g. ``["http://127.0.0.1:8000"]``.

    Raises:
        ServerStartError: a server exited or did not answer within ``serve.startup_timeout``.
        RecipeError: ``serve.args`` sets ``--port`` for several servers (use ``serve.port``).
    """
    items = [*serve.command, *serve.args]
    fixed_port, fixed_host = _flag_value(items, "--port"), _flag_value(items, "--host")
    if fixed_port is not None and (serve.count > 1 or not fixed_port.isdigit() or int(fixed_port) == 0):
        raise RecipeError(
            f"serve.args sets --port {fixed_port}, which works only for one server on a known port: "
            "remove it and set serve.port instead (server i gets port + i; 0 picks free ports)"
        )
    host = fixed_host or serve.host
    ports = _ports(host, int(fixed_port), 1) if fixed_port is not None else _ports(host, serve.port, serve.count)
    log_dir = Path(os.environ.get(LOG_DIR_ENV) or tempfile.mkdtemp(prefix="vllm-generator-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    procs: list[subprocess.Popen[bytes]] = []
    try:
        servers: list[_Process] = []
        for i, port in enumerate(ports):
            command = _command(serve, None if fixed_host else host, None if fixed_port else port)
            env = {**os.environ, **serve.env}
            if serve.gpus:
                env["CUDA_VISIBLE_DEVICES"] = serve.gpus[i]  # one server per GPU
            log_path = log_dir / f"vllm-{os.getpid()}-{i}-port{port}.log"
            logger.info("starting vLLM server %d: %s (log: %s)", i, shlex.join(_shown(command)), log_path)
            with open(log_path, "wb") as log_file:
                try:
                    # A new session makes the server lead its own process group: we can stop its engine
                    # and workers with one killpg, and a Ctrl-C in the terminal reaches only us.
                    proc = subprocess.Popen(
                        command, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                    )
                except OSError as err:
                    raise ServerStartError(
                        f"cannot run {shlex.join(_shown(command))}: {err}. Is vLLM installed in this "
                        "environment? Set serve.command to its launcher."
                    ) from err
            procs.append(proc)
            _live.add(proc)
            servers.append(_Process(proc, _url(host, port), command, log_path))
        _wait_ready(servers, serve.startup_timeout)
        yield [server.url for server in servers]
    finally:
        _stop(procs, _STOP_GRACE)


def _shown(command: list[str]) -> list[str]:
    """The command as logs and errors show it: the value of --api-key (and other secret flags) hidden."""
    from .card import redact

    return [str(item) for item in redact(command)]


def _flag_value(items: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in a command line, if present."""
    for i, item in enumerate(items):
        if item == flag and i + 1 < len(items):
            return items[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def _ports(host: str, first: int, count: int) -> list[int]:
    """Server i's port: ``first + i``, checked to be free, or a free port from the OS when ``first`` is 0."""
    # Hold every socket until all are bound so that the OS hands out distinct ports. Checking fixed
    # ports matters too: with one taken by another server, our readiness polls would reach that one.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(family)) for _ in range(count)]
        for i, sock in enumerate(sockets):
            port = first + i if first else 0
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: ignore TIME_WAIT
            try:
                sock.bind((host, port))
            except (OSError, OverflowError) as err:
                raise ServerStartError(
                    f"cannot start a vLLM server on {host}:{port}: {err}. Is another server "
                    "using that port? Set serve.port to a free port, or 0 to pick free ones."
                ) from err
        return [sock.getsockname()[1] for sock in sockets]


def _command(serve: ServeConfig, host: str | None, port: int | None) -> list[str]:
    """``serve.command`` + model + ``serve.args`` + ``--host``/``--port`` unless already given."""
    has_placeholder = any("{model}" in item for item in [*serve.command, *serve.args])
    command = [item.replace("{model}", serve.model) for item in serve.command]
    if not has_placeholder:
        command.append(serve.model)  # the `vllm serve MODEL` form
    command += [item.replace("{model}", serve.model) for item in serve.args]
    command += ["--host", host] if host is not None else []
    command += ["--port", str(port)] if port is not None else []
    return command


def _url(host: str, port: int) -> str:
    # A server bound to every interface is reached through loopback.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _answers(url: str) -> bool:
    """Whether ``/health`` and then ``/v1/models`` answer (vLLM lists models once loaded)."""
    for path in ("/health", "/v1/models"):
        try:
            with _OPENER.open(url + path, timeout=_POLL_TIMEOUT) as response:
                if response.status != 200:
                    return False
        except urllib.error.HTTPError as err:
            # vLLM guards /v1 with the key from --api-key or $VLLM_API_KEY (which it reads itself):
            # a 401 means the server is up; the client sends the key
            if not (path == "/v1/models" and err.code in (401, 403)):
                return False
        except (OSError, http.client.HTTPException):  # refused, reset, timeout, 5xx while loading
            return False
    return True


def _wait_ready(servers: list[_Process], timeout: float) -> None:
    """Poll every server (all load in parallel) until each answers, one exits, or ``timeout`` passes."""
    start = time.monotonic()
    next_progress = start + _PROGRESS_EVERY
    pending = list(servers)
    while pending:
        for server in list(pending):
            # Exit status first: a server that died on "address in use" must not pass as ready
            # because another server answers on that port.
            if server.proc.poll() is not None:
                raise ServerStartError(_failure(f"{_exit_text(server.proc.returncode)} before it was ready", server))
            if _answers(server.url):
                logger.info("vLLM at %s is ready after %.1f s", server.url, time.monotonic() - start)
                pending.remove(server)
        now = time.monotonic()
        if pending and now - start > timeout:
            raise ServerStartError(
                _failure(f"did not become ready within {timeout:g} s", pending[0])
                + "\nIf the model is still loading, raise serve.startup_timeout."
            )
        if pending and now >= next_progress:
            logger.info("waiting for vLLM at %s (%.0fs)", ", ".join(s.url for s in pending), now - start)
            next_progress += _PROGRESS_EVERY
        if pending:
            time.sleep(_POLL_INTERVAL)


def _exit_text(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:  # e.g. SIGKILL from the kernel's out-of-memory killer
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _failure(what: str, server: _Process) -> str:
    """What went wrong, the command, the end of the server's log, and what to check."""
    proc, url, command, log_path = server
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64_000))  # the tail is enough
            tail = f.read().decode("utf-8", "replace").splitlines()[-_TAIL_LINES:]
    except OSError as err:
        tail = [f"(cannot read the log: {err})"]
    return (
        f"vLLM server at {url} (pid {proc.pid}) {what}.\ncommand: {shlex.join(_shown(command))}\n"
        f"last lines of {log_path}:\n" + "\n".join("    " + line for line in tail) + "\n"
        f"See the full log at {log_path}. Common causes: a wrong model path or Hub id, a missing "
        "HF_TOKEN for a gated model, a --max-model-len or --gpu-memory-utilization that does not fit "
        "in memory, a port in use, or an unknown vllm argument in serve.args."
    )


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> bool:
    """Send ``sig`` to the process group led by ``proc``; False if the group is gone."""
    try:
        os.killpg(proc.pid, sig)  # pgid == pid thanks to start_new_session
        return True
    except ProcessLookupError:
        return False


def _stop(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every group, wait up to ``grace`` s for all its processes, then SIGKILL what is left."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        # Engine and worker processes may outlive the API server for a moment: let them finish.
        while _signal_group(proc, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _signal_group(proc, signal.SIGKILL):
            logger.warning("vLLM server pid %d did not stop within %g s of SIGTERM: killed it", proc.pid, grace)
        proc.wait()
        _live.discard(proc)
        logger.info("stopped vLLM server pid %d", proc.pid)


@atexit.register
def _stop_leftovers() -> None:
    # A second Ctrl-C can interrupt _stop; never leave GPU-holding servers behind the interpreter.
    _stop(list(_live), 5.0)
