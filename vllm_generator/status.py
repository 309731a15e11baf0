"""What each split of a recipe is doing: the status file a run writes, and reading it back.

A run of split ``i`` of ``n`` keeps ``<work dir>/split-<tag>/status.json`` up to date: ``starting``
(checks, managed servers loading), ``running`` (rows done and rows/s, rewritten every
``HEARTBEAT_S`` seconds), then ``done``, ``failed`` (with the error) or ``stopped`` (interrupted:
Ctrl-C, SIGTERM, a cluster's warning before a time limit). ``vllm-generator status`` reads these
files; a run killed outright (``kill -9``, out of memory) cannot say so, so a file that says it is
running but stopped beating, or whose process is gone, reads as ``lost``. Nothing here knows about
a cluster engine: ``slurm.py`` adds the queue's view.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .recipe import Recipe
from .storage import split_dir, split_output_path, work_dir, write_json

__all__ = ["HEARTBEAT_S", "SplitStatus", "SplitState", "read_split_states", "num_splits_on_disk"]

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # seconds between rewrites of a running split's status file
STALE_S = 60.0  # a running split silent this long is lost (killed, or its machine is gone)
_FILE = "status.json"


class SplitStatus:
    """The status file of one run of a split; a context manager around the run.

    The file is written from the start when the work folder exists already (a rerun, or a split
    submitted to a cluster), else from ``checked()`` on: a recipe that fails its checks on a first
    run leaves no files behind. On exit it records ``done``, ``failed`` or ``stopped``.
    """

    def __init__(self, recipe: Recipe, split_id: int, num_splits: int) -> None:
        work = work_dir(recipe.data.output, recipe.processing.work_dir)
        self.path = os.path.join(split_dir(work, split_id, num_splits), _FILE)
        self._may_write = os.path.isdir(work)
        self._state: dict[str, Any] = {
            "state": "starting",
            "split_id": split_id,
            "num_splits": num_splits,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self._progress: Callable[[], int] | None = None
        self._since: tuple[float, int] = (0.0, 0)  # when rows started to be counted, and how many were done then
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vllm-generator-status", daemon=True)

    def __enter__(self) -> SplitStatus:
        self._write()
        self._thread.start()
        return self

    def checked(self, rows: int) -> None:
        """The split passed its checks: it has ``rows`` rows, and its status file may be made."""
        with self._lock:
            self._may_write = True
            self._state["rows"] = rows
        self._write()

    def running(self, done: int, progress: Callable[[], int]) -> None:
        """Requests are being sent: ``done`` rows were finished before, ``progress()`` counts the rest."""
        with self._lock:
            self._state |= {"state": "running", "done": done}
            self._progress = progress
            self._since = (time.monotonic(), done)
        self._write()

    def finish(self, rows: int, failed: int, output: str | None) -> None:
        with self._lock:
            self._progress = None
            self._state |= {"state": "done", "rows": rows, "done": rows, "failed_rows": failed, "output": output}

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._count()
            self._progress = None
            if isinstance(err, KeyboardInterrupt):
                self._state["state"] = "stopped"
            elif err is not None:
                first_line = (str(err).strip().splitlines() or [""])[0]
                self._state |= {"state": "failed", "error": f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__}
            elif self._state["state"] != "done":
                self._state["state"] = "done"
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                self._count()
            self._write()

    def _count(self) -> None:
        """Rows done and rows/s from the progress counter (called with the lock held)."""
        if self._progress is None:
            return
        done = self._state["done"] = self._since[1] + self._progress()
        elapsed = time.monotonic() - self._since[0]
        self._state["rows_per_s"] = round((done - self._since[1]) / elapsed, 2) if elapsed > 0 else 0.0

    def _write(self) -> None:
        with self._lock:
            if not self._may_write:
                return
            state = self._state | {"updated": time.time()}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json(self.path, state)
        except OSError as err:  # a status file must never stop a run; _plan reports an unusable work folder
            logger.debug("cannot write %s: %s", self.path, err)


@dataclass
class SplitState:
    """What ``read_split_states`` found about one split."""

    split_id: int
    state: str  # done, running, starting, not started, failed, stopped, lost
    rows: int | None = None  # the split's rows, once a run has checked it
    done: int | None = None
    rows_per_s: float | None = None
    failed_rows: int | None = None  # rows with an error in a done split's output
    error: str | None = None
    output: str | None = None
    updated: float | None = None  # when the status file was last written (time.time())
    where: str | None = None  # host:pid of the run

    @property
    def eta_s(self) -> float | None:
        if self.state != "running" or not self.rows_per_s or self.rows is None or self.done is None:
            return None
        return max(self.rows - self.done, 0) / self.rows_per_s

    def describe(self) -> str:
        """One line: ``done: 34 rows (1 with an error) -> out.split-00000-of-00003.parquet``."""
        if self.state == "done":
            rows = f"{self.rows} rows" if self.rows is not None else "output written"
            errors = f" ({self.failed_rows} with an error)" if self.failed_rows is not None else ""
            return f"done: {rows}{errors}" + (f" -> {self.output}" if self.output else "")
        if self.state == "running":
            eta = self.eta_s
            rate = f", {self.rows_per_s:,.1f} rows/s" if self.rows_per_s is not None else ""
            return (
                f"running: {self.done} of {self.rows} rows{rate}" + (f", ETA {_clock(eta)}" if eta is not None else "") + f" ({self.where})"
            )
        if self.state == "starting":
            return f"starting ({self.where}): checking the input or waiting for its servers"
        if self.state == "failed":
            return f"failed: {self.error}"
        if self.state == "stopped":
            return f"stopped at {self.done or 0} of {self.rows} rows (interrupted); finished chunks are kept and the next run resumes from them"
        if self.state == "lost":
            seen = time.strftime("%H:%M:%S", time.localtime(self.updated or 0))
            return (
                f"lost: its run ({self.where}) is gone or silent since {seen}, when {self.done or 0} of {self.rows} rows were done "
                "(killed?); the next run resumes from its finished chunks"
            )
        return self.state


def read_split_states(recipe: Recipe, num_splits: int, *, now: float | None = None) -> list[SplitState]:
    """Each split's state, from its status file and its output."""
    work = work_dir(recipe.data.output, recipe.processing.work_dir)
    now = time.time() if now is None else now
    return [_read(recipe, work, i, num_splits, now) for i in range(num_splits)]


