"""Samples per second and an ETA for progress lines (training, evaluation, feedback cache, bench)."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RateMeter:
    """Samples/s and ETA since the first update (the first step's warm-up is left out of the rate)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.done_at_start = 0
        self.samples = 0

    def update(self, done: int, samples: int) -> None:
        """Counts ``samples`` more; ``done`` = steps (or batches) finished so far."""
        if self.start is None:  # the clock starts after the first step (compilation, loader start-up)
            self.start, self.done_at_start = time.perf_counter(), done
            return
        self.samples += samples

    def rates(self, done: int, total: int | None) -> tuple[str, str]:
        """(samples/s, ETA) as text at ``done`` of ``total``; ``?`` before a second update."""
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        steps = done - self.done_at_start
        if elapsed <= 0 or steps <= 0:
            return "?", "?"
        eta = duration((total - done) * elapsed / steps) if total else "?"
        return f"{self.samples / elapsed:.1f}", eta
