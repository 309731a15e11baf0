"""How many requests each server gets at once: one controller per server, fed by the server's own
load reports and its refusals, so that the server always has a full batch plus a short queue.

vLLM runs up to ``max_num_seqs`` sequences at once (1,024 on an H100, 256 on an A100, 128 on a
CPU; users change it) and reports nothing of that number, but its ``/metrics`` gauges say how many
requests run and how many wait. A controller starts low and doubles its server's target (grows
it by half from 256 up) while the server runs everything it is given; once the server queues, it
holds the target at what the server runs plus a short queue; it lowers the target when the
server refuses requests (429, 503: vLLM's ``--max-num-queued-reqs``) or its queue grows. The
README's design notes say why these signals and not the per-response ``endpoint-load-metrics``
header.

The controller is plain logic over readings (no I/O, no clock of its own): ``client.py`` polls
the server, feeds ``observe`` and ``refused``, and admits requests below ``target``.
"""

from __future__ import annotations

import collections
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ADAPTIVE", "Controller", "Load", "parse_metrics"]

logger = logging.getLogger(__name__)

ADAPTIVE = "adaptive"
START_TARGET = 32  # low enough that a small server's queue is short before its first report
MAX_TARGET = 16_384  # above any vLLM default (2,048 with --performance-mode throughput)
# A server that reports no load (another OpenAI-compatible server): the fixed default of old.
UNREPORTED_TARGET = 256
# The ramp doubles the target up to this, then grows it by half: a server's first queue shows
# only after the step above its capacity, and that step's excess is what it then queues and the
# connections we open for nothing (at 1,024 slots, doubling queued up to 1,024 there; by half,
# at most 512)
GENTLE_ABOVE = 256
RAMP_POLL = 0.05  # seconds between reports while the target ramps (a second or so)
# ... for a moment after each of its steps: the next report that can show a step comes as soon
# as the new requests reach the server, which on fast requests is much sooner than RAMP_POLL
# (ten reports a step at most: 43 ms of a real server's time at its 4.3 ms a report)
QUICK_POLL, _QUICK_WINDOW = 0.01, 0.1
FAST_POLL = 0.2  # ... while it moves after that
SLOW_POLL = 1.0  # ... once it holds (a change of capacity is still seen within seconds)
_RAMP_WINDOW = 3.0  # seconds of RAMP_POLL after a ramp's step (then it stalled: our rows run out)
# ... of FAST_POLL after a settled target's change, or three times the reports' lag if longer:
# its effect shows within the lag; each report costs a server's front end 4 to 7 ms (on vLLM's
# CPU server, of its only core: 3 s of them after each change were ~1 % of its time at 16 slots)
_SETTLED_WINDOW = 1.0
_REFUSAL_MEMORY = 30.0  # seconds a refusal caps the target before it may probe above it again
_REFUSAL_BURST = 1.0  # refusals less than this far apart are one burst (one halving at most)
# A cold vLLM server's gauges read 0 for many seconds: after this long at a target the reports
# never confirmed, the target rises to UNREPORTED_TARGET rather than wait for them.
_UNCONFIRMED_GRACE = 3.0
# A report shows our requests when running + waiting >= this x ours, less a few in transit (being
# tokenized, or their answers on the way back)
_SEES_US = 0.9
_IN_TRANSIT = 2
_LAG_WEIGHT = 0.25  # weight of a shorter sample in the estimate of the reports' lag

# The gauges we read, each line "name{labels} value" (one per engine, summed); anything else in
# the exposition (histograms, counters, *_by_reason) is skipped by the regex engine itself.
_GAUGE = re.compile(rb"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc)(?:\{[^}\n]*\})?[ \t]+(\S+)", re.M)

State = Literal["fixed", "ramp", "hold", "unreported"]


@dataclass(frozen=True, slots=True)
class Load:
    """One report of a server's load, summed over its engines."""

    running: float
    waiting: float
    kv_cache: float | None = None  # the fullest engine's KV-cache use, 0..1


def parse_metrics(text: bytes) -> Load | None:
    """The load in a ``/metrics`` exposition; None when it has no vLLM request gauges."""
    running = waiting = 0.0
    kv: float | None = None
    seen = False
    for match in _GAUGE.finditer(text):
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        name = match.group(1)
        if name == b"kv_cache_usage_perc":
            kv = value if kv is None else max(kv, value)
            continue
        seen = True
        if name == b"num_requests_running":
            running += value
        else:
            waiting += value
    return Load(running, waiting, kv) if seen else None


