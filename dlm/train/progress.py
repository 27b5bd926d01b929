"""The steady-state ETA: pure arithmetic over timestamps it is fed (no clock, no I/O, no rich).

Why not elapsed / steps * remaining (the HF Trainer's and tqdm's cumulative average): the first
steps pay for allocation, compilation and first-touch costs, and evaluation or checkpoint saves
stall the loop; a cumulative average carries all of that into every later forecast (that is how a
2x DoRA slowdown was reported as "8x"). Here the rate is the mean seconds-per-step of the recent
steps after the warm-up, stalls left out, with paused intervals (evaluation, saving) taken out of
each step's time.

    eta = EtaEstimator(total_steps=1000, warmup_steps=3)
    eta.start(t0, step=0)            # or step=500 for a resumed run
    eta.step(1, t1, tokens=4096)     # after each optimizer step (or every few; intervals are split)
    eta.pause(t_eval0, t_eval1)      # evaluation / checkpoint time, whenever it is known
    eta.eta(now)                     # seconds left, or None while only warm-up steps are known

`steady_step_seconds` is the one definition of a run's steady step time (the run summary, the
`step_time` event, the benchmark): the median step time after the warm-up.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

WARMUP_STEPS = 2  # steps left out of the steady step time (allocation, first-touch costs)
STALL = 5.0  # a step slower than this many times the window's median is a stall, not the rate


def steady_step_seconds(step_times: Sequence[float], warmup: int = WARMUP_STEPS) -> float | None:
    """The steady step time: the median of the step times after the first `warmup`, or of all of them
    while there are no more than that; None when there are none. The median, so that one slow step
    does not move it."""
    if not step_times:
        return None
    return statistics.median(step_times[warmup:] or step_times)


@dataclass(frozen=True)
class _Mark:
    step: int
    time: float
    tokens: int | None
    excluded: float  # seconds of `exclude()` attributed to the interval that ends here


class EtaEstimator:
    """Remaining time from the steady step rate. Feed it step ends; ask it `eta(now)`."""

    def __init__(self, total_steps: int, warmup_steps: int = 3, window: int = 50) -> None:
        if total_steps < 0 or warmup_steps < 0 or window < 1:
            raise ValueError("total_steps and warmup_steps must be >= 0, window >= 1")
        self.total_steps, self.warmup_steps, self.window = total_steps, warmup_steps, window
        self._marks: list[_Mark] = []
        self._pauses: list[tuple[float, float]] = []
        self._pending = 0.0
        self._first: int | None = None  # the step training (re)started from
        self._origin: _Mark | None = None  # the first mark, for the cumulative average only

    def start(self, now: float, step: int = 0, tokens: int | None = None) -> None:
        """Training begins (or resumes) at `step`, at time `now`: the first step's duration can be known."""
        self._marks, self._pending, self._first = [_Mark(step, now, tokens, 0.0)], 0.0, step
        self._origin = self._marks[0]

    def step(self, step: int, now: float, tokens: int | None = None) -> None:
        """`step` (1-based, global) ended at `now`; `tokens` is the running total of tokens seen."""
        if not self._marks:  # no start(): this step's duration is unknown; it opens the clock
            self._first = step - 1
        elif step <= self._marks[-1].step or now < self._marks[-1].time:
            raise ValueError(f"step {step} at {now} does not follow step {self._marks[-1].step}")
        self._marks.append(_Mark(step, now, tokens, self._pending))
        self._origin = self._origin or self._marks[0]
        self._pending = 0.0
        # Keep the window plus the marks that bound it; older ones (and their pauses) are never read again.
        del self._marks[: max(0, len(self._marks) - self.window - self.warmup_steps - 2)]
        self._pauses = [p for p in self._pauses if p[1] > self._marks[0].time]

    def pause(self, start: float, end: float) -> None:
        """Time between `start` and `end` was not training (evaluation, checkpoint save)."""
        if end > start:
            self._pauses.append((start, end))

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` out of the step that is under way (when only a duration is known)."""
        self._pending += max(0.0, seconds)

    # -- answers

    def seconds_per_step(self) -> float | None:
        """Steady seconds per step over the recent window; None before a post-warm-up step.

        The mean of the window's steps, leaving out stalls (a step over STALL x the median: a GC pause,
        another job on the machine). Not the median: steps differ in length when batches pad to their
        longest row, and the median of (2.5, 2.5, 0.5) would forecast 2.5 s for steps that average 1.8.
        """
        samples = [per for per, _, _ in self._intervals()][-self.window :]
        if not samples:
            return None
        cut = STALL * statistics.median(samples)
        return statistics.fmean([s for s in samples if s <= cut])

    def rate(self) -> float | None:
        """Steady steps per second."""
        sps = self.seconds_per_step()
        return 1.0 / sps if sps else None

    def tokens_per_second(self) -> float | None:
        """Steady tokens per second over the window: tokens / training time, pauses left out."""
        spans = self._intervals()[-self.window :]
        seconds = sum(per * n for per, n, tok in spans if tok is not None)
        tokens = sum(tok for _, _, tok in spans if tok is not None)
        return tokens / seconds if seconds > 0 else None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds to `total_steps` at the steady rate; with `now`, less the part of the step under way."""
        sps = self.seconds_per_step()
        if sps is None or not self._marks:
            return None
        last = self._marks[-1]
        remaining = max(0, self.total_steps - last.step) * sps
        if now is not None and remaining > 0:
            under_way = now - last.time - self._paused(last.time, now) - self._pending
            remaining -= min(max(0.0, under_way), sps)  # never count a step as more than done
        return remaining

    def cumulative_eta(self, now: float) -> float | None:
        """The naive forecast, elapsed / steps done * steps left; kept to show (and test) what it gets wrong."""
        if self._origin is None or len(self._marks) < 2:
            return None
        first, last = self._origin, self._marks[-1]
        done = last.step - first.step
        return (now - first.time) / done * max(0, self.total_steps - last.step)

    # -- internals

    def _paused(self, a: float, b: float) -> float:
        return sum(max(0.0, min(b, e) - max(a, s)) for s, e in self._pauses)

    def _intervals(self) -> list[tuple[float, int, int | None]]:
        """(seconds per step, steps, tokens) of each steady interval between consecutive marks."""
        out = []
        for prev, cur in zip(self._marks, self._marks[1:]):
            if self._first is not None and prev.step < self._first + self.warmup_steps:
                continue  # the interval holds a warm-up step
            n = cur.step - prev.step
            seconds = cur.time - prev.time - self._paused(prev.time, cur.time) - cur.excluded
            tokens = cur.tokens - prev.tokens if cur.tokens is not None and prev.tokens is not None else None
            out.append((max(0.0, seconds) / n, n, tokens))
        return out
