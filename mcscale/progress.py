"""Progress of a long loop: a tqdm bar on a terminal; elsewhere (output redirected to a file, a batch
job's log) one plain line every MCSCALE_PROGRESS_SECONDS (default 30) with rate and time left."""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

DEFAULT_SECONDS = 30.0


def progress(iterable=None, *, step_size: int = 1, **kwargs):
    """A progress bar: ``disable=True`` shows nothing; on a terminal a tqdm bar, otherwise LineProgress.

    ``step_size``: units per step (e.g. images per optimiser step), so the log lines count steps too.
    """
    disable = kwargs.pop("disable", None)
    if disable:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("leave", False)
        return tqdm(iterable, **kwargs)
    seconds = float(os.environ.get("MCSCALE_PROGRESS_SECONDS", DEFAULT_SECONDS))
    return LineProgress(iterable, step_size=step_size, every_seconds=seconds, **kwargs)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LineProgress:
    """The part of tqdm's interface the loops use (update, set_postfix, close, iteration), written as
    lines on stderr: ``BYOL: 35% 525/1500 steps, 2.9 steps/s, 371 img/s, 6m02s left, loss=0.512``."""

    def __init__(self, iterable=None, *, total=None, initial=0, desc="", unit="it", step_size=1,
                 every_seconds=DEFAULT_SECONDS, stream=None, **_ignored):
        self.iterable, self.total, self.n, self.start_n = iterable, total, initial, initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.desc, self.unit, self.step_size, self.every = desc, unit, max(1, step_size), every_seconds
        self.stream = stream or sys.stderr
        self.postfix = ""
        self.started = self.last_line = time.monotonic()  # last_line moves on with each line written

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            self._line(now)

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        steps = self.step_size != 1
        count = f"{self.n // self.step_size}" if steps else f"{self.n}"
        parts = []
        if self.total:
            total = self.total // self.step_size if steps else self.total
            parts.append(f"{100 * self.n / self.total:.0f}% {count}/{total} {'steps' if steps else self.unit}")
        else:
            parts.append(f"{count} {'steps' if steps else self.unit}")
        if steps:
            parts.append(f"{_rate(rate / self.step_size)} steps/s")
        parts.append(f"{_rate(rate)} {self.unit}/s")
        if done:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {', '.join(parts)}", file=self.stream, flush=True)

    def close(self) -> None:
        """A closing line for a loop that logged before (a short one stays silent)."""
        if self.last_line > self.started and self.n > self.start_n:
            self._line(time.monotonic(), done=True)
        self.start_n = self.n  # a second close prints nothing
