"""Batches sent ahead of ``Dataset.map``, so that servers never drain between batches.

``map`` waits for a whole batch before it asks for the next one, and a recipe's chunk ends before
the next starts. The recipe runner maps ``Lookahead`` instead of the transform: a feeder thread
builds and submits the batches ``map`` will ask for next, and each call of ``map`` takes the one
sent ahead for its rows (after checking that its prompt columns are this batch's), or sends the
batch itself when none is. Both threads meet on one ``Condition``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .transform import Pending, VllmGenerate, _offset

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

__all__ = ["Lookahead"]

logger = logging.getLogger(__name__)


def _row_key(transform: VllmGenerate, batch: Mapping[str, Sequence[Any]]) -> list[list[Any]]:
    """The values of the columns the prompt reads: equal keys make equal request bodies."""
    return [list(batch[c]) for c in transform.prompt_columns]


class Lookahead:
    """The recipe runner's map function (``num_proc=1``): the transform, with batches sent ahead.

    ``stop`` is checked before each batch: a Ctrl-C that ``datasets`` swallowed while hashing
    still stops the run at the next batch.
    """

    def __init__(self, transform: VllmGenerate, stop: threading.Event) -> None:
        self.transform = transform
        self.stop = stop
        self._ahead: deque[Pending] = deque()
        self._changed = threading.Condition()
        self._feeding = False  # a feeder is running: map waits for its batches instead of sending them
        self._stopped = threading.Event()
        self._feeder: threading.Thread | None = None
        self._feeder_error: BaseException | None = None

    # -- the map function

    def __call__(self, *args: Any, offset: int = 0, rows: Sequence[int] | None = None) -> pa.Table:
        """As ``VllmGenerate.generated_table``: the prompt columns and the indices in, the new
        columns out as an Arrow table."""
        if self.stop.is_set():
            raise KeyboardInterrupt
        transform = self.transform
        *values, indices = args
        batch = dict(zip(transform.prompt_columns, values))
        indices = _offset(indices, offset, rows)
        pending = self._take(_row_key(transform, batch)) if self._ahead or self._feeding else None
        try:
            if pending is None:
                pending = transform.submit(transform.wire.bodies(batch, indices), indices)
                self._report_feeder_error()
            results = transform.collect(pending, indices)
        except BaseException:
            self.cancel()
            raise
        return transform.new_columns.arrow(results)

    def _take(self, key: list[list[Any]]) -> Pending | None:
        """The batch sent ahead for these rows, if any."""
        with self._changed:
            # With a feeder running this batch is on its way: wait for it rather than send it
            # too (the feeder would send it again, and every later batch would mismatch).
            while self._feeding and not self._ahead:
                self._changed.wait()
            pending = self._ahead.popleft() if self._ahead else None
            self._changed.notify_all()
        if pending is None:
            return None
        # Rows must get their own responses: use the pre-sent batch only if it is this batch
        # (comparing the prompt columns is cheaper than building and comparing the bodies).
        if pending.key == key:
            return pending
        logger.warning("a batch sent ahead does not match the batch map gave; sending this batch again")
        pending.future.cancel()
        self.cancel()
        return None

    def _report_feeder_error(self) -> None:
        """Map sent a batch itself, and the feeder had failed on it. An error of the rows' own
        (a value of the wrong type) map raises the same, naming the row; anything else must not
        pass unnoticed."""
        err, self._feeder_error = self._feeder_error, None
        if err is not None:
            logger.warning("look-ahead stopped (%s: %s); map sends the remaining batches itself", type(err).__name__, err)

    # -- the feeder

    def start(self, source: Dataset, ranges: list[tuple[int, int]], max_ahead: int, max_unfinished: Callable[[], int] | None) -> None:
        """Start sending the rows ``ranges`` of ``source`` ahead, in the order map will ask for them.

        At most ``max_ahead`` batches wait to be taken; with ``max_unfinished``, once two wait,
        more are sent only while the client holds fewer rows without a result than it returns
        (enough to keep the servers busy, and memory low; it follows the servers' targets).
        """
        source = source.select_columns(self.transform.prompt_columns)
        with self._changed:
            self._feeding = True  # before the thread runs: map's first batch waits for it
        self._feeder = threading.Thread(
            target=self._feed, args=(source, ranges, max_ahead, max_unfinished), name="vllm-generator-feeder", daemon=True
        )
        self._feeder.start()

    def _feed(self, source: Dataset, ranges: list[tuple[int, int]], max_ahead: int, max_unfinished: Callable[[], int] | None) -> None:
        try:
            for start, stop in ranges:
                if not self._wait_for_room(max_ahead, max_unfinished):
                    return
                batch = source[start:stop]
                pending = self.transform.submit(self.transform.wire.bodies(batch))  # outside the lock: map may take meanwhile
                pending.key = _row_key(self.transform, batch)
                with self._changed:
                    if self._stopped.is_set():  # stopped while building: nobody will take it
                        pending.future.cancel()
                        return
                    self._ahead.append(pending)
                    self._changed.notify_all()
        except BaseException as err:  # map sends the rest itself; _take reports it
            self._feeder_error = err
        finally:
            with self._changed:
                self._feeding = False  # map takes what is left, then sends itself
                self._changed.notify_all()

    def _wait_for_room(self, max_ahead: int, max_unfinished: Callable[[], int] | None) -> bool:
        """Block until another batch may be sent ahead; False once stopped."""
        client = self.transform.connect()
        with self._changed:
            while not self._stopped.is_set():
                if len(self._ahead) >= max_ahead:
                    self._changed.wait()
                elif max_unfinished is not None and len(self._ahead) >= 2 and client.unfinished >= max_unfinished():
                    # rows finish on the loop thread: it wakes us once enough have
                    client.wake_below(max_unfinished, self._notify)
                    if client.unfinished >= max_unfinished():
                        self._changed.wait()
                else:
                    return True
            return False

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def cancel(self) -> None:
        """Cancel the batches sent ahead (a batch failed, or map gave other rows)."""
        with self._changed:
            while self._ahead:
                self._ahead.popleft().future.cancel()
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the feeder and cancel what it sent ahead."""
        self._stopped.set()
        with self._changed:
            self._feeding = False
            self._changed.notify_all()
        self.cancel()
        if self._feeder is not None:
            self._feeder.join(timeout=10)