def _read(recipe: Recipe, work: str, split_id: int, num_splits: int, now: float) -> SplitState:
    path = os.path.join(split_dir(work, split_id, num_splits), _FILE)
    output = split_output_path(recipe.data.output.path, num_splits, split_id) if recipe.data.output.path else None
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # none yet (or from an older version): the output says whether it is done
        done = output is not None and os.path.exists(output)
        return SplitState(split_id, "done" if done else "not started", output=output if done else None)
    fields = {k: saved.get(k) for k in ("rows", "done", "rows_per_s", "failed_rows", "error", "output", "updated")}
    state = SplitState(split_id, str(saved.get("state")), where=f"{saved.get('host')}:{saved.get('pid')}", **fields)
    if state.state in ("starting", "running") and not _alive(saved, now):
        state.state = "lost"
    return state


def _alive(saved: dict[str, Any], now: float) -> bool:
    """Whether the run that writes this status file still runs (its process, on this machine)."""
    if now - float(saved.get("updated") or 0) > STALE_S:
        return False
    if saved.get("host") != socket.gethostname():
        return True  # another machine's run: its heartbeat is all there is to go by
    try:
        os.kill(int(saved["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        pass  # another user's process, or a file without a pid
    return True


def num_splits_on_disk(recipe: Recipe) -> list[int]:
    """The numbers of splits that runs of this recipe used, from its work folder's split folders."""
    work = work_dir(recipe.data.output, recipe.processing.work_dir)
    found = set()
    for folder in glob.glob(os.path.join(glob.escape(work), "split-*-of-*")):
        match = re.fullmatch(r"split-\d+-of-(\d+)", os.path.basename(folder))
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