def _share(ours: int, demand: float) -> float:
    """Our part of what the server holds (1 when it shows fewer than ours: some are in transit)."""
    return min(1.0, ours / max(demand, 1.0))


def queue_allowance(running: float) -> int:
    """Requests to keep waiting on a server that runs ``running``: a slot that frees is refilled
    from the server's own queue, not after a round trip to us (8 %, at least 4: a small server's
    steps are short next to its front end's tokenizing)."""
    return max(4, math.ceil(running * 0.08))


class Controller:
    """The in-flight target of one server (``fixed``: a number the user chose, never changed).

    ``observe`` takes a load report and how many requests we had in flight there; ``refused``
    a 429/503; ``restart`` a server back in rotation. Each returns True when ``target`` changed
    (the client then admits more requests, or fewer).
    """

    def __init__(self, name: str, fixed: int | None = None, max_target: int = MAX_TARGET) -> None:
        self.name = name
        self.fixed = fixed
        self.max_target_allowed = max(1, min(max_target, MAX_TARGET))  # the process's open-file limit may be lower
        self.state: State = "fixed" if fixed is not None else "ramp"
        self.target = fixed if fixed is not None else START_TARGET
        self.reported = True  # False once the server proved to give no load reports
        # the last report, and what the reports showed over the run (the metrics file)
        self.running: float | None = None
        self.waiting: float | None = None
        self.kv_cache: float | None = None
        self.peak_waiting = 0.0
        self.reports = 0
        self.refusals = 0
        self.max_target = self.target
        self.settled: int | None = None  # the target when the server first queued
        self._ceiling = MAX_TARGET  # lowered by a refusal, for _REFUSAL_MEMORY seconds
        self._ceiling_until = 0.0
        self._refused_at = -1e9
        self._empty = 0  # reports in a row with room (see observe)
        self._vacated = False  # the last report showed slots the server ran idle
        self._peak_running = 0.0  # the most the server ran (since the last cut)
        self._filled_at: float | None = None  # when ours first reached the current target
        self._confirmed = False  # a report showed our requests at the current target
        self._lag = 0.0  # seconds the reports trail our in-flight count (estimated)
        self._ours: collections.deque[tuple[float, int]] = collections.deque()  # (when, in flight) at each report
        self._ever_confirmed = False
        self._said_unseen = False  # the warning that the reports never show all of ours
        self._changed_at = 0.0

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def poll_interval(self, now: float) -> float:
        """Seconds to the next report: often while the target moves, then once a second."""
        if not self.adaptive:
            return SLOW_POLL
        since = now - self._changed_at
        first = self._changed_at == 0.0
        if self.state == "ramp" and (first or since < _RAMP_WINDOW):
            return QUICK_POLL if not first and since < _QUICK_WINDOW else RAMP_POLL
        # a ramp that stalled (our rows cannot fill it) or a target that holds: slowly, but
        # slots another client left are looked at again soon (two such reports raise the target)
        recent = first or since < max(_SETTLED_WINDOW, 3 * self._lag)
        return FAST_POLL if recent or (self._empty == 1 and self._vacated) else SLOW_POLL

    def summary(self) -> dict[str, Any]:
        """What the metrics file shows of this server."""
        return {
            "url": self.name,
            "max_concurrency": ADAPTIVE if self.adaptive else self.fixed,
            "state": self.state,
            "target": self.target,
            "settled_target": self.settled,
            "max_target": self.max_target,
            "running": self.running,
            "queue": self.waiting,
            "peak_queue": self.peak_waiting,
            "kv_cache_usage": self.kv_cache,
            "refusals": self.refusals,
            "reports": self.reports,
        }

    # -- inputs

    def observe(self, load: Load, ours: int, now: float) -> bool:
        """A load report of the server, taken when we had ``ours`` requests in flight there."""
        self.reports += 1
        self.running, self.waiting, self.kv_cache = load.running, load.waiting, load.kv_cache
        self.peak_waiting = max(self.peak_waiting, load.waiting)
        if not self.adaptive or ours == 0:
            return False
        if self._changed_at == 0.0:  # the first report: the ramp's fast reports count from here
            self._changed_at = now
        self._note_fill(ours, now)
        demand = load.running + load.waiting  # every client's requests at the server
        allowance = queue_allowance(load.running)
        sees_us = demand >= _SEES_US * ours - _IN_TRANSIT
        if sees_us and not self._confirmed and self._filled_at is not None:
            self._confirmed = self._ever_confirmed = True  # the reports show this target: how late?
            # the lag at its longest lately: a short estimate would cut again on stale reports
            sample = now - self._filled_at
            self._lag = max(sample, (1 - _LAG_WEIGHT) * self._lag + _LAG_WEIGHT * sample)
        # room: nothing waits (once settled, with all of ours in the report: a client too busy
        # to read its answers at once has many "in flight" that the server finished, and its
        # empty queue is no room), or (settled) fewer run than it has run, with a short queue;
        # a small server's queue is seldom empty (each arrival waits for the next step), and its
        # slots idle while many of ours are on their way in (vLLM's front end on a CPU)
        hold = self.state == "hold"
        idle_slots = load.running < _SEES_US * self._peak_running
        short = (load.waiting == 0 and (sees_us or not hold)) or (hold and load.waiting <= allowance and idle_slots)
        # slots the server ran lie idle with all of ours there: another client left (a second
        # look soon, not in a second); a moment's empty queue at a full batch is no such sign
        self._vacated = hold and load.waiting == 0 and sees_us and idle_slots
        self._peak_running = max(self._peak_running, load.running)
        self._empty = self._empty + 1 if short else 0
        if load.running == 0 and load.waiting > 0:
            # it runs nothing, so its queue says nothing of its slots: it is busy before it can
            # run them (compiling a structured output's grammar, a cold start); wait for it
            return False
        if load.waiting > 2 * allowance:
            return self._cut(load, self._ours_then(now), demand, allowance, now)
        if load.waiting > 0 and not short:
            if self.state == "ramp":
                self._settle(load, "the server queues")
            return False
        # nothing waits: more would run too, if we filled the target and the report is live (while
        # ramping: shows all of ours; once settled, many of ours may be on their way in or out)
        live = sees_us if self.state == "ramp" else sees_us or load.running > 0
        if not live or ours < _SEES_US * self.target:
            return self._wait_for_reports(demand, ours, now)
        return self._raise(load, _share(ours, demand), allowance, now)

    def refused(self, ours: int, now: float) -> bool:
        """The server refused a request (429 or 503) with ``ours`` still in flight there.

        With most of the target in flight, what the server took is its limit: the target comes
        down to it and stays under it for a while (vLLM's ``--max-num-queued-reqs``). With little
        in flight, others fill the server (or it refuses for its own reasons): the target halves,
        once per burst of refusals, as TCP does once per round trip.
        """
        self.refusals += 1
        if not self.adaptive:
            return False
        burst = now - self._refused_at < _REFUSAL_BURST
        self._refused_at = now
        if ours >= self.target / 2:
            limit = max(1, min(self.target, ours))
            self._ceiling, self._ceiling_until = limit, now + _REFUSAL_MEMORY
        elif not burst:
            limit = max(1, self.target // 2)
        else:
            return False
        if self.state == "ramp":
            self.state = "hold"
            self.settled = limit
        if limit >= self.target:
            return False
        if not burst:  # one line per burst, not one per refused request
            logger.warning("%s refuses requests at %d in flight: target %d -> %d", self.name, ours, self.target, limit)
        self._set(limit, now)
        return True

    def unreported(self, why: str) -> bool:
        """The server gives no load reports: hold the safe default."""
        self.reported = False
        if not self.adaptive or self.state == "unreported":
            return False
        self.state = "unreported"
        logger.warning("%s reports no load (%s): holding %d in flight; set max_concurrency to choose", self.name, why, UNREPORTED_TARGET)
        changed = self.target != UNREPORTED_TARGET
        self.target = UNREPORTED_TARGET
        self.max_target = max(self.max_target, self.target)
        return changed

    def restart(self) -> None:
        """The server is back in rotation (it may have restarted with another capacity): ramp again."""
        if self.adaptive and self.state != "unreported":
            self.state = "ramp"
            self._set(START_TARGET, 0.0)
            self._ceiling, self._ceiling_until = MAX_TARGET, 0.0
            self._peak_running, self._lag = 0.0, 0.0
            self._ours.clear()
            self._ever_confirmed = False  # a restarted vLLM's gauges are cold again

    # -- the rules

    def _note_fill(self, ours: int, now: float) -> None:
        if self._filled_at is None and ours >= _SEES_US * self.target:
            self._filled_at = now
        if now >= self._ceiling_until:
            self._ceiling = MAX_TARGET
        history = self._ours
        history.append((now, ours))
        while len(history) > 2 and history[1][0] <= now - self._lag - 2 * FAST_POLL:
            history.popleft()

    def _ours_then(self, now: float) -> int:
        """Our in-flight count when the report was taken (``_lag`` ago), the one it shows."""
        then = self._ours[0][1]
        for at, ours in self._ours:
            if at > now - self._lag:
                break
            then = ours
        return then

    def _cut(self, load: Load, ours: int, demand: float, allowance: int, now: float) -> bool:
        """Too long a queue: take off our share of the excess over the allowance. ``ours`` is
        what we had in flight when the report was taken (so that a lagging report, read again,
        gives the same target, not a lower one), including requests on their way in or out,
        which the server does not count yet: they are kept."""
        share = _share(ours, demand)  # others' requests wait there too
        excess = math.ceil((load.waiting - allowance) * share)
        # never below our share of what it runs, and at most halved per cut: the report may be stale
        target = max(1, ours - excess, math.ceil(load.running * share), self.target // 2)
        if target >= self.target:
            return False
        if self.state == "ramp":
            self._settle(load, "the server queues", target)
        elif target < 0.9 * self.target:
            logger.info("%s: target %d -> %d (it runs %.0f, %.0f wait)", self.name, self.target, target, load.running, load.waiting)
        self._set(target, now)
        self._peak_running = load.running  # what it runs now is its capacity
        return True

    def _raise(self, load: Load, share: float, allowance: int, now: float) -> bool:
        """Double while ramping (grow by half from GENTLE_ABOVE). Once settled, a report with an
        empty queue may be a moment's (answers on their way back, their slots not refilled yet):
        raise after two such reports in a row, by our share (as in ``_cut``: the server's other
        clients take theirs) of the room: what it ran before and does not now (another client
        left it), else the allowance (it may have grown: about 8 % per 0.4 s)."""
        if self.state == "ramp":
            grown = self.target * 2 if self.target < GENTLE_ABOVE else math.ceil(self.target * 1.5)
        elif self._empty >= 2:
            # idle slots only with all of ours in the report: else they may be ours on their way
            # in, or answers we have not read yet (a busy client: 277 -> 419 at 256 slots)
            room = self._peak_running - load.running if self._vacated else 0.0
            grown = self.target + math.ceil(max(allowance, room) * share)
        else:
            return False
        target = min(grown, self._ceiling, self.max_target_allowed)
        if target <= self.target:
            return False
        if self.state == "hold":
            logger.info("%s runs every request it has (%d): target %d -> %d", self.name, self.target, self.target, target)
        self._set(target, now)
        return True

    def _wait_for_reports(self, demand: float, ours: int, now: float) -> bool:
        """Nothing waits, but the reports do not show our requests. A cold start's gauges read 0:
        after a grace period, do not stay below the safe default for them. Gauges that show
        requests are live, and ours they do not show are on their way in (a CPU-starved front
        end holds them before the engine counts them): wait for them, and say so once (a proxy
        whose ``/metrics`` shows one of the servers behind it looks the same)."""
        if self._ever_confirmed or self.state != "ramp" or self.target >= UNREPORTED_TARGET:
            return False
        if self._filled_at is None or now - self._filled_at < _UNCONFIRMED_GRACE:
            return False
        if demand > 0:
            if not self._said_unseen:
                self._said_unseen = True
                logger.warning(
                    "%s's load reports show %.0f requests, fewer than our %d in flight, for %.0f s: holding %d "
                    "(behind a proxy whose /metrics shows one server of several? set max_concurrency)",
                    self.name,
                    demand,
                    ours,
                    _UNCONFIRMED_GRACE,
                    self.target,
                )
            return False
        logger.warning("%s's load reports do not show our requests yet: %d in flight until they do", self.name, UNREPORTED_TARGET)
        self._set(UNREPORTED_TARGET, now)
        return True

    def _settle(self, load: Load, why: str, target: int | None = None) -> None:
        self.state = "hold"
        settled = target or self.target
        self.settled = settled
        logger.info("%s: target settled at %d in flight (%s: it runs %.0f, %.0f wait)", self.name, settled, why, load.running, load.waiting)

    def _set(self, target: int, now: float) -> None:
        # a raise is timed until the reports show it (the lag); a cut shows at once, in stale ones too
        self._confirmed = target < self.target
        self.target = target
        self.max_target = max(self.max_target, target)
        self._filled_at = None
        self._changed_at = now
        self._empty = 0  # reports before this change say nothing of the new target
